/**
 * CheckpointManager: atomic saves, failures that leave earlier checkpoints intact, detection of damaged
 * checkpoints by verify and latest, retention rules, stale temporary folders.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { CheckpointManager, markKeep, verifyCheckpoint } from '../src/checkpoint/manager';
import { native } from '../src/native';

let tmp: string;
beforeEach(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-ckpt-'));
});
afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));

async function writeFake(dir: string, step: number): Promise<void> {
  const data = new Float32Array(64).map((_, i) => i * step);
  await native().safetensorsWrite(path.join(dir, 'model.safetensors'), [{ name: 'w', dtype: 'F32', shape: [64], data: new Uint8Array(data.buffer) }]);
  fs.writeFileSync(path.join(dir, 'trainer_state.json'), JSON.stringify({ global_step: step }));
}

async function saveSteps(mgr: CheckpointManager, steps: number[]): Promise<void> {
  for (const s of steps) await mgr.save(s, (d) => writeFake(d, s));
}

test('a save appears complete with a manifest, or not at all', async () => {
  const mgr = new CheckpointManager(tmp);
  const e = await mgr.save(10, (d) => writeFake(d, 10));
  expect(e.valid).toBe(true);
  expect(Object.keys(e.manifest!.files).sort()).toEqual(['model.safetensors', 'trainer_state.json']);
  expect(fs.readdirSync(mgr.dir)).toEqual(['checkpoint-10']);
});

test.each(['start', 'files-written', 'before-manifest', 'before-rename'])('a failure at "%s" removes the partial folder and keeps the earlier checkpoints', async (stage) => {
  const ok = new CheckpointManager(tmp);
  await saveSteps(ok, [5, 10]);
  const failing = new CheckpointManager(tmp, {
    faultHook: (s) => {
      if (s === stage) throw Object.assign(new Error('No space left on device'), { code: 'ENOSPC' });
    },
  });
  const err = await failing.save(15, (d) => writeFake(d, 15)).then(() => null, (e: Error & { code?: string }) => e);
  expect(err?.code).toBe('ENOSPC');
  expect(err?.message).toMatch(/earlier checkpoints are intact.*disk is full/s);
  expect(fs.readdirSync(ok.dir).sort()).toEqual(['checkpoint-10', 'checkpoint-5']);
  expect((await ok.latest())?.step).toBe(10);
  for (const e of await ok.list('full')) expect(e.valid).toBe(true);
});

test('not enough free space is refused before writing anything', async () => {
  const mgr = new CheckpointManager(tmp);
  await expect(mgr.save(1, (d) => writeFake(d, 1), { expectedBytes: 1e18 })).rejects.toThrow(/not enough free space .* about .* needed/);
  expect(fs.existsSync(path.join(mgr.dir, 'checkpoint-1'))).toBe(false);
});

test('a truncated file, a bit flip, a missing manifest and a missing file are each detected; latest skips them', async () => {
  const mgr = new CheckpointManager(tmp);
  await saveSteps(mgr, [1, 2, 3, 4, 5]);
  const m = (s: number) => path.join(mgr.dir, `checkpoint-${s}`, 'model.safetensors');
  fs.truncateSync(m(5), 100); // truncated
  const bytes = fs.readFileSync(m(4));
  bytes[bytes.length - 3] ^= 0x10; // one flipped bit in the data
  fs.writeFileSync(m(4), bytes);
  fs.rmSync(path.join(mgr.dir, 'checkpoint-3', 'manifest.json')); // the save never finished
  fs.rmSync(path.join(mgr.dir, 'checkpoint-2', 'trainer_state.json'));
  const skipped: string[] = [];
  const latest = await mgr.latest((e) => skipped.push(`${e.step}: ${e.problem}`));
  expect(latest?.step).toBe(1);
  expect(skipped).toEqual([
    expect.stringMatching(/^5: model\.safetensors is 100 bytes, the manifest says \d+/),
    expect.stringMatching(/^4: model\.safetensors does not match its sha256/),
    expect.stringMatching(/^3: no manifest\.json/),
    expect.stringMatching(/^2: trainer_state\.json is missing/),
  ]);
  expect((await verifyCheckpoint(path.join(mgr.dir, 'checkpoint-4'))).valid).toBe(false);
  expect((await verifyCheckpoint(path.join(mgr.dir, 'checkpoint-1'))).valid).toBe(true);
});

test('a file that matches its hash but does not parse is reported', async () => {
  const mgr = new CheckpointManager(tmp);
  await mgr.save(1, async (d) => {
    fs.writeFileSync(path.join(d, 'model.safetensors'), Buffer.from('not a safetensors file at all'));
  });
  const e = await verifyCheckpoint(path.join(mgr.dir, 'checkpoint-1'));
  expect(e.valid).toBe(false);
  expect(e.problem).toMatch(/model\.safetensors does not parse/);
});

test('retention keeps the newest N, the best, the final and kept ones, and never leaves zero', async () => {
  const mgr = new CheckpointManager(tmp);
  await saveSteps(mgr, [1, 2, 3, 4, 5, 6]);
  markKeep(path.join(mgr.dir, 'checkpoint-1'));
  const removed = mgr.prune(2, { best: 2 });
  expect(removed.sort()).toEqual(['checkpoint-3', 'checkpoint-4']);
  expect(fs.readdirSync(mgr.dir).sort()).toEqual(['checkpoint-1', 'checkpoint-2', 'checkpoint-5', 'checkpoint-6']);
  expect(mgr.prune(1, { best: 2 })).toEqual(['checkpoint-5']);
  expect(mgr.prune(1, { best: 2 })).toEqual([]);
  // Without protection the kept one still stays, and the newest is never removed.
  expect(mgr.prune(1).sort()).toEqual(['checkpoint-2']);
  expect((await mgr.latest())?.step).toBe(6);
});

test('stale temporary folders from a crash are removed at start; a live writer\'s are not', async () => {
  const mgr = new CheckpointManager(tmp);
  fs.mkdirSync(path.join(mgr.dir, '.tmp-checkpoint-7-999999'), { recursive: true });
  fs.mkdirSync(path.join(mgr.dir, `.tmp-checkpoint-8-${process.ppid}`), { recursive: true });
  expect(mgr.cleanStale()).toEqual(['.tmp-checkpoint-7-999999']);
  expect(fs.existsSync(path.join(mgr.dir, `.tmp-checkpoint-8-${process.ppid}`))).toBe(true);
});

test('re-saving the same step replaces it atomically', async () => {
  const mgr = new CheckpointManager(tmp);
  await mgr.save(3, (d) => writeFake(d, 3));
  await mgr.save(3, (d) => writeFake(d, 33));
  const e = await mgr.latest();
  expect(e?.step).toBe(3);
  const ts = JSON.parse(fs.readFileSync(path.join(e!.path, 'trainer_state.json'), 'utf8'));
  expect(ts.global_step).toBe(33);
  expect(fs.readdirSync(mgr.dir)).toEqual(['checkpoint-3']);
});
