/**
 * Where micro-batches come from: decoded images (the prefetching BatchLoader), or VAE posteriors cached natively once
 * per image (`--cache-latents`: each step samples mean + std·N(0,1) natively, as diffusers' latent_dist.sample()).
 * Both follow the same seeded SampleOrder, so a checkpoint's data cursor means the same thing for either.
 */
import { trainingCaption } from '../data/captions';
import type { Dataset } from '../data/dataset';
import { maskToLatent } from '../data/images';
import { BatchLoader, type DataOrder, type LoaderOptions, makeDataOrder } from '../data/loader';
import type { SampleOrderState } from '../data/sampler';
import { type HostTensor, type LatentCacheHandle, native, type PipelineHandle, type TrainBatch } from '../native';
import { fromFloat32 } from '../tensors';

export interface MicroBatch {
  indices: number[];
  captions: string[];
  epoch: number;
  lastInEpoch: boolean;
  /** The image part of the native micro-batch. */
  images: Pick<TrainBatch, 'pixelValues' | 'cached' | 'lossMask'>;
}

export interface MicroBatchSource {
  next(): Promise<MicroBatch>;
  /** The data cursor after the last batch returned. */
  state(): SampleOrderState;
  close(): Promise<void>;
}

export class ImageSource implements MicroBatchSource {
  private readonly loader: BatchLoader;
  constructor(dataset: Dataset, private readonly opts: LoaderOptions) {
    this.loader = new BatchLoader(dataset, opts);
  }
  async next(): Promise<MicroBatch> {
    const b = await this.loader.next();
    const n = b.indices.length;
    const images: MicroBatch['images'] = { pixelValues: fromFloat32('pixel_values', [n, 3, b.height, b.width], b.pixelValues) };
    const stride = this.opts.masks?.stride ?? 8;
    if (b.lossMask) images.lossMask = fromFloat32('loss_mask', [n, 1, b.height / stride, b.width / stride], b.lossMask);
    return { indices: b.indices, captions: b.captions, epoch: b.epoch, lastInEpoch: b.lastInEpoch, images };
  }
  state(): SampleOrderState {
    return this.loader.state();
  }
  close(): Promise<void> {
    return this.loader.close();
  }
}

/**
 * Every image's VAE posterior, held natively (one encode per image); micro-batches name their items and the addon
 * gathers them, so no latent crosses into JS. Dispose it (close) when done.
 */
export interface LatentCache {
  handle: LatentCacheHandle;
  /** [C, h, w] of every item (its bucket's latent size with --enable-bucket). */
  shapes: number[][];
  /** The items by size (bucket), each group in index order, the groups in the order of their first item. */
  groups: number[][];
}

/**
 * Encodes every image once (center crop, no flip) with the pipeline's VAE, in chunks of images of one size (one
 * bucket), so each image is encoded exactly once whatever its bucket. With masks (--masked-loss) each item keeps its
 * loss weights at the latent size (all ones for an image without a mask).
 */
export async function buildLatentCache(pipe: PipelineHandle, dataset: Dataset, opts: LoaderOptions, onProgress?: (done: number, total: number) => void): Promise<LatentCache> {
  const loader = new BatchLoader(dataset, { ...opts, prefetchBatches: 0 });
  const n = dataset.items.length;
  // The items by output size (bucket), so each image is encoded once, in a chunk of its own size.
  const groups = opts.buckets ? opts.buckets.buckets.map((b) => b.items).sort((a, b) => a[0] - b[0]) : n ? [Array.from({ length: n }, (_, i) => i)] : [];
  const cache: LatentCache = { handle: native().latentCacheCreate(pipe), shapes: new Array(n), groups };
  const chunk = 8;
  let done = 0;
  try {
    for (const members of groups) {
      for (let start = 0; start < members.length; start += chunk) {
        const idx = members.slice(start, start + chunk);
        const imgs = await Promise.all(idx.map((i) => loader.loadForCache(i)));
        const { width: w, height: h } = imgs[0];
        const px = new Float32Array(idx.length * 3 * w * h);
        imgs.forEach((im, k) => px.set(im.pixels, k * 3 * w * h));
        let lossMask: HostTensor | undefined;
        if (opts.masks) {
          const stride = opts.masks.stride;
          const cells = (w / stride) * (h / stride);
          const m = new Float32Array(idx.length * cells).fill(1);
          imgs.forEach((im, k) => im.mask && maskToLatent(im.mask, w, h, stride, m.subarray(k * cells, (k + 1) * cells)));
          lossMask = fromFloat32('loss_mask', [idx.length, 1, h / stride, w / stride], m);
        }
        const shape = await native().latentCacheEncode(cache.handle, idx, fromFloat32('pixel_values', [idx.length, 3, h, w], px), lossMask);
        for (const i of idx) cache.shapes[i] = shape;
        done += idx.length;
        onProgress?.(done, n);
      }
    }
  } catch (e) {
    native().dispose(cache.handle);
    throw e;
  } finally {
    await loader.close();
  }
  return cache;
}

export class CachedLatentSource implements MicroBatchSource {
  private readonly order: DataOrder;
  constructor(
    private readonly dataset: Dataset,
    private readonly cache: LatentCache,
    private readonly opts: LoaderOptions,
  ) {
    this.order = makeDataOrder(dataset.items.length, opts);
  }
  async next(): Promise<MicroBatch> {
    const s = this.order.nextBatch(this.opts.batchSize);
    const o = this.opts;
    return {
      indices: s.indices,
      captions: s.indices.map((i) => trainingCaption(this.dataset.items[i].captions, o.seed, s.epoch, i, { dropoutRate: o.captionDropoutRate, ...o.captionOptions })),
      epoch: s.epoch,
      lastInEpoch: s.lastInEpoch,
      images: { cached: { cache: this.cache.handle, items: s.indices } },
    };
  }
  state(): SampleOrderState {
    return this.order.state();
  }
  async close(): Promise<void> {
    native().dispose(this.cache.handle);
  }
}
