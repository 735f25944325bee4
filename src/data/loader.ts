/**
 * Prefetching batch loader: decodes the next `prefetchBatches` batches while the training step
 * runs, and hands them out in exactly the SampleOrder's order.
 *
 * Parallelism comes from sharp itself: every decode/resize runs on libuv's thread pool (4 threads
 * by default, UV_THREADPOOL_SIZE), and we keep up to `concurrency` images in flight. Only the
 * final crop/flip/normalize copy (~1.5 ms for 512x512) runs on the JS thread. On the 2-core
 * reference machine this matched or beat a worker_threads pool (see src/bench/decode.ts), without the cost
 * of copying pixels between threads or shipping worker scripts.
 *
 * Randomness is keyed, never streamed: the crop offsets and flip of dataset item `i` in epoch `e`
 * come from derive(seed, AUGMENT_KEY, e, i), the caption choice from pickCaption(seed, e, i), and
 * the order from SampleOrder(seed). Resuming from a saved `state()` therefore reproduces the
 * remaining batches exactly. (With worldSize > 1 an item padded into an epoch's last batch repeats
 * its first occurrence's crop and caption.)
 */
import { BucketOrder, type BucketTable } from './buckets';
import { type CaptionOptions, trainingCaption } from './captions';
import type { Dataset } from './dataset';
import { type ImageTransformOptions, maskToLatent, type ProcessedImage, processImage } from './images';
import { Semaphore } from './limit';
import { derive } from './prng';
import { type SampleBatch, type SampleCursor, SampleOrder, type SampleOrderState, type ShardOptions } from './sampler';

/** The data order: plain (SampleOrder) or bucketed (BucketOrder). */
export interface DataOrder {
  nextBatch(batchSize: number): SampleBatch;
  state(): SampleOrderState;
  batchesPerEpoch(batchSize: number): number;
}

/** The data order the options ask for: bucketed when `buckets` is given. */
export function makeDataOrder(numSamples: number, o: { seed: number; rank?: number; worldSize?: number; cursor?: SampleCursor; batchSize: number; buckets?: BucketTable }): DataOrder {
  if (o.buckets) return new BucketOrder(o.buckets, { seed: o.seed, rank: o.rank, worldSize: o.worldSize, cursor: o.cursor, batchSize: o.batchSize });
  return new SampleOrder(numSamples, { seed: o.seed, rank: o.rank, worldSize: o.worldSize, cursor: o.cursor });
}

/** --masked-loss: where each item's mask comes from, and the latent stride to downsample it by. */
export interface MaskOptions {
  /** 'alpha': every image's alpha channel; else per dataset index a mask file (undefined: no mask, full weight). */
  sources: 'alpha' | ReadonlyArray<string | undefined>;
  /** Pixels per latent cell (the VAE's downsampling, 8 for SD). */
  stride: number;
}

/** derive() key for per-sample image augmentation (crop offsets, flip). */
export const AUGMENT_KEY = 0xa06;

export interface LoaderOptions extends ImageTransformOptions, ShardOptions {
  /** Per-rank batch size. */
  batchSize: number;
  /** Seeds the order, the augmentation and the caption choice. */
  seed: number;
  /** Batches decoded ahead of the consumer (default 2). */
  prefetchBatches?: number;
  /** Images decoding at once (default 4, libuv's default thread pool size). */
  concurrency?: number;
  /** Resume point, e.g. a previous `state()` (default: epoch 0, position 0). */
  cursor?: SampleCursor;
  /** Probability that a sample's caption is replaced by "" (default 0; see pickCaption). */
  captionDropoutRate?: number;
  /**
   * Keep decoded, resized and cropped images in memory (up to this many MiB, least recently used out) when the
   * augmentation is deterministic (center crop, no flip): an epoch after the first then decodes nothing. The cached
   * pixels are the decoded ones, so batches are bit-identical with or without it. Default 0 (off).
   */
  imageCacheMb?: number;
  /** --enable-bucket: each item's bucket; every batch comes from one bucket (see buckets.ts). */
  buckets?: BucketTable;
  /** --masked-loss. */
  masks?: MaskOptions;
  /** --shuffle-caption, --keep-tokens, --keep-tokens-separator (dropout is captionDropoutRate). */
  captionOptions?: Omit<CaptionOptions, 'dropoutRate'>;
}

/** Per-sample geometry, for SDXL-style micro-conditioning or debugging. */
export type SampleGeometry = Omit<ProcessedImage, 'pixels'>;

export interface Batch {
  /** Dataset indices, in order. */
  indices: number[];
  /** Float32 NCHW, indices.length * 3 * height * width values in [-1, 1]. */
  pixelValues: Float32Array;
  /** The batch's image size (resolution x resolution, or its bucket's). */
  width: number;
  height: number;
  /** --masked-loss: float32 [B, 1, height/stride, width/stride] loss weights in [0, 1]. */
  lossMask?: Float32Array;
  captions: string[];
  geometry: SampleGeometry[];
  epoch: number;
  /** Cursor position before and after this batch (global sample counts within the epoch). */
  position: number;
  positionAfter: number;
  /** True when this batch completes its epoch. */
  lastInEpoch: boolean;
}

export class BatchLoader implements AsyncIterable<Batch> {
  readonly dataset: Dataset;
  readonly options: Readonly<LoaderOptions>;
  private readonly order: DataOrder;
  private readonly sem: Semaphore;
  private readonly queue: Array<Promise<Batch>> = [];
  private readonly prefetch: number;
  private consumed: SampleOrderState;
  private closed = false;
  /** `index:WxH` (the bucket size is part of the key) -> processed image (see imageCacheMb); Map order is the LRU order. */
  private readonly cache = new Map<string, ProcessedImage>();
  private cacheBytes = 0;
  private readonly cacheLimit: number;

  constructor(dataset: Dataset, options: LoaderOptions) {
    const n = dataset.items.length;
    if (n === 0) throw new Error('BatchLoader: the dataset is empty');
    this.dataset = dataset;
    this.options = { ...options };
    this.order = makeDataOrder(n, options);
    this.order.batchesPerEpoch(options.batchSize); // validates batchSize
    this.prefetch = options.prefetchBatches ?? 2;
    if (!Number.isInteger(this.prefetch) || this.prefetch < 0) throw new RangeError(`prefetchBatches must be an integer >= 0, got ${this.prefetch}`);
    this.sem = new Semaphore(options.concurrency ?? 4);
    this.consumed = this.order.state();
    const deterministic = options.centerCrop === true && options.randomFlip !== true;
    this.cacheLimit = deterministic ? Math.max(0, options.imageCacheMb ?? 0) * 1024 * 1024 : 0;
  }

  /** Images served from memory so far, and the bytes the cache holds (for logs and tests). */
  readonly cacheStats = { hits: 0, misses: 0 };
  get cachedBytes(): number {
    return this.cacheBytes;
  }

  /** processImage into `out`, through the cache when it is on. */
  private async processed(index: number, imageOptions: ImageTransformOptions, rng: ReturnType<typeof derive>, out: Float32Array): Promise<ProcessedImage> {
    const item = this.dataset.items[index];
    const key = `${index}:${imageOptions.bucket ? `${imageOptions.bucket.width}x${imageOptions.bucket.height}` : imageOptions.resolution}`;
    if (this.cacheLimit > 0) {
      const hit = this.cache.get(key);
      if (hit) {
        this.cache.delete(key);
        this.cache.set(key, hit);
        out.set(hit.pixels);
        this.cacheStats.hits++;
        return { ...hit, pixels: out };
      }
    }
    const img = await this.sem.run(() => withFile(item.path, processImage(item.path, imageOptions, rng, out)));
    if (this.cacheLimit > 0) {
      this.cacheStats.misses++;
      const bytes = img.pixels.byteLength;
      if (bytes <= this.cacheLimit && !this.cache.has(key)) {
        for (const [k, v] of this.cache) {
          if (this.cacheBytes + bytes <= this.cacheLimit) break;
          this.cache.delete(k);
          this.cacheBytes -= v.pixels.byteLength;
        }
        this.cache.set(key, { ...img, pixels: Float32Array.from(img.pixels) });
        this.cacheBytes += bytes;
      }
    }
    return img;
  }

  /** Optimizer steps per epoch on this rank. */
  batchesPerEpoch(): number {
    return this.order.batchesPerEpoch(this.options.batchSize);
  }

  /** The resume point after the last batch returned by next() (prefetched batches don't count). */
  state(): SampleOrderState {
    return { ...this.consumed };
  }

  /** The next batch (epochs follow each other without end; stop when you have enough steps). */
  async next(): Promise<Batch> {
    if (this.closed) throw new Error('BatchLoader is closed');
    this.fill();
    const batch = this.queue.shift() ?? this.schedule();
    this.fill();
    const b = await batch;
    this.consumed = { ...this.consumed, epoch: b.epoch, position: b.positionAfter };
    return b;
  }

  async *[Symbol.asyncIterator](): AsyncIterator<Batch> {
    while (!this.closed) yield await this.next();
  }

  /**
   * Item `index` resized and center-cropped, never flipped: the deterministic view used to cache
   * latents once per image.
   */
  async loadForCache(index: number): Promise<ProcessedImage> {
    const item = this.dataset.items[index];
    if (!item) throw new RangeError(`no dataset item ${index}`);
    const opts: ImageTransformOptions = { ...this.imageOptionsFor(index), centerCrop: true, randomFlip: false };
    return this.sem.run(() => withFile(item.path, processImage(item.path, opts)));
  }

  /** Stops prefetching and waits for in-flight decodes to finish. */
  async close(): Promise<void> {
    this.closed = true;
    const pending = this.queue.splice(0);
    await Promise.allSettled(pending);
  }

  private imageOptions(): ImageTransformOptions {
    const o = this.options;
    return { resolution: o.resolution, interpolation: o.interpolation, centerCrop: o.centerCrop, randomFlip: o.randomFlip, resampler: o.resampler };
  }

  /** The transform of dataset item `index`: its bucket and its mask when those are on. */
  imageOptionsFor(index: number): ImageTransformOptions {
    const o: ImageTransformOptions = this.imageOptions();
    const t = this.options.buckets;
    if (t) {
      const c = t.choices[index];
      o.bucket = { width: c.width, height: c.height, resizedWidth: c.resizedWidth, resizedHeight: c.resizedHeight };
    }
    const m = this.options.masks;
    if (m) {
      const src = m.sources === 'alpha' ? 'alpha' : m.sources[index];
      if (src !== undefined) o.mask = src;
    }
    return o;
  }

  /** The latent-size loss weights of a batch's images (all ones for an image without a mask). */
  private lossMask(images: readonly ProcessedImage[], width: number, height: number): Float32Array | undefined {
    const m = this.options.masks;
    if (!m) return undefined;
    const per = (width / m.stride) * (height / m.stride);
    const out = new Float32Array(images.length * per).fill(1);
    images.forEach((im, k) => {
      if (im.mask) maskToLatent(im.mask, width, height, m.stride, out.subarray(k * per, (k + 1) * per));
    });
    return out;
  }

  /** The caption of item `index` in `epoch` (variant, dropout, tag shuffle). */
  caption(index: number, epoch: number): string {
    return trainingCaption(this.dataset.items[index].captions, this.options.seed, epoch, index, { dropoutRate: this.options.captionDropoutRate, ...this.options.captionOptions });
  }

  private fill(): void {
    while (!this.closed && this.queue.length < this.prefetch) this.queue.push(this.schedule());
  }

  private schedule(): Promise<Batch> {
    const s = this.order.nextBatch(this.options.batchSize);
    const res = this.options.resolution;
    const first = this.imageOptionsFor(s.indices[0]);
    const width = first.bucket ? first.bucket.width : res;
    const height = first.bucket ? first.bucket.height : res;
    const per = 3 * width * height;
    const pixelValues = new Float32Array(s.indices.length * per);
    const seed = this.options.seed;
    const work = Promise.all(
      s.indices.map((index, k) => this.processed(index, this.imageOptionsFor(index), derive(seed, AUGMENT_KEY, s.epoch, index), pixelValues.subarray(k * per, (k + 1) * per))),
    ).then((images): Batch => {
      const lossMask = this.lossMask(images, width, height);
      return {
        indices: s.indices,
        pixelValues,
        width,
        height,
        ...(lossMask ? { lossMask } : {}),
        captions: s.indices.map((i) => this.caption(i, s.epoch)),
        geometry: images.map(({ pixels: _pixels, mask: _mask, ...geometry }) => geometry),
        epoch: s.epoch,
        position: s.position,
        positionAfter: s.positionAfter,
        lastInEpoch: s.lastInEpoch,
      };
    });
    // A prefetched batch may fail before anyone awaits it; the error is re-raised by next().
    work.catch(() => undefined);
    return work;
  }
}

/** Prefixes decode errors with the image's path. */
async function withFile<T>(file: string, p: Promise<T>): Promise<T> {
  try {
    return await p;
  } catch (err) {
    const msg = err instanceof Error ? err.message : String(err);
    throw new Error(`failed to load training image ${file}: ${msg}`, { cause: err });
  }
}
