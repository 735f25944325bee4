/** The device check's and benchmarks' own logic that needs no GPU: the peak table, tables, child processes, the
 * end-to-end bench's arithmetic and script discovery, the thread policy. */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { bf16PeakTflops } from '../src/bench/device-check';
import { childError, diffusersLibDir, lastJson, markdownTable, runChild } from '../src/bench/proc';
import { BOUNDED_SPIN_COUNT, busyCoresNow, threadPolicy } from '../src/native';

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

test('runChild notes when its output first matches (the first step of a progress bar on stderr)', async () => {
  const r = await runChild(process.execPath, ['-e', 'process.stderr.write("Steps: 0/5\\r"); setTimeout(() => process.stderr.write("Steps: | 1/5 [\\r"), 300)'], { firstMatch: /\| 1\/5 \[/ });
  expect(r.firstMatchSeconds).toBeGreaterThanOrEqual(0.25);
  expect(r.firstMatchSeconds).toBeLessThanOrEqual(r.seconds);
  const none = await runChild(process.execPath, ['-e', 'console.log("nothing")'], { firstMatch: /\| 1\/5 \[/ });
  expect(none.firstMatchSeconds).toBeUndefined();
});

describe('end-to-end bench', () => {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const e2e = require('../src/bench/e2e') as typeof import('../src/bench/e2e');

  test('per-step time is the slope of two run lengths; start-up, cores and RSS follow from the same runs', () => {
    const s = e2e.summarize([
      { steps: 220, wall: 24.5, cpu: 48.5, peakRssMb: 300, firstStep: 2.2 },
      { steps: 20, wall: 4.5, cpu: 8.5, peakRssMb: 290, firstStep: 2.1 },
    ]);
    expect(s.secPerStep).toBeCloseTo(0.1, 10);
    expect(s.fixedSeconds).toBeCloseTo(2.5, 10);
    expect(s.cores).toBeCloseTo(2, 10);
    expect(s.peakRssMb).toBe(300);
    expect(s.firstStep).toBe(2.1);
    expect(e2e.summarize([{ steps: 20, wall: 5 }, { steps: 220, error: 'exit 1: boom' }]).error).toBe('exit 1: boom');
    expect(e2e.summarize([{ steps: 20, wall: 5 }, { steps: 220, wall: 4 }]).error).toMatch(/too noisy/);
  });

  test("GNU time's line: wall, user + system, max RSS in KiB", () => {
    expect(e2e.parseTimeFile('Command exited with non-zero status 1\n12.50 20.25 1.75 307200\n')).toEqual({ wall: 12.5, cpu: 22, peakRssMb: 300 });
    expect(e2e.parseTimeFile('garbage')).toBeUndefined();
  });

  test("diffusers' script: DIFFUSERS_SCRIPT, a repository, or a src folder inside one; a clear reason otherwise", () => {
    const root = fs.mkdtempSync(path.join(os.tmpdir(), 'e2e-find-'));
    const script = path.join(root, 'examples', 'text_to_image', 'train_text_to_image_lora.py');
    fs.mkdirSync(path.dirname(script), { recursive: true });
    fs.writeFileSync(script, '');
    fs.mkdirSync(path.join(root, 'src', 'diffusers'), { recursive: true });
    fs.writeFileSync(path.join(root, 'src', 'diffusers', '__init__.py'), '');
    expect(e2e.findDiffusersScript({ DIFFUSERS_SRC: root }).script).toBe(script);
    expect(e2e.findDiffusersScript({ DIFFUSERS_SRC: path.join(root, 'src') }).script).toBe(script);
    expect(e2e.findDiffusersScript({ DIFFUSERS_SCRIPT: script, DIFFUSERS_SRC: '/nowhere' }).script).toBe(script);
    expect(e2e.findDiffusersScript({ DIFFUSERS_SCRIPT: '/nowhere/x.py' }).reason).toMatch(/DIFFUSERS_SCRIPT=\/nowhere\/x.py does not exist/);
    expect(e2e.findDiffusersScript({ DIFFUSERS_SRC: os.tmpdir() }).reason).toMatch(/set DIFFUSERS_SCRIPT/);
    expect(e2e.findDiffusersScript({}).reason).toMatch(/set DIFFUSERS_SRC/);
    expect(diffusersLibDir(root)).toBe(path.join(root, 'src'));
    expect(diffusersLibDir(path.join(root, 'src'))).toBe(path.join(root, 'src'));
    expect(diffusersLibDir(os.tmpdir())).toBeUndefined();
    fs.rmSync(root, { recursive: true, force: true });
  });

  test('targets: 2x on the tiny model, 1.15x on SD 1.5 shapes, RSS below diffusers, first step within 3 s', () => {
    const cases = e2e.e2eCases(false);
    const side = (secPerStep: number, peakRssMb: number, firstStep: number) => ({ runs: [], secPerStep, peakRssMb, firstStep });
    const rows = [
      { case: cases[0], ours: side(0.08, 290, 2.5), diffusers: side(0.17, 590, 8), speedup: 0.17 / 0.08 },
      { case: cases.find((c) => c.name === 'sd15 128px b1')!, ours: side(1.6, 5200, 9), diffusers: side(1.7, 5100, 20), speedup: 1.7 / 1.6 },
    ];
    expect(e2e.e2eTargets(rows)).toEqual([
      'met: tiny 64px b2 2.13x diffusers (target >= 2x)',
      'met: tiny 64px b2 peak RSS 290 MB vs 590 MB (target: below diffusers)',
      'met: tiny 64px b2 first step after 2.5 s (target <= 3 s)',
      'NOT met: sd15 128px b1 1.06x diffusers (target >= 1.15x)',
      'NOT met: sd15 128px b1 peak RSS 5.08 GB vs 4.98 GB (target: below diffusers)',
    ]);
    expect(e2e.e2eTable(rows)).toMatch(/\| tiny 64px b2 +\| +0\.080 \| +0\.170 \| +2\.13x \|/);
    // --quick is one short case
    expect(e2e.e2eCases(true).map((c) => c.steps)).toEqual([[10, 60]]);
  });
});

describe('thread policy', () => {
  test('busy cores are sampled now: a busy loop in a child process shows as about one busy core', () => {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { spawn } = require('node:child_process') as typeof import('node:child_process');
    const child = spawn(process.execPath, ['-e', 'const t = Date.now() + 3000; while (Date.now() < t);'], { stdio: 'ignore' });
    try {
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 300); // let it start
      const loaded = busyCoresNow(300);
      expect(loaded).toBeGreaterThan(0.8); // the child's core, whatever else runs
      expect(loaded).toBeLessThanOrEqual(require('node:os').cpus().length + 1e-9);
    } finally {
      child.kill('SIGKILL');
    }
  });

  test('bounded spin on a quiet machine, passive on a busy one, the environment and TRAIN_LORA_THREAD_POLICY win', () => {
    expect(threadPolicy({}, 2, 0.3).env).toEqual({ GOMP_SPINCOUNT: String(BOUNDED_SPIN_COUNT) });
    const busy = threadPolicy({}, 2, 2.5);
    expect(busy.env).toEqual({ OMP_WAIT_POLICY: 'PASSIVE' });
    expect(busy.description).toMatch(/busy: other work keeps 2.5 of 2 cores busy/);
    // Half the cores is the line: one busy core of 16 is not a busy machine.
    expect(threadPolicy({}, 2, 1).env).toEqual({ OMP_WAIT_POLICY: 'PASSIVE' });
    expect(threadPolicy({}, 16, 1).env).toEqual({ GOMP_SPINCOUNT: String(BOUNDED_SPIN_COUNT) });
    expect(threadPolicy({ OMP_WAIT_POLICY: 'ACTIVE' }, 2, 9).env).toEqual({});
    expect(threadPolicy({ GOMP_SPINCOUNT: '100' }, 2, 0).description).toMatch(/GOMP_SPINCOUNT=100 \(from the environment\)/);
    expect(threadPolicy({ TRAIN_LORA_THREAD_POLICY: 'passive' }, 2, 0).env).toEqual({ OMP_WAIT_POLICY: 'PASSIVE' });
    expect(threadPolicy({ TRAIN_LORA_THREAD_POLICY: 'spin' }, 2, 9).env).toEqual({});
    expect(threadPolicy({ TRAIN_LORA_THREAD_POLICY: 'bounded' }, 2, 9).env).toEqual({ GOMP_SPINCOUNT: String(BOUNDED_SPIN_COUNT) });
    expect(threadPolicy({ LOCAL_WORLD_SIZE: '2' }, 16, 0)).toEqual({ env: { OMP_WAIT_POLICY: 'PASSIVE' }, description: 'OpenMP wait: passive (2 data-parallel processes share this machine)' });
    expect(threadPolicy({ LOCAL_WORLD_SIZE: '1' }, 16, 0).env).toEqual({ GOMP_SPINCOUNT: String(BOUNDED_SPIN_COUNT) });
    expect(() => threadPolicy({ TRAIN_LORA_THREAD_POLICY: 'fast' }, 2, 0)).toThrow(/TRAIN_LORA_THREAD_POLICY=fast is not one of auto, bounded, passive, spin/);
  });
});

test("the thread policy's variables are set only while the addon loads: child processes decide for themselves", () => {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { spawnSync } = require('node:child_process') as typeof import('node:child_process');
  const env: NodeJS.ProcessEnv = { ...process.env, TRAIN_LORA_THREAD_POLICY: 'bounded' };
  delete env.GOMP_SPINCOUNT;
  delete env.OMP_WAIT_POLICY;
  const script = "const n = require('./dist/native'); n.native().version(); console.log(JSON.stringify({ left: process.env.GOMP_SPINCOUNT ?? null, used: n.applyThreadPolicy().env }))";
  const r = spawnSync(process.execPath, ['-e', script], { cwd: path.join(__dirname, '..'), env, encoding: 'utf8' });
  expect(JSON.parse(r.stdout.trim())).toEqual({ left: null, used: { GOMP_SPINCOUNT: String(BOUNDED_SPIN_COUNT) } });
});
