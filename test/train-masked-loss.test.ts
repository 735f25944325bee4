/**
 * --masked-loss in the native loss (trainer.cpp loss_for): the per-element squared error times the latent-size mask,
 * averaged over all elements (kohya's apply_masked_loss then loss.mean()). Checked by hand on the tiny model with
 * fixed latents, noise and timesteps: one-hot masks give each latent cell's share of the loss; those shares add up
 * to the unmasked loss, and any mask's loss is the mask-weighted sum of the shares.
 */
import * as path from 'node:path';

import { native, type PipelineHandle, type TrainBatch, type TrainerHandle } from '../src/native';
import { fromFloat32, fromInt64 } from '../src/tensors';
import { derive } from '../src/data/prng';

const tiny = path.join(__dirname, 'fixtures', 'models', 'tiny');
let pipe: PipelineHandle;
let trainer: TrainerHandle;
const B = 2;
const C = 4;
const H = 4;
const W = 6;
const cells = H * W;

function floats(seed: number, n: number): Float32Array {
  const r = derive(seed, 1);
  return Float32Array.from({ length: n }, () => r.nextFloat() * 2 - 1);
}

beforeAll(async () => {
  pipe = await native().loadPipeline(tiny, { components: ['unet', 'text_encoder'] });
  const alphas = Array.from({ length: 1000 }, (_, t) => 1 - (t + 1) / 1001);
  ({ trainer } = await native().createTrainer(pipe, { rank: 4, alpha: 4, alphasCumprod: alphas, init: 'gaussian', seed: 3 }));
});
afterAll(() => {
  native().dispose(trainer);
  native().dispose(pipe);
});

function batch(mask?: Float32Array): TrainBatch {
  const b: TrainBatch = {
    latents: fromFloat32('latents', [B, C, H, W], floats(1, B * C * cells)),
    noise: fromFloat32('noise', [B, C, H, W], floats(2, B * C * cells)),
    timesteps: fromInt64('timesteps', [B], [100, 700]),
    inputIds: fromInt64('input_ids', [B, 77], [...Array(77).fill(5), ...Array(77).fill(7)]),
  };
  if (mask) b.lossMask = fromFloat32('loss_mask', [B, 1, H, W], mask);
  return b;
}

test('masked loss = sum over cells of mask x that cell\'s share of the unmasked loss', async () => {
  const plain = await native().trainerEvalLoss(trainer, batch());
  expect(await native().trainerEvalLoss(trainer, batch(new Float32Array(B * cells).fill(1)))).toBeCloseTo(plain, 6);
  // Each (sample, cell)'s share: a one-hot mask.
  const share: number[] = [];
  for (let k = 0; k < B * cells; k++) {
    const m = new Float32Array(B * cells);
    m[k] = 1;
    share.push(await native().trainerEvalLoss(trainer, batch(m)));
  }
  expect(share.every((v) => v > 0)).toBe(true);
  expect(share.reduce((a, b) => a + b, 0)).toBeCloseTo(plain, 5);
  // An arbitrary mask: the weighted sum of the shares (relative error < 1e-4).
  const w = Float32Array.from({ length: B * cells }, (_, k) => (k % 5) / 4);
  const masked = await native().trainerEvalLoss(trainer, batch(w));
  const expected = share.reduce((a, s, k) => a + w[k] * s, 0);
  expect(Math.abs(masked - expected) / expected).toBeLessThan(1e-4);
  expect(masked).toBeLessThan(plain);
  // A zero mask trains nothing.
  expect(await native().trainerEvalLoss(trainer, batch(new Float32Array(B * cells)))).toBe(0);
});

test('a mask of the wrong shape is refused', async () => {
  const b = batch();
  b.lossMask = fromFloat32('loss_mask', [B, 1, H, W - 2], new Float32Array(B * H * (W - 2)));
  await expect(native().trainerEvalLoss(trainer, b)).rejects.toThrow(/lossMask must be \[B,1,h,w\] at the latent size/);
});
