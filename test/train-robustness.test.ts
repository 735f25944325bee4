/**
 * The training loop when things go wrong on the tiny model (CPU): an image that stops loading mid-run (the last
 * completed step is saved and the resumed run ends bit-identical), a save refused for disk space before the next step
 * trains, temporary files of a killed export removed at start.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { CheckpointManager } from '../src/checkpoint/manager';
import { loadDataset } from '../src/data/dataset';
import { makeDemoData } from '../src/data/demo-data';
import { SampleOrder } from '../src/data/sampler';
import { train } from '../src/train/train';
import { Quiet } from './helpers/quiet-reporter';
import { tinyRunConfig } from './helpers/tiny-run';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-robust-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
const data = path.join(tmp, 'data');
const SEED = 5;

beforeAll(async () => {
  await makeDemoData(data, { count: 12, size: 40, seed: 2 });
});

// 12 images, batch 2: 6 micro-batches per epoch; accumulation 2: optimizer steps of 2 micro-batches.
const over = { train_batch_size: 2, gradient_accumulation_steps: 2, max_train_steps: 6, checkpointing_steps: 100, random_flip: true, seed: SEED };

test('an image that stops loading in the middle of a step: the last completed step is saved, and the resumed run ends bit-identical', async () => {
  const straight = path.join(tmp, 'straight');
  const ref = new Quiet();
  expect((await train(tinyRunConfig(straight, data, over), ref, { installSignalHandlers: false })).finished).toBe(true);

  // The image of epoch 0's 6th micro-batch (the 2nd micro-batch of step 3): damaged while step 1 trains, before the
  // loader (2 batches ahead) has read it, so step 3 fails after its first micro-batch ran.
  const ds = await loadDataset(data);
  const order = new SampleOrder(ds.items.length, { seed: SEED });
  let sixth: number[] = [];
  for (let i = 0; i < 6; i++) sixth = order.nextBatch(2).indices;
  const victim = ds.items[sixth[0]].path;
  const original = fs.readFileSync(victim);
  const out = path.join(tmp, 'broken');
  const rep = new Quiet();
  let err: (Error & { code?: string }) | undefined;
  try {
    await train(tinyRunConfig(out, data, over), rep, {
      installSignalHandlers: false,
      batchHook: (step, b) => {
        if (step === 1) fs.writeFileSync(victim, Buffer.from('overwritten while training'));
        return b;
      },
    });
  } catch (e) {
    err = e as Error;
  } finally {
    fs.writeFileSync(victim, original);
  }
  expect(err?.code).toBe('EDATA');
  expect(err?.message).toContain(`failed to load training image ${victim}`);
  expect(err?.message).toMatch(/Training stopped at step 2; saved .*checkpoint-2, the last completed step \(2\)/);
  expect(rep.steps.map((s) => s.step)).toEqual([1, 2]);
  const latest = await new CheckpointManager(out).latest();
  expect([latest?.step, latest?.manifest?.reason]).toEqual([2, 'data-error']);

  const rest = new Quiet();
  const r = await train(tinyRunConfig(out, data, { ...over, resume_from_checkpoint: 'latest' }), rest, { installSignalHandlers: false });
  expect(r.finished).toBe(true);
  expect([...rep.steps, ...rest.steps].map((s) => s.loss)).toEqual(ref.steps.map((s) => s.loss));
  expect(fs.readFileSync(path.join(out, 'pytorch_lora_weights.safetensors')).equals(fs.readFileSync(path.join(straight, 'pytorch_lora_weights.safetensors')))).toBe(true);
}, 600000);

test('a save refused for disk space stops the run before the next step trains; temporary files of a killed export are removed at start', async () => {
  const out = path.join(tmp, 'full-disk');
  fs.mkdirSync(path.join(out, 'lora_weights'), { recursive: true });
  const leftovers = ['pytorch_lora_weights.safetensors.tmp-999999', path.join('lora_weights', 'adapter_model.safetensors.tmp-999999')];
  for (const f of leftovers) fs.writeFileSync(path.join(out, f), 'partial');
  const mgr = new CheckpointManager(out);
  // Plenty of space for the first checkpoint, then 100 KiB: less than the next one needs.
  const freeBytes = (): number => (fs.existsSync(path.join(mgr.dir, 'checkpoint-2')) ? 100 * 1024 : 1e12);
  const rep = new Quiet();
  const err = await train(tinyRunConfig(out, data, { ...over, checkpointing_steps: 2 }), rep, { installSignalHandlers: false, freeBytes }).then(
    () => undefined,
    (e: Error & { code?: string }) => e,
  );
  expect(err?.code).toBe('ENOSPC');
  expect(err?.message).toMatch(/for checkpoint-4: 100\.0 KiB free, .* needed \(the last checkpoint's size, .*, plus 10 % and 64\.0 KiB margin/);
  expect(rep.steps.map((s) => s.step)).toEqual([1, 2, 3, 4]); // no step 5 trained and lost
  expect((await mgr.list()).map((e) => e.step)).toEqual([2]);
  for (const f of leftovers) expect(fs.existsSync(path.join(out, f))).toBe(false);
  expect(fs.existsSync(path.join(out, 'lora_weights'))).toBe(false); // created by the killed export, empty now
  expect(rep.messages.filter((m) => m.startsWith('removed a temporary file of an interrupted export'))).toHaveLength(2);
}, 600000);
