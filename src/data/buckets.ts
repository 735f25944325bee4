/**
 * Aspect-ratio buckets (`--enable-bucket`), following kohya's sd-scripts (library/model_util.py
 * make_bucket_resolutions, library/train_util.py BucketManager.select_bucket / round_to_steps):
 *
 * - The bucket sizes: width x height, multiples of `step`, area <= resolution^2, each side within
 *   [minReso, maxReso]; the square (floor(resolution / step) * step) is always one of them.
 * - An image goes to the bucket of closest aspect ratio (first of the sorted sizes on a tie, as
 *   numpy's argmin), is resized to cover it (scale = the bucket side that matches, sides rounded
 *   with int(x + 0.5)) and cropped to it (center, or seeded random with --center-crop off).
 * - With `noUpscale` (--bucket-no-upscale) an image whose area fits gets a bucket of its own size
 *   rounded down to the step (never upscaled); a larger one is first scaled down to the area.
 *
 * Where we differ from kohya on purpose:
 * - A bucket with fewer images than the batch is never dropped: its last batch is smaller (one
 *   process) or padded from the same bucket's own shuffled images (several processes, so every rank
 *   gets a full batch, as accelerate's even_batches); every image is seen once per epoch.
 * - With --bucket-no-upscale an image whose bucket would have a side under --min-bucket-reso is "too
 *   small" (an error naming it, or skipped with --skip-bad-images); kohya trains it at any size.
 * - The epoch order is keyed, not streamed: bucket b's images in epoch e are shuffled with
 *   derive(seed, BUCKET_KEY, e, b), cut into global batches, and the batches of all buckets are
 *   shuffled with derive(seed, BUCKET_ORDER_KEY, e). A cursor {epoch, position} (samples consumed)
 *   is therefore a complete resume point, exactly as for the unbucketed SampleOrder.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';

import { derive } from './prng';
import type { SampleBatch, SampleCursor, SampleOrderState, ShardOptions } from './sampler';

/** derive() keys of the bucketed order (distinct from the sampler's, the loader's and the captions'). */
export const BUCKET_KEY = 0xb0c;
export const BUCKET_ORDER_KEY = 0xb0d;

export interface BucketSettings {
  /** --resolution: the bucket area is at most resolution^2. */
  resolution: number;
  minReso: number;
  maxReso: number;
  step: number;
  noUpscale: boolean;
}

export interface BucketSize {
  width: number;
  height: number;
}

export interface BucketChoice extends BucketSize {
  /** Size of the image resized to cover the bucket (before the crop). */
  resizedWidth: number;
  resizedHeight: number;
  /** bucket aspect ratio - image aspect ratio. */
  arError: number;
}

export interface Bucket extends BucketSize {
  /** Dataset indices in this bucket, ascending. */
  items: number[];
}

export interface BucketTable {
  settings: BucketSettings;
  /** Buckets that hold images, sorted by (width, height) as kohya's BucketManager.sort(). */
  buckets: Bucket[];
  /** Dataset index -> its bucket's index in `buckets`. */
  itemBucket: number[];
  /** Dataset index -> its choice (resize size, aspect error). */
  choices: BucketChoice[];
}

/** Python's int(x + 0.5) for x >= 0. */
const roundHalfUp = (x: number): number => Math.floor(x + 0.5);

/** Checks the bucket flags; `latentStride` is the pixel multiple the model needs (VAE x UNet downsampling). */
export function bucketSettingsProblems(s: BucketSettings, latentStride?: number): string[] {
  const p: string[] = [];
  if (s.minReso > s.maxReso) p.push(`--min-bucket-reso ${s.minReso} is larger than --max-bucket-reso ${s.maxReso}: make the minimum <= the maximum`);
  if (s.step < 1) p.push(`--bucket-reso-steps must be >= 1, got ${s.step}`);
  if (latentStride !== undefined && s.step % latentStride !== 0)
    p.push(`--bucket-reso-steps ${s.step} is not a multiple of ${latentStride}, the pixel stride this model's VAE and UNet need (every bucket side must be one); use a multiple of ${latentStride}`);
  if (s.resolution > s.maxReso) p.push(`--resolution ${s.resolution} is larger than --max-bucket-reso ${s.maxReso} (the square bucket would not fit): raise --max-bucket-reso`);
  if (Math.floor(s.resolution / s.step) * s.step < 1) p.push(`--resolution ${s.resolution} is smaller than --bucket-reso-steps ${s.step}`);
  return p;
}

/** kohya's make_bucket_resolutions((resolution, resolution), min, max, step), sorted by (width, height). */
export function makeBucketResolutions(resolution: number, minSize: number, maxSize: number, step: number): BucketSize[] {
  const maxArea = resolution * resolution;
  const set = new Map<string, BucketSize>();
  const add = (width: number, height: number): void => void set.set(`${width}x${height}`, { width, height });
  const sq = Math.floor(Math.floor(Math.sqrt(maxArea)) / step) * step;
  add(sq, sq);
  for (let width = minSize; width <= maxSize; width += step) {
    const height = Math.min(maxSize, Math.floor(Math.floor(maxArea / width) / step) * step);
    if (height >= minSize) {
      add(width, height);
      add(height, width);
    }
  }
  return [...set.values()].sort((a, b) => a.width - b.width || a.height - b.height);
}

/** kohya's BucketManager.select_bucket for one image of `width` x `height` (after EXIF orientation). */
export function selectBucket(width: number, height: number, s: BucketSettings, predefined: readonly BucketSize[]): BucketChoice {
  const ar = width / height;
  let bw: number;
  let bh: number;
  let rw: number;
  let rh: number;
  if (!s.noUpscale) {
    let reso = predefined.find((r) => r.width === width && r.height === height);
    if (!reso) {
      let best = 0;
      let bestErr = Infinity;
      predefined.forEach((r, i) => {
        const e = Math.abs(r.width / r.height - ar);
        if (e < bestErr) {
          bestErr = e;
          best = i;
        }
      });
      reso = predefined[best];
    }
    const scale = ar > reso.width / reso.height ? reso.height / height : reso.width / width;
    // Never a pixel short of the bucket (kohya's float rounding gives the same sizes; the max only guards it).
    rw = Math.max(reso.width, roundHalfUp(width * scale));
    rh = Math.max(reso.height, roundHalfUp(height * scale));
    bw = reso.width;
    bh = reso.height;
  } else {
    const maxArea = s.resolution * s.resolution;
    const toSteps = (x: number): number => {
      const v = Math.floor(x + 0.5);
      return v - (v % s.step);
    };
    if (width * height > maxArea) {
      const resizedW = Math.sqrt(maxArea * ar);
      const resizedH = maxArea / resizedW;
      const bWr = toSteps(resizedW);
      const bHinWr = toSteps(bWr / ar);
      const arWr = bWr / bHinWr;
      const bHr = toSteps(resizedH);
      const bWinHr = toSteps(bHr * ar);
      const arHr = bWinHr / bHr;
      if (Math.abs(arWr - ar) < Math.abs(arHr - ar)) {
        rw = bWr;
        rh = roundHalfUp(bWr / ar);
      } else {
        rw = roundHalfUp(bHr * ar);
        rh = bHr;
      }
    } else {
      rw = width;
      rh = height;
    }
    bw = rw - (rw % s.step);
    bh = rh - (rh % s.step);
  }
  return { width: bw, height: bh, resizedWidth: rw, resizedHeight: rh, arError: bw / bh - ar };
}

/** An image that cannot go into any bucket (see `assignBuckets`). */
export interface TooSmall {
  index: number;
  width: number;
  height: number;
  reason: string;
}

/**
 * Every item's bucket. Items listed in `tooSmall` (only with noUpscale: a bucket side would be under minReso)
 * are in no bucket (itemBucket -1): the caller errors or skips them.
 */
export function assignBuckets(sizes: readonly BucketSize[], s: BucketSettings): { table: BucketTable; tooSmall: TooSmall[] } {
  const predefined = makeBucketResolutions(s.resolution, s.minReso, s.maxReso, s.step);
  const choices: BucketChoice[] = [];
  const tooSmall: TooSmall[] = [];
  const byKey = new Map<string, Bucket>();
  sizes.forEach((sz, i) => {
    if (!(sz.width > 0 && sz.height > 0)) throw new Error(`image ${i} has no size: --enable-bucket needs the image sizes (images are validated at load)`);
    const c = selectBucket(sz.width, sz.height, s, predefined);
    choices.push(c);
    if (c.width < s.minReso || c.height < s.minReso) {
      tooSmall.push({ index: i, width: sz.width, height: sz.height, reason: `${sz.width}x${sz.height} would need a ${c.width}x${c.height} bucket, under --min-bucket-reso ${s.minReso} (--bucket-no-upscale never enlarges it)` });
      return;
    }
    const key = `${c.width}x${c.height}`;
    let b = byKey.get(key);
    if (!b) byKey.set(key, (b = { width: c.width, height: c.height, items: [] }));
    b.items.push(i);
  });
  const buckets = [...byKey.values()].sort((a, b) => a.width - b.width || a.height - b.height);
  const itemBucket = new Array<number>(sizes.length).fill(-1);
  buckets.forEach((b, bi) => b.items.forEach((i) => (itemBucket[i] = bi)));
  return { table: { settings: { ...s }, buckets, itemBucket, choices }, tooSmall };
}

/** The table as log lines: "  512x512: 12 images" (sorted by size), and a total. */
export function describeBuckets(t: BucketTable): string[] {
  const lines = t.buckets.map((b) => `  ${b.width}x${b.height} (aspect ${(b.width / b.height).toFixed(2)}): ${b.items.length} image${b.items.length === 1 ? '' : 's'}`);
  const mean = t.choices.length ? t.choices.reduce((a, c) => a + Math.abs(c.arError), 0) / t.choices.length : 0;
  lines.push(`  ${t.buckets.length} buckets, ${t.buckets.reduce((n, b) => n + b.items.length, 0)} images, mean aspect-ratio error ${mean.toFixed(4)}`);
  return lines;
}

/** kohya's ss_bucket_info: {"buckets": {"0": {"resolution": [w, h], "count": n}, ...}, "mean_img_ar_error": x}. */
export function bucketInfo(t: BucketTable): { buckets: Record<string, { resolution: [number, number]; count: number }>; mean_img_ar_error: number } {
  const buckets: Record<string, { resolution: [number, number]; count: number }> = {};
  t.buckets.forEach((b, i) => (buckets[String(i)] = { resolution: [b.width, b.height], count: b.items.length }));
  const mean = t.choices.length ? t.choices.reduce((a, c) => a + Math.abs(c.arError), 0) / t.choices.length : 0;
  return { buckets, mean_img_ar_error: mean };
}

/** sha256 (hex, 16) of the bucket settings and every item's bucket: a saved cursor means the same order only under it. */
export function bucketKey(t: BucketTable): string {
  const h = createHash('sha256');
  h.update(JSON.stringify(t.settings));
  h.update(JSON.stringify(t.buckets.map((b) => [b.width, b.height, b.items])));
  return h.digest('hex').slice(0, 16);
}

/** A bucketed data cursor: the sampler's plus the table it was made under and the global batch that cut it. */
export interface BucketOrderState extends SampleOrderState {
  bucketKey?: string;
  globalBatch?: number;
}

interface Chunk {
  bucket: number;
  /** The global batch's dataset indices. */
  items: number[];
  /** The bucket's whole shuffled list this epoch (padding for several processes comes from it). */
  perm: number[];
}

/**
 * The bucketed epoch order with a resumable cursor; the same interface as SampleOrder.
 * Every global batch (batchSize x worldSize samples) comes from one bucket; rank r takes rows
 * [r*batchSize, (r+1)*batchSize). A bucket's last batch holds the remainder: with one process it is
 * a smaller batch; with several it is padded from the start of the bucket's own shuffled list.
 */
export class BucketOrder {
  readonly numSamples: number;
  readonly seed: number;
  readonly rank: number;
  readonly worldSize: number;
  readonly key: string;
  private epochValue: number;
  private positionValue: number;
  private cached: { epoch: number; globalBatch: number; starts: Map<number, Chunk> } | undefined;

  constructor(
    readonly table: BucketTable,
    options: ShardOptions & { seed: number; cursor?: SampleCursor; /** Per-rank batch size (recorded in state()). */ batchSize?: number },
  ) {
    this.numSamples = table.buckets.reduce((n, b) => n + b.items.length, 0);
    if (this.numSamples < 1) throw new RangeError('BucketOrder: no images in any bucket');
    this.seed = options.seed;
    this.worldSize = options.worldSize ?? 1;
    this.rank = options.rank ?? 0;
    if (this.rank >= this.worldSize) throw new RangeError(`rank ${this.rank} must be < worldSize ${this.worldSize}`);
    const c = options.cursor ?? { epoch: 0, position: 0 };
    if (c.position > this.numSamples) throw new RangeError(`cursor.position ${c.position} is past the end of an epoch of ${this.numSamples} samples`);
    this.epochValue = c.epoch;
    this.positionValue = c.position;
    this.key = bucketKey(table);
    this.globalBatch = options.batchSize !== undefined ? options.batchSize * this.worldSize : undefined;
  }

  private readonly globalBatch: number | undefined;

  /**
   * Checks a saved cursor against this table and global batch: the same positions mean the same samples only when
   * both are the same (or the cursor is at an epoch boundary). Throws a message naming what differs.
   */
  static checkResume(saved: BucketOrderState, table: BucketTable, globalBatch: number): void {
    const key = bucketKey(table);
    const mid = saved.position > 0 && saved.position < saved.numSamples;
    if (saved.bucketKey === undefined)
      throw new Error('the checkpoint was saved without --enable-bucket (its data order is not bucketed): resume without --enable-bucket, or start a new run');
    if (saved.bucketKey !== key && mid)
      throw new Error('the bucket table differs from the checkpoint\'s (bucket settings or image sizes changed) in the middle of an epoch: resume with the same bucket settings');
    if (saved.globalBatch !== undefined && saved.globalBatch !== globalBatch && mid)
      throw new Error(
        `the checkpoint stopped in the middle of a bucketed epoch cut into global batches of ${saved.globalBatch}; now ${globalBatch} (--train-batch-size x processes): ` +
          'keep the batch size and process count until the epoch ends, or resume from a checkpoint at an epoch end',
      );
  }

  get epoch(): number {
    return this.epochValue;
  }
  get position(): number {
    return this.positionValue;
  }

  state(): BucketOrderState {
    const g = this.globalBatch;
    return { version: 1, seed: this.seed, numSamples: this.numSamples, epoch: this.epochValue, position: this.positionValue, bucketKey: this.key, ...(g ? { globalBatch: g } : {}) };
  }

  /** Epoch e's global batches in order (dataset indices), for tests and logs. */
  plan(epoch: number, globalBatch: number): Array<{ bucket: number; items: number[] }> {
    const chunks: Chunk[] = [];
    this.table.buckets.forEach((b, bi) => {
      const perm = derive(this.seed, BUCKET_KEY, epoch, bi).shuffle(b.items.slice());
      for (let i = 0; i < perm.length; i += globalBatch) chunks.push({ bucket: bi, items: perm.slice(i, i + globalBatch), perm });
    });
    const order = derive(this.seed, BUCKET_ORDER_KEY, epoch).shuffle(chunks.map((_, i) => i));
    return order.map((i) => chunks[i]);
  }

  private chunkAt(epoch: number, position: number, globalBatch: number): Chunk {
    if (!this.cached || this.cached.epoch !== epoch || this.cached.globalBatch !== globalBatch) {
      const starts = new Map<number, Chunk>();
      let pos = 0;
      for (const c of this.plan(epoch, globalBatch) as Chunk[]) {
        starts.set(pos, c);
        pos += c.items.length;
      }
      this.cached = { epoch, globalBatch, starts };
    }
    const c = this.cached.starts.get(position);
    if (!c) throw new Error(`bucketed data cursor: position ${position} of epoch ${epoch} is not the start of a batch of ${globalBatch} (the batch size or process count changed mid-epoch)`);
    return c;
  }

  /** Optimizer-step micro-batches per epoch on each rank: sum over buckets of ceil(n / (batchSize x worldSize)). */
  batchesPerEpoch(batchSize: number): number {
    const g = batchSize * this.worldSize;
    return this.table.buckets.reduce((n, b) => n + Math.ceil(b.items.length / g), 0);
  }

  nextBatch(batchSize: number): SampleBatch & { bucket: number } {
    if (!Number.isSafeInteger(batchSize) || batchSize < 1) throw new RangeError(`batchSize must be an integer >= 1, got ${batchSize}`);
    if (this.positionValue >= this.numSamples) {
      this.epochValue += 1;
      this.positionValue = 0;
    }
    const g = batchSize * this.worldSize;
    const start = this.positionValue;
    const c = this.chunkAt(this.epochValue, start, g);
    let indices: number[];
    if (this.worldSize === 1) indices = c.items.slice();
    else {
      const lo = this.rank * batchSize;
      indices = [];
      for (let k = lo; k < lo + batchSize; k++) indices.push(k < c.items.length ? c.items[k] : c.perm[(k - c.items.length) % c.perm.length]);
    }
    this.positionValue = start + c.items.length;
    return { indices, epoch: this.epochValue, position: start, positionAfter: this.positionValue, lastInEpoch: this.positionValue === this.numSamples, bucket: c.bucket };
  }
}

/**
 * The pixel multiple every bucket side must be for a model folder: the VAE's downsampling (2^(blocks-1)) times the
 * UNet's (2^(down blocks-1), so that every skip connection matches without padding). 64 for SD 1.5, 4 for the tiny
 * test model. Missing configs count as SD's (8 x 8).
 */
export function modelPixelStride(modelDir: string): number {
  const blocks = (file: string, key: string, fallback: number): number => {
    try {
      const c = JSON.parse(fs.readFileSync(path.join(modelDir, file), 'utf8')) as Record<string, unknown>;
      const v = c[key];
      return Array.isArray(v) && v.length > 0 ? v.length : fallback;
    } catch {
      return fallback;
    }
  };
  const vae = 2 ** (blocks('vae/config.json', 'block_out_channels', 4) - 1);
  const unet = 2 ** (blocks('unet/config.json', 'down_block_types', 4) - 1);
  return vae * unet;
}

/** The VAE's downsampling alone: pixels per latent cell (8 for SD 1.5). */
export function vaeStride(modelDir: string): number {
  try {
    const c = JSON.parse(fs.readFileSync(path.join(modelDir, 'vae', 'config.json'), 'utf8')) as { block_out_channels?: unknown[] };
    return 2 ** ((Array.isArray(c.block_out_channels) && c.block_out_channels.length > 0 ? c.block_out_channels.length : 4) - 1);
  } catch {
    return 8;
  }
}
