/**
 * CheckpointManager: atomic saves, failures that leave earlier checkpoints intact, detection of damaged
 * checkpoints by verify and latest, retention rules, stale temporary folders.
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { CheckpointManager, inspectLock, markKeep, processIdentity, RunLock, spaceNeeded, verifyCheckpoint } from '../src/checkpoint/manager';
import { readStateFile } from '../src/checkpoint/schema';
import { listCheckpoints, listRuns } from '../src/commands/checkpoints';
import { cleanStaleExports } from '../src/export/lora-export';
import { native } from '../src/native';

let tmp: string;
beforeEach(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-ckpt-'));
});
afterEach(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** A real checkpoint (test/fixtures/export/checkpoint-3), its state files made to say `step`. */
const FIXTURE = path.join(__dirname, 'fixtures', 'export', 'checkpoint-3');

async function writeFake(dir: string, step: number, state: Record<string, unknown> = {}): Promise<void> {
  const data = new Float32Array(64).map((_, i) => i * step);
  for (const f of fs.readdirSync(FIXTURE)) if (f !== 'manifest.json') fs.copyFileSync(path.join(FIXTURE, f), path.join(dir, f));
  await native().safetensorsWrite(path.join(dir, 'model.safetensors'), [{ name: 'w', dtype: 'F32', shape: [64], data: new Uint8Array(data.buffer) }]);
  const ts = JSON.parse(fs.readFileSync(path.join(FIXTURE, 'trainer_state.json'), 'utf8'));
  fs.writeFileSync(path.join(dir, 'trainer_state.json'), JSON.stringify({ ...ts, global_step: step, ...state }));
}

async function saveSteps(mgr: CheckpointManager, steps: number[]): Promise<void> {
  for (const s of steps) await mgr.save(s, (d) => writeFake(d, s));
}

test('a save appears complete with a manifest, or not at all', async () => {
  const mgr = new CheckpointManager(tmp);
  const e = await mgr.save(10, (d) => writeFake(d, 10));
  expect(e.valid).toBe(true);
  expect(Object.keys(e.manifest!.files).sort()).toEqual(['model.safetensors', 'optimizer.json', 'optimizer.safetensors', 'random_states_0.json', 'scaler.json', 'scheduler.json', 'trainer_state.json']);
  expect(fs.readdirSync(mgr.dir)).toEqual(['checkpoint-10']);
});

test('hashes the writer reports (the addon hashes weight files as it writes them) go into the manifest unread; a size mismatch is rehashed', async () => {
  const dir = path.join(tmp, 'known-hashes');
  const mgr = new CheckpointManager(dir);
  let blocked = -1;
  const e = await mgr.save(
    7,
    async (d) => {
      await writeFake(d, 7);
      const size = fs.statSync(path.join(d, 'model.safetensors')).size;
      // A deliberately wrong hash for model.safetensors: the manifest must carry it (proof it was not recomputed), so a
      // full verify then fails; a wrong size for optimizer.safetensors must be ignored (hashed from the file instead).
      return { 'model.safetensors': { size, sha256: '0'.repeat(64) }, 'optimizer.safetensors': { size: 1, sha256: '1'.repeat(64) } };
    },
    { onBlocked: (ms) => (blocked = ms) },
  );
  expect(e.manifest!.files['model.safetensors'].sha256).toBe('0'.repeat(64));
  const opt = fs.readFileSync(path.join(e.path, 'optimizer.safetensors'));
  expect(e.manifest!.files['optimizer.safetensors'].sha256).toBe(crypto.createHash('sha256').update(opt).digest('hex'));
  expect(blocked).toBeGreaterThanOrEqual(0);
  expect((await verifyCheckpoint(e.path)).problem).toMatch(/model\.safetensors does not match its sha256/);
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
  await expect(mgr.save(1, (d) => writeFake(d, 1), { expectedBytes: 1e18 })).rejects.toThrow(/not enough free space .* free, .* needed/);
  expect(fs.existsSync(path.join(mgr.dir, 'checkpoint-1'))).toBe(false);
});

test('the free-space rule is the checkpoint size + 10 % + 64 KiB, and the message states it', async () => {
  // 2.6 MiB free is plenty for a 330 KiB checkpoint (a fixed 16 MiB margin refused it, saying 330 KiB were needed).
  expect(spaceNeeded(330 * 1024)).toBe(Math.ceil(330 * 1024 * 1.1) + 64 * 1024);
  let free = 2.6 * 1024 * 1024;
  const mgr = new CheckpointManager(tmp, { freeBytes: () => free });
  await expect(mgr.save(1, (d) => writeFake(d, 1), { expectedBytes: 330 * 1024 })).resolves.toMatchObject({ valid: true });
  free = 400 * 1024;
  let err: (Error & { code?: string }) | undefined;
  try {
    mgr.checkFreeSpace(2, 330 * 1024); // synchronous: a trainer calls it before it trains on
  } catch (e) {
    err = e as Error;
  }
  expect(err?.code).toBe('ENOSPC');
  expect(err?.message).toMatch(/for checkpoint-2: 400\.0 KiB free, 427\.0 KiB needed \(the last checkpoint's size, 330\.0 KiB, plus 10 % and 64\.0 KiB margin/);
  await expect(mgr.save(2, (d) => writeFake(d, 2), { expectedBytes: 330 * 1024 })).rejects.toThrow(/400\.0 KiB free, 427\.0 KiB needed/);
  expect(fs.existsSync(path.join(mgr.dir, 'checkpoint-2'))).toBe(false);
  // Scales with the size: a 4 GiB checkpoint needs 4.4 GiB + 64 KiB.
  expect(spaceNeeded(4 * 1024 ** 3)).toBe(Math.ceil(4 * 1024 ** 3 * 1.1) + 64 * 1024);
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

test('retention keeps the newest N, and beyond them the best and kept ones; never leaves zero', async () => {
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

test('--checkpoints-total-limit counts the final checkpoint among the newest N, as diffusers does', async () => {
  // limit 5, 3000 steps, a checkpoint every 500: 1000, 1500, 2000, 2500 and the final 3000 stay.
  const mgr = new CheckpointManager(tmp);
  for (let s = 500; s <= 3000; s += 500) {
    await mgr.save(s, (d) => writeFake(d, s), { reason: s === 3000 ? 'final' : 'interval' });
    mgr.prune(5, { final: s === 3000 ? s : undefined });
  }
  expect((await mgr.list()).map((e) => e.step)).toEqual([3000, 2500, 2000, 1500, 1000]);
  // A run continued in the same stage: its earlier final is an ordinary checkpoint now.
  for (const s of [3500, 4000]) await mgr.save(s, (d) => writeFake(d, s), { reason: s === 4000 ? 'final' : 'interval' });
  expect(mgr.prune(5, { final: 4000 })).toEqual(['checkpoint-1500', 'checkpoint-1000']);
  expect(fs.readdirSync(mgr.dir).filter((n) => n.startsWith('checkpoint-')).length).toBe(5);
});

test('beyond N only the best (when older), kept checkpoints and the last checkpoint of earlier stages stay', async () => {
  const mgr = new CheckpointManager(tmp);
  const withStage = (step: number, stage: string) => (d: string) => writeFake(d, step, { stage });
  for (const s of [1, 2, 3]) await mgr.save(s, withStage(s, 'first'), { reason: s === 3 ? 'final' : 'interval' });
  for (const s of [4, 5, 6, 7, 8]) await mgr.save(s, withStage(s, 'second'), { reason: s === 8 ? 'final' : 'interval' });
  markKeep(path.join(mgr.dir, 'checkpoint-4'));
  // Newest 2: 8, 7. Beyond them: 5 (best), 4 (kept), 3 (the first stage's last); 1, 2, 6 go.
  expect(mgr.prune(2, { best: 5, final: 8, stage: 'second' }).sort()).toEqual(['checkpoint-1', 'checkpoint-2', 'checkpoint-6']);
  // The best among the newest N counts as one of them: nothing extra is kept for it.
  expect(mgr.prune(2, { best: 8, stage: 'second' })).toEqual(['checkpoint-5']);
  expect((await mgr.list()).map((e) => e.step)).toEqual([8, 7, 4, 3]);
});

test('stale temporary folders from a crash are removed at start; a live writer\'s are not', async () => {
  const mgr = new CheckpointManager(tmp);
  fs.mkdirSync(path.join(mgr.dir, '.tmp-checkpoint-7-999999'), { recursive: true });
  fs.mkdirSync(path.join(mgr.dir, `.tmp-checkpoint-8-${process.ppid}`), { recursive: true });
  fs.writeFileSync(path.join(mgr.dir, 'best.json.tmp-999999'), '{');
  fs.writeFileSync(path.join(mgr.dir, 'notes.tmp-999999'), 'not ours');
  // Named with a live pid, but written long before that process started: the pid was reused, the writer is gone.
  const reused = path.join(mgr.dir, `.tmp-checkpoint-6-${process.ppid}`);
  fs.mkdirSync(reused);
  fs.utimesSync(reused, new Date('2000-01-01'), new Date('2000-01-01'));
  expect(mgr.cleanStale().sort()).toEqual([`.tmp-checkpoint-6-${process.ppid}`, '.tmp-checkpoint-7-999999', 'best.json.tmp-999999']);
  expect(fs.existsSync(path.join(mgr.dir, `.tmp-checkpoint-8-${process.ppid}`))).toBe(true);
  expect(fs.existsSync(path.join(mgr.dir, 'notes.tmp-999999'))).toBe(true);
});

test('a re-save killed between its two renames: the set-aside checkpoint is put back at start', async () => {
  const mgr = new CheckpointManager(tmp);
  await mgr.save(4, (d) => writeFake(d, 4));
  fs.renameSync(path.join(mgr.dir, 'checkpoint-4'), path.join(mgr.dir, '.tmp-old-checkpoint-4-999999'));
  expect(mgr.cleanStale()).toEqual([]);
  expect((await mgr.latest())?.step).toBe(4);
});

test('re-saving the same step replaces it atomically', async () => {
  const mgr = new CheckpointManager(tmp);
  await mgr.save(3, (d) => writeFake(d, 3, { train_loss: 0.5 }));
  await mgr.save(3, (d) => writeFake(d, 3, { train_loss: 0.25 }));
  const e = await mgr.latest();
  expect(e?.step).toBe(3);
  const ts = JSON.parse(fs.readFileSync(path.join(e!.path, 'trainer_state.json'), 'utf8'));
  expect(ts.train_loss).toBe(0.25);
  expect(fs.readdirSync(mgr.dir)).toEqual(['checkpoint-3']);
});

/** Rewrites a checkpoint's manifest to match its files as they are now (what a careless repair would do). */
function rehash(dir: string, drop: string[] = []): void {
  const mf = path.join(dir, 'manifest.json');
  const m = JSON.parse(fs.readFileSync(mf, 'utf8'));
  for (const f of drop) delete m.files[f];
  for (const f of Object.keys(m.files)) {
    const b = fs.readFileSync(path.join(dir, f));
    m.files[f] = { size: b.length, sha256: crypto.createHash('sha256').update(b).digest('hex') };
  }
  fs.writeFileSync(mf, JSON.stringify(m));
}

function editJson(file: string, edit: (v: Record<string, any>) => void): void {
  const v = JSON.parse(fs.readFileSync(file, 'utf8'));
  edit(v);
  fs.writeFileSync(file, JSON.stringify(v));
}

describe('state files are checked for content, not only hashes', () => {
  test('checkpoints list: quick checks say what they are, and "latest" is what a resume takes (a flipped byte in optimizer.safetensors)', async () => {
    const mgr = new CheckpointManager(tmp);
    await saveSteps(mgr, [1, 2, 3]);
    const opt = path.join(mgr.dir, 'checkpoint-3', 'optimizer.safetensors');
    const b = fs.readFileSync(opt);
    b[b.length - 5] ^= 0x01;
    fs.writeFileSync(opt, b);
    const out = await listCheckpoints(tmp);
    const row = (step: number): string => out.split('\n').find((l) => l.startsWith(`checkpoint-${step} `))!;
    expect(row(3)).toMatch(/INVALID: optimizer\.safetensors does not match its sha256/);
    expect(row(3)).not.toMatch(/latest/);
    expect(row(2)).toMatch(/latest.*ok \(sha256 and content verified\)$/);
    expect(row(1)).toMatch(/size ok \(quick check; --full hashes\)$/);
    expect((await mgr.latest())?.step).toBe(2);
    const full = await listCheckpoints(tmp, true);
    expect(full).not.toMatch(/quick check/);
    expect(full.split('\n').filter((l) => l.endsWith('ok (sha256 and content verified)'))).toHaveLength(2);
  });

  test('random_states_0.json with a key removed and the manifest re-hashed: verify fails naming the key, latest skips it, loading refuses it', async () => {
    const mgr = new CheckpointManager(tmp);
    await saveSteps(mgr, [1, 2]);
    const dir = path.join(mgr.dir, 'checkpoint-2');
    editJson(path.join(dir, 'random_states_0.json'), (v) => delete v.data.sampler.position);
    rehash(dir);
    const e = await verifyCheckpoint(dir);
    expect(e.valid).toBe(false);
    expect(e.problem).toBe('random_states_0.json has invalid content: data.sampler.position: Required');
    const skipped: string[] = [];
    expect((await mgr.latest((x) => skipped.push(x.name)))?.step).toBe(1);
    expect(skipped).toEqual(['checkpoint-2']);
    expect(() => readStateFile(dir, 'random_states_0.json')).toThrow(/checkpoint-2: random_states_0\.json has invalid content: data\.sampler\.position: Required/);
    expect(readStateFile<{ data: { sampler: { position: number } } }>(path.join(mgr.dir, 'checkpoint-1'), 'random_states_0.json').data.sampler.position).toBe(2);
  });

  test.each([
    ['trainer_state.json', (v: Record<string, any>) => delete v.dataset, /trainer_state\.json has invalid content: dataset: Required/],
    ['trainer_state.json', (v: Record<string, any>) => (v.config.rank = 'four'), /trainer_state\.json has invalid content: config\.rank: Expected number/],
    ['optimizer.json', (v: Record<string, any>) => delete v.per_parameter_steps, /optimizer\.json has invalid content: per_parameter_steps: Required/],
    ['scheduler.json', (v: Record<string, any>) => (v.spec.kind = 'sawtooth'), /scheduler\.json has invalid content: spec: lr schedule: bad kind "sawtooth"/],
    ['scaler.json', (v: Record<string, any>) => (v.scale = -1), /scaler\.json has invalid content: scale: Number must be greater than 0/],
    ['random_states_0.json', (v: Record<string, any>) => delete v.torch.cpu, /random_states_0\.json has invalid content: torch: has no "cpu" generator state/],
    ['trainer_state.json', (v: Record<string, any>) => (v.position = 1), /random_states_0\.json's data cursor \(epoch 1, sample 2\) differs from trainer_state\.json's \(epoch 1, sample 1\)/],
    ['trainer_state.json', (v: Record<string, any>) => (v.global_step = 9), /trainer_state\.json says step 9, the manifest says 1/],
  ])('%s edited and re-hashed is found by verify', async (file, edit, problem) => {
    const mgr = new CheckpointManager(tmp);
    await saveSteps(mgr, [1]);
    const dir = path.join(mgr.dir, 'checkpoint-1');
    editJson(path.join(dir, file), edit);
    rehash(dir);
    expect((await verifyCheckpoint(dir)).problem).toMatch(problem);
  });

  test('a required state file dropped from the manifest is found by verify', async () => {
    const mgr = new CheckpointManager(tmp);
    await saveSteps(mgr, [1]);
    const dir = path.join(mgr.dir, 'checkpoint-1');
    fs.rmSync(path.join(dir, 'scaler.json'));
    rehash(dir, ['scaler.json']);
    expect((await verifyCheckpoint(dir)).problem).toBe('scaler.json is not in the manifest (a checkpoint needs it to resume)');
  });
});

describe('run lock', () => {
  const lockOf = (out: string): string => path.join(out, 'train-lora.lock');

  test('a lock whose pid now belongs to another process is stale: removed, and the run goes ahead', async () => {
    const out = path.join(tmp, 'run');
    fs.mkdirSync(path.join(out, 'checkpoints'), { recursive: true });
    // The parent process is alive, but it is not the process that took this lock: its start time differs.
    fs.writeFileSync(lockOf(out), JSON.stringify({ pid: process.ppid, host: os.hostname(), started: '2020-01-01T00:00:00.000Z', process_start: 'another-boot:1', command: 'node dist/cli.js' }));
    expect(inspectLock(lockOf(out))).toMatchObject({ status: 'stale', reason: expect.stringMatching(`pid ${process.ppid} now belongs to another process`) });
    expect(await listRuns(tmp)).toMatch(/run .* interrupted/);
    const lock = new RunLock(out);
    lock.acquire();
    expect(lock.staleRemoved).toMatch(/now belongs to another process/);
    const rec = JSON.parse(fs.readFileSync(lockOf(out), 'utf8'));
    expect(rec).toMatchObject({ pid: process.pid, host: os.hostname(), process_start: processIdentity(process.pid)!.start });
    expect(rec.process_start).toMatch(/:\d+$/);
    lock.release();
    expect(fs.existsSync(lockOf(out))).toBe(false);
  });

  test('a live holder is refused with the lock file, the holder and how to clear a stale lock; the same process cannot take it twice', async () => {
    const out = path.join(tmp, 'run');
    fs.mkdirSync(path.join(out, 'checkpoints'), { recursive: true });
    const id = processIdentity(process.ppid)!;
    fs.writeFileSync(lockOf(out), JSON.stringify({ pid: process.ppid, host: os.hostname(), started: '2020-01-01T00:00:00.000Z', process_start: id.start, command: id.command }));
    expect(inspectLock(lockOf(out))).toMatchObject({ status: 'live', verified: true });
    expect(await listRuns(tmp)).toMatch(/run .* running/);
    let msg = '';
    try {
      new RunLock(out).acquire();
    } catch (e) {
      msg = (e as Error).message;
    }
    expect(msg).toContain(`in use by another train-lora process (pid ${process.ppid}`);
    expect(msg).toContain(`lock file ${lockOf(out)}`);
    expect(msg).toContain(`delete ${lockOf(out)}`);
    expect(msg).toContain('started 2020-01-01T00:00:00.000Z');
    fs.rmSync(lockOf(out));
    const a = new RunLock(out);
    a.acquire();
    expect(() => new RunLock(out).acquire()).toThrow(/in use by another training in this process \(lock file .*train-lora\.lock\)/);
    a.release();
    // A lock of this pid that this process does not hold was left by an earlier process with the same pid.
    fs.writeFileSync(lockOf(out), JSON.stringify({ pid: process.pid, host: os.hostname() }));
    const b = new RunLock(out);
    b.acquire();
    expect(b.staleRemoved).toMatch(/left by an earlier process that had the same pid/);
    b.release();
  });
});

test('temporary files of killed exports are removed at start: only this program\'s names, only of dead processes', () => {
  const out = path.join(tmp, 'out');
  const put = (rel: string, dir = false): string => {
    const p = path.join(out, rel);
    fs.mkdirSync(dir ? p : path.dirname(p), { recursive: true });
    if (!dir) fs.writeFileSync(p, 'x');
    return p;
  };
  const dead = 999999;
  const stale = [
    `pytorch_lora_weights.safetensors.tmp-${dead}`,
    `lora_weights/adapter_model.safetensors.tmp-${dead}`,
    `lora_weights/adapter_config.json.tmp-${dead}`,
    `lora_weights/text_encoder/adapter_model.safetensors.tmp-${dead}`,
    `lora_kohya.safetensors.tmp-${dead}`,
    `my-lora.safetensors.tmp-${dead}`, // named by --out FILE (passed in)
  ];
  for (const f of stale) put(f);
  // A live pid, but the process started after the file was written: a reused pid.
  const reused = `lora_kohya.safetensors.tmp-${process.ppid}`;
  fs.utimesSync(put(reused), new Date('2000-01-01'), new Date('2000-01-01'));
  put(`final_pipeline.tmp-${dead}/unet`, true);
  put(`.tmp-unet-${dead}`, true);
  const keep = [
    `pytorch_lora_weights.safetensors.tmp-${process.ppid}`, // a live export
    'pytorch_lora_weights.safetensors.tmp-notes', // not ours
    `other.safetensors.tmp-${dead}`, // not a name we write
    'pytorch_lora_weights.safetensors',
    `lora_weights/my_notes.json.tmp-${dead}`,
  ];
  for (const f of keep) put(f);
  // A merged pipeline set aside by a replace that never finished goes back into place.
  put(`final_pipeline.old-${dead}/model_index.json`);
  const removed = cleanStaleExports(out, [path.join(out, 'my-lora.safetensors')]).map((p) => path.relative(out, p)).sort();
  expect(removed).toEqual([...stale, reused, `final_pipeline.tmp-${dead}`, `.tmp-unet-${dead}`].sort());
  for (const f of keep) expect(fs.existsSync(path.join(out, f))).toBe(true);
  expect(fs.existsSync(path.join(out, 'final_pipeline', 'model_index.json'))).toBe(true);
});
