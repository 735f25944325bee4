/**
 * VAE latents stay native: --cache-latents and the validation loss keep each image's posterior in a native latent
 * cache (native/train/latent_cache.h) and micro-batches name their items. A cached micro-batch must train exactly as
 * the same posterior handed over as tensors; the validation loss's fixed latents must be (mean + std·z) times the
 * loaded VAE's scaling_factor; masks travel with their items; bad item lists are errors; train() releases its caches.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { native, type HostTensor, type LatentCacheHandle, type PipelineHandle, type TrainBatch } from '../src/native';
import { NoiseSchedule } from '../src/schedules/noise';
import { fromFloat32, fromInt64, numel, toNumbers } from '../src/tensors';
import { CLIPTokenizer } from '../src/tokenizer';
import { TINY_MODEL, tinyRunConfig } from './helpers/tiny-run';
import { Quiet } from './helpers/quiet-reporter';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-latent-cache-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

const noise = NoiseSchedule.fromFile(path.join(TINY_MODEL, 'scheduler', 'scheduler_config.json'));
const tokenizer = CLIPTokenizer.fromFolder(path.join(TINY_MODEL, 'tokenizer'));
const wave = (n: number, seed: number): number[] => Array.from({ length: n }, (_, i) => Math.sin(i * 12.9898 + seed * 78.233));
const inputIds = (b: number): HostTensor =>
  fromInt64('input_ids', [b, 77], tokenizer.encodeBatch(['a red circle', 'a blue square', 'a green star'].slice(0, b), { padding: 'max_length' }).flat());
const pixels = (b: number, size: number, seed: number): HostTensor => fromFloat32('pixel_values', [b, 3, size, size], wave(b * 3 * size * size, seed).map((v) => 0.9 * v));

/** Rows of a [B, ...] float32 host tensor, stacked in the order given. */
function rows(t: HostTensor, which: number[]): HostTensor {
  const v = toNumbers(t);
  const per = numel(t.shape.slice(1));
  return fromFloat32(t.name, [which.length, ...t.shape.slice(1)], which.flatMap((r) => Array.from(v.subarray(r * per, (r + 1) * per))));
}

/** A fresh LoRA trainer (seed 7) on its own copy of `model` (a pipeline takes one trainer's adapters). */
async function withTrainer<T>(model: string, f: (step: (b: TrainBatch) => Promise<number>, evalLoss: (b: TrainBatch) => Promise<number>) => Promise<T>): Promise<T> {
  const n = native();
  const pipe = await n.loadPipeline(model);
  const { trainer } = await n.createTrainer(pipe, { rank: 4, alpha: 4, alphasCumprod: Array.from(noise.alphasCumprod), seed: 7 });
  try {
    return await f((b) => n.trainerMicroStep(trainer, b), (b) => n.trainerEvalLoss(trainer, b));
  } finally {
    n.dispose(trainer);
    n.dispose(pipe);
  }
}

describe('a native latent cache', () => {
  let pipe: PipelineHandle;
  let cache: LatentCacheHandle;
  let mean: HostTensor;
  let std: HostTensor;
  beforeAll(async () => {
    pipe = await native().loadPipeline(TINY_MODEL);
    cache = native().latentCacheCreate(pipe);
    const px = pixels(3, 16, 1);
    // Items are dataset indices, in any order and with gaps. (The tiny VAE halves the size.)
    expect(await native().latentCacheEncode(cache, [5, 2, 9], px)).toEqual([4, 8, 8]);
    [mean, std] = await native().vaeEncode(pipe, px);
  }, 60000);
  afterAll(() => {
    native().dispose(cache);
    native().dispose(pipe);
  });

  test('a cached micro-batch trains exactly as the same posterior given as tensors, rows in the order of its items', async () => {
    const run = (b: TrainBatch) => withTrainer(TINY_MODEL, async (step) => [await step(b), await step(b)]);
    const cached = await run({ cached: { cache, items: [9, 5] }, inputIds: inputIds(2) });
    const direct = await run({ latentMean: rows(mean, [2, 0]), latentStd: rows(std, [2, 0]), inputIds: inputIds(2) });
    expect(cached).toEqual(direct);
    // The items decide the rows: the other order is another batch.
    const swapped = await run({ cached: { cache, items: [5, 9] }, inputIds: inputIds(2) });
    expect(swapped).toEqual(await run({ latentMean: rows(mean, [0, 2]), latentStd: rows(std, [0, 2]), inputIds: inputIds(2) }));
    expect(swapped[0]).not.toBe(cached[0]);
  }, 60000);

  test('bad item lists are errors naming the item', async () => {
    await withTrainer(TINY_MODEL, async (step) => {
      await expect(step({ cached: { cache, items: [5, 7] }, inputIds: inputIds(2) })).rejects.toThrow(/latent cache: item 7 was not encoded/);
      await expect(step({ cached: { cache, items: [] }, inputIds: inputIds(1) })).rejects.toThrow(/at least one item/);
    });
    const other = native().latentCacheCreate(pipe);
    try {
      await native().latentCacheEncode(other, [0], pixels(1, 16, 2));
      await native().latentCacheEncode(other, [1], pixels(1, 8, 3));
      await withTrainer(TINY_MODEL, async (step) => {
        await expect(step({ cached: { cache: other, items: [0, 1] }, inputIds: inputIds(2) })).rejects.toThrow(/items 0 and 1 have different latent sizes/);
      });
      await expect(native().latentCacheEncode(other, [0, 1], pixels(1, 16, 2))).rejects.toThrow(/one row per item/);
    } finally {
      native().dispose(other);
    }
    expect(() => native().latentCacheEncode(pipe as unknown as LatentCacheHandle, [0], pixels(1, 16, 2))).toThrow(/expected a LatentCache handle/);
  }, 60000);

  test('masks travel with their items; a batch mixing masked and unmasked items is refused', async () => {
    const masked = native().latentCacheCreate(pipe);
    try {
      const m = fromFloat32('loss_mask', [2, 1, 8, 8], Array.from({ length: 128 }, (_, i) => (i % 3) / 2));
      await native().latentCacheEncode(masked, [0, 1], pixels(2, 16, 4), m);
      const [mu, sd] = await native().vaeEncode(pipe, pixels(2, 16, 4));
      const run = (b: TrainBatch) => withTrainer(TINY_MODEL, (step) => step(b));
      const cached = await run({ cached: { cache: masked, items: [1, 0] }, inputIds: inputIds(2) });
      expect(cached).toBe(await run({ latentMean: rows(mu, [1, 0]), latentStd: rows(sd, [1, 0]), lossMask: rows(m, [1, 0]), inputIds: inputIds(2) }));
      expect(cached).not.toBe(await run({ latentMean: rows(mu, [1, 0]), latentStd: rows(sd, [1, 0]), inputIds: inputIds(2) }));
      await native().latentCacheEncode(masked, [2], pixels(1, 16, 5));
      await expect(run({ cached: { cache: masked, items: [0, 2] }, inputIds: inputIds(2) })).rejects.toThrow(/some items of a micro-batch have a loss mask/);
      await expect(native().latentCacheEncode(masked, [3], pixels(1, 16, 5), fromFloat32('loss_mask', [1, 1, 4, 4], new Array(16).fill(1)))).rejects.toThrow(
        /lossMask must be \[B,1,h,w\] at the latent size/,
      );
    } finally {
      native().dispose(masked);
    }
  }, 60000);
});

describe('validation latents are scaled natively by the loaded VAE', () => {
  // A copy of the tiny model whose VAE says scaling_factor 0.5: the factor must come from the VAE that is loaded.
  const model = path.join(tmp, 'tiny-sf');
  beforeAll(() => {
    fs.cpSync(TINY_MODEL, model, { recursive: true });
    const f = path.join(model, 'vae', 'config.json');
    fs.writeFileSync(f, JSON.stringify({ ...JSON.parse(fs.readFileSync(f, 'utf8')), scaling_factor: 0.5 }));
  });

  test('fixed latents are (mean + std·z)·scaling_factor, fixed noise is used as given', async () => {
    const pipe = await native().loadPipeline(model);
    const cache = native().latentCacheCreate(pipe);
    try {
      const px = pixels(2, 16, 6);
      await native().latentCacheEncode(cache, [0, 1], px);
      const [mu, sd] = await native().vaeEncode(pipe, px);
      const z = fromFloat32('z', [2, 4, 8, 8], wave(512, 7));
      const nz = fromFloat32('noise', [2, 4, 8, 8], wave(512, 8));
      await native().latentCacheFix(cache, [0, 1], z, nz);
      const [m, s, zz] = [toNumbers(mu), toNumbers(sd), toNumbers(z)];
      const latents = (sf: number) => fromFloat32('latents', [2, 4, 8, 8], Array.from(m, (v, j) => (v + s[j] * zz[j]) * sf));
      const timesteps = fromInt64('timesteps', [2], [17, 503]);
      await withTrainer(model, async (_step, evalLoss) => {
        const cached = await evalLoss({ cached: { cache, items: [0, 1] }, timesteps, inputIds: inputIds(2) });
        expect(cached).toBe(await evalLoss({ latents: latents(0.5), noise: nz, timesteps, inputIds: inputIds(2) }));
        expect(cached).not.toBe(await evalLoss({ latents: latents(0.18215), noise: nz, timesteps, inputIds: inputIds(2) }));
      });
      await expect(native().latentCacheFix(cache, [0], z, nz)).rejects.toThrow(/z and noise must be \[B,C,h,w\]/);
    } finally {
      native().dispose(cache);
      native().dispose(pipe);
    }
  }, 60000);
});

test('train() with --cache-latents and a validation split releases its latent caches', async () => {
  const { makeDemoData } = await import('../src/data/demo-data');
  const { train } = await import('../src/train/train');
  const data = path.join(tmp, 'data');
  await makeDemoData(data, { count: 6, size: 32, seed: 3 });
  const before = native().liveHandles().LatentCache ?? 0;
  const rep = new Quiet();
  await train(
    tinyRunConfig(path.join(tmp, 'run'), data, { max_train_steps: 2, cache_latents: true, center_crop: true, validation_split: 0.34, validation_steps: 1 }),
    rep,
    { installSignalHandlers: false },
  );
  expect(rep.messages.some((m) => /val_loss: 2 held-out images encoded/.test(m))).toBe(true);
  expect(rep.messages.some((m) => /validation at step 2: val_loss \d/.test(m))).toBe(true);
  expect(native().liveHandles().LatentCache ?? 0).toBe(before);
}, 120000);
