/** The device check's and benchmark's own logic that needs no GPU: the peak table, tables, child processes. */
import { bf16PeakTflops } from '../src/bench/device-check';
import { childError, lastJson, markdownTable, runChild } from '../src/bench/proc';

test('dense bf16 peaks by GPU name: the specific names before the general ones', () => {
  expect(bf16PeakTflops('NVIDIA H100 80GB HBM3')).toBe(989);
  expect(bf16PeakTflops('NVIDIA H100 PCIe')).toBe(756);
  expect(bf16PeakTflops('NVIDIA H100 NVL')).toBe(835);
  expect(bf16PeakTflops('NVIDIA H200')).toBe(989);
  expect(bf16PeakTflops('NVIDIA H200 NVL')).toBe(835);
  expect(bf16PeakTflops('NVIDIA A100-SXM4-80GB')).toBe(312);
  expect(bf16PeakTflops('NVIDIA L4')).toBe(121);
  expect(bf16PeakTflops('NVIDIA L40S')).toBe(362);
  expect(bf16PeakTflops('Tesla T4')).toBeUndefined();
});

test('markdownTable pads columns and right-aligns from the given column', () => {
  expect(markdownTable(['name', 'value'], [['a', '1.5'], ['bbbbb', '10']], 1).split('\n')).toEqual([
    '| name  | value |',
    '|-------|------:|',
    '| a     |   1.5 |',
    '| bbbbb |    10 |',
  ]);
});

test('runChild: exit status, the last JSON line, and a time limit that kills the process group', async () => {
  const ok = await runChild(process.execPath, ['-e', 'console.log("x"); console.log(JSON.stringify({ a: 1 }))']);
  expect(ok.code).toBe(0);
  expect(lastJson(ok.stdout)).toEqual({ a: 1 });
  const slow = await runChild(process.execPath, ['-e', 'setTimeout(() => {}, 60000)'], { timeoutMs: 200 });
  expect(slow.timedOut).toBe(true);
  expect(slow.code).toBe(137);
  expect(childError(slow)).toMatch(/time box/);
  const bad = await runChild(process.execPath, ['-e', 'console.error("boom"); process.exit(3)']);
  expect(childError(bad, lastJson(bad.stdout))).toBe('exit 3: boom');
});
