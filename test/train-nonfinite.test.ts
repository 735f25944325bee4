/**
 * A diverging run (tiny model, CPU, fp32): a step with a non-finite loss or gradients is skipped (weights, AdamW and
 * the LR schedule untouched), counted and logged; --max-nonfinite-steps in a row stop the run with the last good state
 * saved; non-finite weights are never written to a checkpoint.
 *
 * The fp32 skip is the native optimizer step's (Trainer::optimizer_step: `skipped` + `nonFinite` in every precision);
 * with an addon built before it, the first two tests fail (the NaN update is applied and the run stops without saving).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { CheckpointManager } from '../src/checkpoint/manager';
import { makeDemoData } from '../src/data/demo-data';
import { native, type HostTensor, type TrainBatch } from '../src/native';
import { toNumbers } from '../src/tensors';
import { assertFiniteWeights, DivergedError, train, type TrainerStateFile } from '../src/train/train';
import { Quiet } from './helpers/quiet-reporter';
import { tinyRunConfig } from './helpers/tiny-run';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-nonfinite-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
const data = path.join(tmp, 'data');
const cfg = (out: string, over: Record<string, unknown> = {}) => tinyRunConfig(out, data, { mixed_precision: 'no', lr_scheduler: 'linear', ...over });

const nanLike = (t: HostTensor): HostTensor => {
  const v = new Float32Array(t.data.slice().buffer);
  v[0] = NaN;
  v[1] = Infinity;
  return { ...t, dtype: 'F32', data: new Uint8Array(v.buffer) };
};
/** Puts NaN/inf into the pixels of the given optimizer steps. */
const poison = (bad: (step: number) => boolean) => (step: number, b: TrainBatch) => (bad(step) ? { ...b, pixelValues: nanLike(b.pixelValues!) } : b);

async function weights(ckpt: string): Promise<Map<string, Float64Array>> {
  const { tensors } = await native().safetensorsRead(path.join(ckpt, 'model.safetensors'));
  return new Map(tensors.map((t) => [t.name, toNumbers(t)]));
}
const allFinite = (w: Map<string, Float64Array>) => [...w.values()].every((v) => v.every(Number.isFinite));

beforeAll(async () => {
  await makeDemoData(data, { count: 8, size: 32, seed: 4 });
});

test('fp32: non-finite steps are skipped (weights, AdamW and the LR schedule held), counted and logged; the run finishes finite', async () => {
  const out = path.join(tmp, 'skip');
  const rep = new Quiet();
  const r = await train(cfg(out, { max_train_steps: 5, checkpointing_steps: 5 }), rep, { installSignalHandlers: false, batchHook: poison((s) => s === 2 || s === 3) });
  expect(r.finished).toBe(true);
  expect(rep.steps.map((m) => m.skipped)).toEqual([false, true, true, false, false]);
  const lrs = rep.steps.map((m) => m.lr);
  expect([lrs[2], lrs[3]]).toEqual([lrs[1], lrs[1]]); // the schedule held over the skipped steps
  const all = rep.messages.join('\n');
  expect(all).toMatch(/step 2: non-finite loss \(NaN\): update skipped \(weights and AdamW state unchanged\) and the LR schedule held \(1 in a row, 1 in all; the run stops after --max-nonfinite-steps 10 in a row\)/);
  expect(all).toMatch(/step 3: non-finite loss \(NaN\): .*\(2 in a row, 2 in all/);
  const ck = path.join(out, 'checkpoints', 'checkpoint-5');
  const ts = JSON.parse(fs.readFileSync(path.join(ck, 'trainer_state.json'), 'utf8')) as TrainerStateFile;
  expect([ts.nonfinite_steps, ts.last_good_step, ts.scheduler_steps, ts.train_loss !== null && Number.isFinite(ts.train_loss)]).toEqual([2, 5, 3, true]);
  expect(allFinite(await weights(ck))).toBe(true);
  const lora = (await native().safetensorsRead(path.join(out, 'pytorch_lora_weights.safetensors'))).tensors;
  expect(lora.every((t) => toNumbers(t).every(Number.isFinite))).toBe(true);
}, 300000);

test('fp32: --max-nonfinite-steps in a row stop the run with a clear message, the last good weights saved and nothing exported', async () => {
  const out = path.join(tmp, 'diverged');
  const rep = new Quiet();
  const err = await train(cfg(out, { max_train_steps: 8, checkpointing_steps: 1, checkpoints_total_limit: 10, max_nonfinite_steps: 3 }), rep, {
    installSignalHandlers: false,
    batchHook: poison((s) => s >= 2),
  }).then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(DivergedError);
  const e = err as DivergedError;
  expect(e.message).toMatch(/stopped at step 4: 3 optimizer steps in a row \(steps 2-4\) had a non-finite loss or gradients \(--max-nonfinite-steps 3\)/);
  expect(e.message).toMatch(/the weights are those of step 1, the last good step; saved in .*checkpoint-4\. The run is diverging: lower --learning-rate/);
  expect(e.checkpoint).toBe(path.join(out, 'checkpoints', 'checkpoint-4'));
  const list = await new CheckpointManager(out).list('quick');
  expect(list.map((c) => [c.step, c.manifest?.reason])).toEqual([
    [4, 'nonfinite'],
    [3, 'interval'],
    [2, 'interval'],
    [1, 'interval'],
  ]);
  // checkpoint-4 holds exactly step 1's weights: none of the NaN updates reached them.
  const good = await weights(path.join(out, 'checkpoints', 'checkpoint-1'));
  const last = await weights(path.join(out, 'checkpoints', 'checkpoint-4'));
  expect(allFinite(last)).toBe(true);
  for (const [k, v] of good) expect([k, Buffer.from(last.get(k)!.buffer).equals(Buffer.from(v.buffer))]).toEqual([k, true]);
  const ts = JSON.parse(fs.readFileSync(path.join(out, 'checkpoints', 'checkpoint-4', 'trainer_state.json'), 'utf8')) as TrainerStateFile;
  expect([ts.last_good_step, ts.nonfinite_steps]).toEqual([1, 3]);
  expect(fs.existsSync(path.join(out, 'pytorch_lora_weights.safetensors'))).toBe(false);
}, 300000);

test('a weights file with NaN or inf is refused before it becomes a checkpoint', async () => {
  const file = path.join(tmp, 'nan.safetensors');
  const v = new Float32Array([1, 2, NaN, 4]);
  await native().safetensorsWrite(file, [{ name: 'a.lora_A.weight', dtype: 'F32', shape: [2, 2], data: new Uint8Array(v.buffer) }]);
  await expect(assertFiniteWeights(file, 7)).rejects.toThrow(/checkpoint-7 not saved: a\.lora_A\.weight holds non-finite values \(NaN\); earlier checkpoints are intact/);
  const ok = path.join(tmp, 'ok.safetensors');
  await native().safetensorsWrite(ok, [{ name: 'a.lora_A.weight', dtype: 'F32', shape: [2, 2], data: new Uint8Array(new Float32Array([1, 2, 3, 4]).buffer) }]);
  await expect(assertFiniteWeights(ok, 7)).resolves.toBeUndefined();
});
