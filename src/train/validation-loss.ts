/**
 * Validation loss on held-out images (`--validation-split F` or `--validation-data-dir DIR`).
 *
 * Every held-out sample gets, once, a fixed latent (VAE posterior mean + std·z with a seeded z, scaled natively), a
 * fixed diffusion noise and a fixed timestep, drawn from our own seeded PRNG (the same numbers on every platform and
 * device; they cross into the addon once, when the set is prepared). The loss is then a deterministic function of the
 * trainable weights: comparable across steps (usable as `--monitor val_loss`), and evaluating it draws nothing from
 * the training RNG streams, so training follows the same trajectory with or without it.
 */
import type { Dataset } from '../data/dataset';
import type { LoaderOptions } from '../data/loader';
import { derive, type Prng } from '../data/prng';
import { native, type PipelineHandle, type TrainBatch, type TrainerHandle } from '../native';
import { fromFloat32, fromInt64, numel } from '../tensors';
import type { CLIPTokenizer } from '../tokenizer';
import { buildLatentCache, type LatentCache } from './sources';

/** The PRNG stream key of the fixed draws (derive(seed, key, item)). */
const VAL_NOISE_KEY = 0x7a1;

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

export interface ValidationLossOptions {
  loader: LoaderOptions;
  seed: number;
  numTrainTimesteps: number;
  batchSize: number;
}

export class ValidationLoss {
  private constructor(
    private readonly cache: LatentCache,
    private readonly timesteps: number[],
    private readonly inputIds: number[][],
    private readonly batchSize: number,
  ) {}

  get size(): number {
    return this.timesteps.length;
  }

  /**
   * Encodes the held-out images once (center crop, no flip) into a native latent cache and fixes each sample's
   * latent (the addon computes (mean + std·z)·scaling_factor with the loaded VAE's factor), noise and timestep.
   */
  static async prepare(pipe: PipelineHandle, tokenizer: CLIPTokenizer, val: Dataset, o: ValidationLossOptions): Promise<ValidationLoss> {
    const cache = await buildLatentCache(pipe, val, { ...o.loader, centerCrop: true, randomFlip: false, cursor: undefined });
    try {
      const timesteps: number[] = [];
      for (let i = 0; i < val.items.length; i++) {
        const shape = [1, ...cache.shapes[i]];
        const rng = derive(o.seed, VAL_NOISE_KEY, i);
        const z = gaussians(rng, numel(shape));
        const noise = gaussians(rng, numel(shape));
        timesteps.push(rng.int(o.numTrainTimesteps));
        await native().latentCacheFix(cache.handle, [i], fromFloat32('z', shape, z), fromFloat32('noise', shape, noise));
      }
      const inputIds = tokenizer.encodeBatch(
        val.items.map((it) => it.captions[0]),
        { maxLength: tokenizer.modelMaxLength, padding: 'max_length' },
      );
      return new ValidationLoss(cache, timesteps, inputIds, o.batchSize);
    } catch (e) {
      native().dispose(cache.handle);
      throw e;
    }
  }

  /**
   * Mean loss over the held-out samples (no gradients, eval mode, no RNG drawn). With buckets, each batch holds
   * samples of one size: the samples grouped by size (in index order), cut into batches.
   */
  async evaluate(trainer: TrainerHandle): Promise<number> {
    let total = 0;
    for (const members of this.cache.groups) {
      for (let start = 0; start < members.length; start += this.batchSize) {
        const items = members.slice(start, start + this.batchSize);
        const batch: TrainBatch = {
          cached: { cache: this.cache.handle, items },
          timesteps: fromInt64('timesteps', [items.length], items.map((i) => this.timesteps[i])),
          inputIds: fromInt64('input_ids', [items.length, this.inputIds[0].length], items.flatMap((i) => this.inputIds[i])),
        };
        total += (await native().trainerEvalLoss(trainer, batch)) * items.length;
      }
    }
    return total / this.size;
  }

  /** Releases the native latents. */
  dispose(): void {
    native().dispose(this.cache.handle);
  }
}
