/**
 * One run per output folder, and what a resume takes over (tiny model, CPU): a second run never mixes with or deletes
 * an earlier run's checkpoints, `latest` never picks between two runs, a diffusers/accelerate output folder is
 * imported without touching its files, resume-time option changes are applied and logged or refused, folders that
 * are no checkpoint are named, and --checkpointing-minutes saves by the (injected) clock.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { CheckpointManager } from '../src/checkpoint/manager';
import { makeDemoData } from '../src/data/demo-data';
import { native } from '../src/native';
import { train, type TrainerStateFile } from '../src/train/train';
import { Quiet } from './helpers/quiet-reporter';
import { TINY_MODEL, tinyRunConfig } from './helpers/tiny-run';
import { tinyUnetOut } from './helpers/tiny-unet';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-runs-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
const data = path.join(tmp, 'data');
const cfg = (out: string, over: Record<string, unknown> = {}) => tinyRunConfig(out, data, over);
const noSignals = { installSignalHandlers: false } as const;
const state = (ckpt: string): TrainerStateFile => JSON.parse(fs.readFileSync(path.join(ckpt, 'trainer_state.json'), 'utf8')) as TrainerStateFile;
const steps = async (out: string) => (await new CheckpointManager(out).list('quick')).map((e) => e.step);
const sha = (f: string) => createHash('sha256').update(fs.readFileSync(f)).digest('hex');

/** sha256 of every file under a folder, by relative path. */
function hashes(dir: string): Record<string, string> {
  const out: Record<string, string> = {};
  const walk = (d: string) => {
    for (const n of fs.readdirSync(d)) {
      const p = path.join(d, n);
      if (fs.statSync(p).isDirectory()) walk(p);
      else out[path.relative(dir, p)] = sha(p);
    }
  };
  walk(dir);
  return out;
}

/** A run of 4 steps (checkpoints 2 and 4, LoRA exported) in `out`. */
async function firstRun(out: string): Promise<void> {
  const r = await train(cfg(out), new Quiet(), noSignals);
  expect(r.finished).toBe(true);
}

beforeAll(async () => {
  await makeDemoData(data, { count: 8, size: 32, seed: 1 });
});

describe('a second run in a folder that holds another run', () => {
  const out = path.join(tmp, 'two-runs');
  beforeAll(() => firstRun(out), 300000);

  test('is refused, offering to resume, another --output-dir or --overwrite-output-dir; the earlier run is untouched', async () => {
    const before = hashes(out);
    const err = await train(cfg(out, { max_train_steps: 6 }), new Quiet(), noSignals).then(
      () => null,
      (e: Error) => e.message,
    );
    expect(err).toMatch(/already holds the work of an earlier run: checkpoints\/ \(checkpoint-2, checkpoint-4; run \w+\), pytorch_lora_weights\.safetensors/);
    expect(err).toMatch(/add --resume-from-checkpoint latest/);
    expect(err).toMatch(/--output-dir OTHER_FOLDER/);
    expect(err).toMatch(/add --overwrite-output-dir \(the earlier run's files are moved to .*previous.*nothing is deleted\)/);
    const after = hashes(out);
    delete after['logs/train.log'];
    delete before['logs/train.log'];
    expect(after).toEqual(before);
  }, 300000);

  test('--overwrite-output-dir moves the earlier run aside (and says where); the new run keeps its own checkpoints under its own run id', async () => {
    const oldId = state(path.join(out, 'checkpoints', 'checkpoint-4')).run_id;
    expect(oldId).toMatch(/^\w+$/);
    const oldLora = sha(path.join(out, 'pytorch_lora_weights.safetensors'));
    const rep = new Quiet();
    await train(cfg(out, { max_train_steps: 2, overwrite_output_dir: true }), rep, noSignals);
    const moved = rep.messages.find((m) => /--overwrite-output-dir: moved the earlier run's/.test(m));
    expect(moved).toMatch(/checkpoints\/ \(checkpoint-2, checkpoint-4; run \w+\), pytorch_lora_weights\.safetensors, lora_weights .*to .*previous.*nothing was deleted/);
    const prev = fs.readdirSync(path.join(out, 'previous'));
    expect(prev.length).toBe(1);
    const aside = path.join(out, 'previous', prev[0]);
    expect(sha(path.join(aside, 'pytorch_lora_weights.safetensors'))).toBe(oldLora);
    expect(await steps(aside)).toEqual([4, 2]);
    // The new run saved checkpoint-2 and nothing deleted it ("saved checkpoint-2 ... removed checkpoint-2" before).
    expect(await steps(out)).toEqual([2]);
    expect(state(path.join(out, 'checkpoints', 'checkpoint-2')).run_id).not.toBe(oldId);
    expect(rep.messages.join('\n')).not.toMatch(/removed checkpoint-2/);
  }, 300000);

  test('"latest" refuses to pick between the checkpoints of two runs in one folder', async () => {
    const aside = path.join(out, 'previous', fs.readdirSync(path.join(out, 'previous'))[0]);
    fs.cpSync(path.join(aside, 'checkpoints', 'checkpoint-4'), path.join(out, 'checkpoints', 'checkpoint-4'), { recursive: true });
    try {
      await expect(train(cfg(out, { max_train_steps: 6, resume_from_checkpoint: 'latest' }), new Quiet(), noSignals)).rejects.toThrow(
        /holds the checkpoints of 2 different runs .*cannot tell which run to continue\. Pass the checkpoint to continue/,
      );
    } finally {
      fs.rmSync(path.join(out, 'checkpoints', 'checkpoint-4'), { recursive: true, force: true });
    }
  }, 300000);
});

describe('a diffusers/accelerate output folder', () => {
  /** OUT/checkpoint-4/{pytorch_lora_weights.safetensors, optimizer.bin, scheduler.bin, random_states_0.pkl} and OUT/pytorch_lora_weights.safetensors, as diffusers' script leaves them. */
  async function diffusersFolder(out: string, lora: string): Promise<void> {
    const ck = path.join(out, 'checkpoint-4');
    fs.mkdirSync(ck, { recursive: true });
    const { tensors, metadata } = await native().safetensorsRead(lora);
    const theirs = Object.fromEntries(Object.entries(metadata).filter(([k]) => !k.startsWith('train_lora.')));
    await native().safetensorsWrite(path.join(ck, 'pytorch_lora_weights.safetensors'), tensors, theirs);
    await native().safetensorsWrite(path.join(out, 'pytorch_lora_weights.safetensors'), tensors, theirs);
    for (const f of ['optimizer.bin', 'scheduler.bin', 'random_states_0.pkl']) fs.writeFileSync(path.join(ck, f), `pickle bytes that must never be read: ${f}`);
  }
  const source = path.join(tmp, 'lora-source');
  beforeAll(() => firstRun(source), 300000);

  test('--resume-from-checkpoint latest imports the LoRA and step N, says what restarts, and touches none of its files', async () => {
    const out = path.join(tmp, 'diffusers-out');
    await diffusersFolder(out, path.join(source, 'pytorch_lora_weights.safetensors'));
    const before = hashes(out);
    const rep = new Quiet();
    const r = await train(cfg(out, { max_train_steps: 6, lr_scheduler: 'linear', resume_from_checkpoint: 'latest' }), rep, noSignals);
    expect(r.finished).toBe(true);
    const all = rep.messages.join('\n');
    expect(all).not.toMatch(/starting a new run/);
    expect(all).toMatch(/imported .*checkpoint-4 \(a diffusers\/accelerate checkpoint of step 4\): the LoRA weights of \d+ modules from pytorch_lora_weights\.safetensors/);
    expect(all).toMatch(/Not loaded: optimizer\.bin, random_states_0\.pkl, scheduler\.bin \(pickles, which train-lora never loads\)\. So the AdamW moments restart from zero, the LR schedule continues from step 4/);
    expect(all).toMatch(/the random generators and the data order restart/);
    // Steps 5 and 6, on the linear schedule at scheduler steps 4 and 5 of 6.
    expect(rep.steps.map((m) => m.step)).toEqual([5, 6]);
    expect(rep.steps[0].lr).toBeCloseTo(1e-3 * (2 / 6), 12);
    // train-lora's checkpoints beside the diffusers ones; the diffusers files are byte-identical.
    const ts = state(path.join(out, 'checkpoints', 'checkpoint-6'));
    expect(ts.imported_from).toEqual({ path: path.join(out, 'checkpoint-4'), format: 'diffusers', step: 4 });
    const after = hashes(out);
    for (const [f, h] of Object.entries(before)) expect([f, after[f]]).toEqual([f, h]);
    // The final LoRA does not replace the diffusers run's OUT/pytorch_lora_weights.safetensors.
    expect(all).toMatch(/pytorch_lora_weights\.safetensors: not written by train-lora .*left as it is; this run's LoRA goes to .*exports\/checkpoint-6/);
    expect(r.loraFiles).toContain(path.join(out, 'exports', 'checkpoint-6', 'pytorch_lora_weights.safetensors'));
  }, 300000);

  test('the imported weights are the diffusers checkpoint\'s (a resume at step N = max steps exports them unchanged)', async () => {
    const out = path.join(tmp, 'diffusers-same');
    await diffusersFolder(out, path.join(source, 'pytorch_lora_weights.safetensors'));
    const r = await train(cfg(out, { max_train_steps: 4, resume_from_checkpoint: path.join(out, 'checkpoint-4') }), new Quiet(), noSignals);
    expect(r.globalStep).toBe(4);
    const exported = path.join(out, 'exports', 'checkpoint-4', 'pytorch_lora_weights.safetensors');
    expect((await tinyUnetOut(exported)).equals(await tinyUnetOut(path.join(out, 'checkpoint-4', 'pytorch_lora_weights.safetensors')))).toBe(true);
  }, 300000);

  test('a diffusers checkpoint of another rank is refused naming --rank', async () => {
    const out = path.join(tmp, 'diffusers-rank');
    await diffusersFolder(out, path.join(source, 'pytorch_lora_weights.safetensors'));
    await expect(train(cfg(out, { rank: 8, resume_from_checkpoint: 'latest' }), new Quiet(), noSignals)).rejects.toThrow(/--rank is 8, but the LoRA in pytorch_lora_weights\.safetensors has rank 4: pass --rank 4/);
  }, 300000);
});

describe('options changed on resume', () => {
  const out = path.join(tmp, 'changes');
  beforeAll(async () => {
    const r = await train(cfg(out, { lr_scheduler: 'linear' }), new Quiet(), { ...noSignals, stopAtStep: 2 });
    expect(r.globalStep).toBe(2);
  }, 300000);

  test('a different --seed is refused naming the flag', async () => {
    await expect(train(cfg(out, { lr_scheduler: 'linear', seed: 6, resume_from_checkpoint: 'latest' }), new Quiet(), noSignals)).rejects.toThrow(/cannot resume from .*checkpoint-2:\n {2}- --seed was 5, now 6/);
  }, 300000);

  test('schedule, batch and other changes are applied and logged, each naming its flag', async () => {
    const rep = new Quiet();
    await train(cfg(out, { lr_scheduler: 'linear', lr_warmup_steps: 3, train_batch_size: 2, adam_beta1: 0.8, resume_from_checkpoint: 'latest' }), rep, noSignals);
    const all = rep.messages.join('\n');
    expect(all).toMatch(/the LR schedule changed on resume \(--lr-warmup-steps 0 -> 3\): continuing at scheduler step 2 of the new schedule/);
    expect(all).toMatch(/resuming a checkpoint made with --train-batch-size 4 -> 2: the global batch is now 2 \(was 4\)/);
    expect(all).toMatch(/options changed since checkpoint-2, applied from step 3: --adam-beta1 0\.9 -> 0\.8/);
    // The new schedule: warmup 3 of 4 steps, at scheduler step 2 -> 2/3 of the LR (the old one gave 1/2).
    expect(rep.steps[0].lr).toBeCloseTo(1e-3 * (2 / 3), 12);
    expect(rep.steps.map((m) => m.samplesSeen)).toEqual([10, 12]);
  }, 300000);
});

describe('what --resume-from-checkpoint and --output-dir name', () => {
  test('a folder that is no checkpoint is described, with what a checkpoint looks like', async () => {
    const junk = path.join(tmp, 'junk');
    fs.mkdirSync(junk, { recursive: true });
    fs.writeFileSync(path.join(junk, 'notes.txt'), 'x');
    const msg = (p: string) =>
      train(cfg(path.join(tmp, 'no-ckpt'), { resume_from_checkpoint: p }), new Quiet(), noSignals).then(
        () => '',
        (e: Error) => e.message,
      );
    const a = await msg(junk);
    expect(a).toMatch(/junk is not a checkpoint \(it holds notes\.txt\)\. A train-lora checkpoint is a folder OUT\/checkpoints\/checkpoint-<step>\/ holding model\.safetensors, .*manifest\.json/);
    expect(a).not.toMatch(/the save did not finish/);
    expect(await msg(TINY_MODEL)).toMatch(/tiny is a model folder \(a diffusers pipeline\), not a checkpoint/);
    expect(await msg(path.join(junk, 'notes.txt'))).toMatch(/notes\.txt is a file, not a checkpoint folder/);
  }, 300000);

  test('an --output-dir that is a file is named, with the fix', async () => {
    const file = path.join(tmp, 'a-file');
    fs.writeFileSync(file, 'x');
    await expect(train(cfg(file), new Quiet(), noSignals)).rejects.toThrow(/--output-dir .*a-file: .*a-file is a file, not a folder\. Pass a folder for the run/);
    await expect(train(cfg(path.join(file, 'sub')), new Quiet(), noSignals)).rejects.toThrow(/a-file is a file, so the folder .*a-file\/sub cannot be created inside it/);
  });
});

test('--checkpointing-minutes saves by wall-clock time as well as by steps, with reason "time"', async () => {
  const out = path.join(tmp, 'minutes');
  // A step takes 40 s on this clock: 60 s have passed at steps 2 and 4 (counted from the last save).
  let clock = 0;
  const rep = new Quiet();
  await train(cfg(out, { max_train_steps: 5, checkpointing_steps: 100, checkpointing_minutes: 1, checkpoints_total_limit: 10 }), rep, {
    ...noSignals,
    now: () => clock,
    batchHook: (step, b) => {
      clock = step * 40_000;
      return b;
    },
  });
  const list = await new CheckpointManager(out).list('quick');
  expect(list.map((e) => [e.step, e.manifest?.reason])).toEqual([
    [5, 'final'],
    [4, 'time'],
    [2, 'time'],
  ]);
}, 300000);
