/**
 * Prefetching batch loader: decodes the next `prefetchBatches` batches while the training step
 * runs, and hands them out in exactly the SampleOrder's order.
 *
 * Parallelism comes from sharp itself: every decode/resize runs on libuv's thread pool (4 threads
 * by default, UV_THREADPOOL_SIZE), and we keep up to `concurrency` images in flight. Only the
 * final crop/flip/normalize copy (~1.5 ms for 512x512) runs on the JS thread. On the 2-core
 * reference machine this matched or beat a worker_threads pool (see bench.ts), without the cost
 * of copying pixels between threads or shipping worker scripts.
 *
 * Randomness is keyed, never streamed: the crop offsets and flip of dataset item `i` in epoch `e`
 * come from derive(seed, AUGMENT_KEY, e, i), the caption choice from pickCaption(seed, e, i), and
 * the order from SampleOrder(seed). Resuming from a saved `state()` therefore reproduces the
 * remaining batches exactly. (With worldSize > 1 an item padded into an epoch's last batch repeats
 * its first occurrence's crop and caption.)
 */
import { type Dataset, pickCaption } from './dataset';
import { type ImageTransformOptions, type ProcessedImage, processImage } from './images';
import { Semaphore } from './limit';
import { derive } from './prng';
import { type SampleCursor, SampleOrder, type SampleOrderState, type ShardOptions } from './sampler';

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
}

/** Per-sample geometry, for SDXL-style micro-conditioning or debugging. */
export type SampleGeometry = Omit<ProcessedImage, 'pixels'>;

export interface Batch {
  /** Dataset indices, in order. */
  indices: number[];
  /** Float32 NCHW, indices.length * 3 * resolution * resolution values in [-1, 1]. */
  pixelValues: Float32Array;
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
  private readonly order: SampleOrder;
  private readonly sem: Semaphore;
  private readonly queue: Array<Promise<Batch>> = [];
  private readonly prefetch: number;
  private consumed: SampleOrderState;
  private closed = false;
  /** Dataset index -> processed image (see imageCacheMb); Map order is the LRU order. */
  private readonly cache = new Map<number, ProcessedImage>();
  private cacheBytes = 0;
  private readonly cacheLimit: number;

  constructor(dataset: Dataset, options: LoaderOptions) {
    const n = dataset.items.length;
    if (n === 0) throw new Error('BatchLoader: the dataset is empty');
    this.dataset = dataset;
    this.options = { ...options };
    this.order = new SampleOrder(n, { seed: options.seed, rank: options.rank, worldSize: options.worldSize, cursor: options.cursor });
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
    if (this.cacheLimit > 0) {
      const hit = this.cache.get(index);
      if (hit) {
        this.cache.delete(index);
        this.cache.set(index, hit);
        out.set(hit.pixels);
        this.cacheStats.hits++;
        return { ...hit, pixels: out };
      }
    }
    const img = await this.sem.run(() => withFile(item.path, processImage(item.path, imageOptions, rng, out)));
    if (this.cacheLimit > 0) {
      this.cacheStats.misses++;
      const bytes = img.pixels.byteLength;
      if (bytes <= this.cacheLimit && !this.cache.has(index)) {
        for (const [k, v] of this.cache) {
          if (this.cacheBytes + bytes <= this.cacheLimit) break;
          this.cache.delete(k);
          this.cacheBytes -= v.pixels.byteLength;
        }
        this.cache.set(index, { ...img, pixels: Float32Array.from(img.pixels) });
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
    const opts: ImageTransformOptions = { ...this.imageOptions(), centerCrop: true, randomFlip: false };
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

  private fill(): void {
    while (!this.closed && this.queue.length < this.prefetch) this.queue.push(this.schedule());
  }

  private schedule(): Promise<Batch> {
    const s = this.order.nextBatch(this.options.batchSize);
    const res = this.options.resolution;
    const per = 3 * res * res;
    const pixelValues = new Float32Array(s.indices.length * per);
    const imageOptions = this.imageOptions();
    const seed = this.options.seed;
    const work = Promise.all(
      s.indices.map((index, k) => this.processed(index, imageOptions, derive(seed, AUGMENT_KEY, s.epoch, index), pixelValues.subarray(k * per, (k + 1) * per))),
    ).then(
      (images): Batch => ({
        indices: s.indices,
        pixelValues,
        captions: s.indices.map((i) => pickCaption(this.dataset.items[i].captions, seed, s.epoch, i, this.options.captionDropoutRate)),
        geometry: images.map(({ pixels: _pixels, ...geometry }) => geometry),
        epoch: s.epoch,
        position: s.position,
        positionAfter: s.positionAfter,
        lastInEpoch: s.lastInEpoch,
      }),
    );
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
