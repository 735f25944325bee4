/**
 * Validation loss on held-out images (`--validation-split F` or `--validation-data-dir DIR`).
 *
 * Every held-out sample gets, once, a fixed latent (VAE posterior mean + std·z with a seeded z), a fixed diffusion
 * noise and a fixed timestep, drawn from our own seeded PRNG. The loss is then a deterministic function of the
 * trainable weights: comparable across steps (usable as `--monitor val_loss`), and evaluating it draws nothing from
 * the training RNG streams, so training follows the same trajectory with or without it.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import type { Dataset } from '../data/dataset';
import type { LoaderOptions } from '../data/loader';
import { derive, type Prng } from '../data/prng';
import { native, type PipelineHandle, type TrainBatch, type TrainerHandle } from '../native';
import { fromFloat32, fromInt64, numel } from '../tensors';
import type { CLIPTokenizer } from '../tokenizer';
import { buildLatentCache } from './sources';

/** PRNG stream keys (derive(seed, key, ...)). */
const SPLIT_KEY = 0x5917;
const VAL_NOISE_KEY = 0x7a1;

/**
 * Holds out round(fraction × N) items (at least 1, at most N − 1), chosen by a seeded shuffle; the rest train.
 * The choice depends only on the seed and the sorted item list, so a resumed run holds out the same images.
 */
export function splitDataset(ds: Dataset, fraction: number, seed: number): { train: Dataset; val: Dataset } {
  const n = ds.items.length;
  if (n < 2) throw new Error(`--validation-split needs at least 2 images; ${ds.root} has ${n}`);
  const k = Math.min(n - 1, Math.max(1, Math.round(fraction * n)));
  const order = derive(seed, SPLIT_KEY).shuffle(Array.from({ length: n }, (_, i) => i));
  const held = new Set(order.slice(0, k));
  const pick = (heldOut: boolean): Dataset => {
    const items = ds.items.filter((_, i) => held.has(i) === heldOut);
    return { ...ds, items, counts: { ...ds.counts, images: items.length } };
  };
  return { train: pick(false), val: pick(true) };
}

/** One standard normal value per call (Box–Muller on our PRNG; deterministic across platforms). */
function gaussians(rng: Prng, n: number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const u1 = Math.max(rng.nextFloat(), 1e-12);
    const u2 = rng.nextFloat();
    const r = Math.sqrt(-2 * Math.log(u1));
    out[i] = r * Math.cos(2 * Math.PI * u2);
    if (i + 1 < n) out[i + 1] = r * Math.sin(2 * Math.PI * u2);
  }
  return out;
}

/** The VAE's scaling_factor from its config.json (0.18215 when absent, as SD 1.x). */
export function vaeScalingFactor(modelDir: string): number {
  try {
    const c = JSON.parse(fs.readFileSync(path.join(modelDir, 'vae', 'config.json'), 'utf8')) as { scaling_factor?: number };
    return typeof c.scaling_factor === 'number' ? c.scaling_factor : 0.18215;
  } catch {
    return 0.18215;
  }
}

export interface ValidationLossOptions {
  loader: LoaderOptions;
  seed: number;
  numTrainTimesteps: number;
  scalingFactor: number;
  batchSize: number;
}

export class ValidationLoss {
  private constructor(
    private readonly shapes: number[][],
    private readonly masks: Array<Float32Array | undefined> | undefined,
    private readonly latents: Float32Array[],
    private readonly noise: Float32Array[],
    private readonly timesteps: number[],
    private readonly inputIds: number[][],
    private readonly batchSize: number,
  ) {}

  get size(): number {
    return this.latents.length;
  }

  /** Encodes the held-out images once (center crop, no flip) and fixes each sample's latent, noise and timestep. */
  static async prepare(pipe: PipelineHandle, tokenizer: CLIPTokenizer, val: Dataset, o: ValidationLossOptions): Promise<ValidationLoss> {
    const cache = await buildLatentCache(pipe, val, { ...o.loader, centerCrop: true, randomFlip: false, cursor: undefined });
    const latents: Float32Array[] = [];
    const noise: Float32Array[] = [];
    const timesteps: number[] = [];
    val.items.forEach((_, i) => {
      const per = numel(cache.shapes[i]);
      const rng = derive(o.seed, VAL_NOISE_KEY, i);
      const z = gaussians(rng, per);
      const lat = new Float32Array(per);
      const m = cache.mean[i];
      const s = cache.std[i];
      for (let j = 0; j < per; j++) lat[j] = (m[j] + s[j] * z[j]) * o.scalingFactor;
      latents.push(lat);
      noise.push(gaussians(rng, per));
      timesteps.push(rng.int(o.numTrainTimesteps));
    });
    const inputIds = tokenizer.encodeBatch(
      val.items.map((it) => it.captions[0]),
      { maxLength: tokenizer.modelMaxLength, padding: 'max_length' },
    );
    return new ValidationLoss(cache.shapes, cache.masks, latents, noise, timesteps, inputIds, o.batchSize);
  }

  /**
   * Mean loss over the held-out samples (no gradients, eval mode, no RNG drawn). With buckets, each batch holds
   * samples of one size: the samples grouped by size (in index order), cut into batches.
   */
  async evaluate(trainer: TrainerHandle): Promise<number> {
    const groups = new Map<string, number[]>();
    this.shapes.forEach((sh, i) => {
      const k = sh.join('x');
      if (!groups.has(k)) groups.set(k, []);
      groups.get(k)!.push(i);
    });
    let total = 0;
    for (const members of groups.values()) {
      const shape = this.shapes[members[0]];
      const per = numel(shape);
      for (let start = 0; start < members.length; start += this.batchSize) {
        const idx = members.slice(start, start + this.batchSize);
        const b = idx.length;
        const lat = new Float32Array(b * per);
        const nz = new Float32Array(b * per);
        idx.forEach((i, k) => {
          lat.set(this.latents[i], k * per);
          nz.set(this.noise[i], k * per);
        });
        const batch: TrainBatch = {
          latents: fromFloat32('latents', [b, ...shape], lat),
          noise: fromFloat32('noise', [b, ...shape], nz),
          timesteps: fromInt64('timesteps', [b], idx.map((i) => this.timesteps[i])),
          inputIds: fromInt64('input_ids', [b, this.inputIds[0].length], idx.flatMap((i) => this.inputIds[i])),
        };
        if (this.masks) {
          const cells = shape[1] * shape[2];
          const m = new Float32Array(b * cells).fill(1);
          idx.forEach((i, k) => this.masks![i] && m.set(this.masks![i]!, k * cells));
          batch.lossMask = fromFloat32('loss_mask', [b, 1, shape[1], shape[2]], m);
        }
        const loss = await native().trainerEvalLoss(trainer, batch);
        total += loss * b;
      }
    }
    return total / this.size;
  }
}
