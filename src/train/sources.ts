/**
 * Where micro-batches come from: decoded images (the prefetching BatchLoader), or VAE posteriors cached once per
 * image (`--cache-latents`: each step samples mean + std·N(0,1) natively, as diffusers' latent_dist.sample()).
 * Both follow the same seeded SampleOrder, so a checkpoint's data cursor means the same thing for either.
 */
import { trainingCaption } from '../data/captions';
import type { Dataset } from '../data/dataset';
import { maskToLatent } from '../data/images';
import { BatchLoader, type DataOrder, type LoaderOptions, makeDataOrder } from '../data/loader';
import type { SampleOrderState } from '../data/sampler';
import { native, type PipelineHandle, type TrainBatch } from '../native';
import { fromFloat32, numel } from '../tensors';

export interface MicroBatch {
  indices: number[];
  captions: string[];
  epoch: number;
  lastInEpoch: boolean;
  /** The image part of the native micro-batch. */
  images: Pick<TrainBatch, 'pixelValues' | 'latentMean' | 'latentStd' | 'lossMask'>;
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

export interface LatentCache {
  /** [C, h, w] of every item (its bucket's latent size with --enable-bucket). */
  shapes: number[][];
  mean: Float32Array[];
  std: Float32Array[];
  /** --masked-loss: each item's loss weights at its latent size (undefined: no mask). */
  masks?: Array<Float32Array | undefined>;
}

/**
 * Encodes every image once (center crop, no flip) with the pipeline's VAE, in chunks of images of one size (one
 * bucket), so each image is encoded exactly once whatever its bucket.
 */
export async function buildLatentCache(pipe: PipelineHandle, dataset: Dataset, opts: LoaderOptions, onProgress?: (done: number, total: number) => void): Promise<LatentCache> {
  const loader = new BatchLoader(dataset, { ...opts, prefetchBatches: 0 });
  const n = dataset.items.length;
  const cache: LatentCache = { shapes: new Array(n), mean: new Array(n), std: new Array(n), ...(opts.masks ? { masks: new Array(n) } : {}) };
  const chunk = 8;
  // Items grouped by output size (bucket), each group in index order.
  const groups = new Map<string, number[]>();
  for (let i = 0; i < n; i++) {
    const b = loader.imageOptionsFor(i).bucket;
    const key = b ? `${b.width}x${b.height}` : 'square';
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key)!.push(i);
  }
  let done = 0;
  try {
    for (const members of groups.values()) {
      for (let start = 0; start < members.length; start += chunk) {
        const idx = members.slice(start, start + chunk);
        const imgs = await Promise.all(idx.map((i) => loader.loadForCache(i)));
        const { width: w, height: h } = imgs[0];
        const px = new Float32Array(idx.length * 3 * w * h);
        imgs.forEach((im, k) => px.set(im.pixels, k * 3 * w * h));
        const [mean, std] = await native().vaeEncode(pipe, fromFloat32('pixel_values', [idx.length, 3, h, w], px));
        const shape = mean.shape.slice(1);
        const per = numel(shape);
        const m = new Float32Array(mean.data.buffer.slice(mean.data.byteOffset, mean.data.byteOffset + mean.data.byteLength));
        const s = new Float32Array(std.data.buffer.slice(std.data.byteOffset, std.data.byteOffset + std.data.byteLength));
        idx.forEach((i, k) => {
          cache.shapes[i] = shape;
          cache.mean[i] = m.slice(k * per, (k + 1) * per);
          cache.std[i] = s.slice(k * per, (k + 1) * per);
          const mk = imgs[k].mask;
          if (cache.masks && mk) cache.masks[i] = maskToLatent(mk, w, h, opts.masks!.stride);
        });
        done += idx.length;
        onProgress?.(done, n);
      }
    }
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
    const shape1 = this.cache.shapes[s.indices[0]];
    const per = numel(shape1);
    const mean = new Float32Array(s.indices.length * per);
    const std = new Float32Array(s.indices.length * per);
    s.indices.forEach((i, k) => {
      mean.set(this.cache.mean[i], k * per);
      std.set(this.cache.std[i], k * per);
    });
    const shape = [s.indices.length, ...shape1];
    const images: MicroBatch['images'] = { latentMean: fromFloat32('latent_mean', shape, mean), latentStd: fromFloat32('latent_std', shape, std) };
    if (this.cache.masks) {
      const cells = shape1[1] * shape1[2];
      const lm = new Float32Array(s.indices.length * cells).fill(1);
      s.indices.forEach((i, k) => {
        const m = this.cache.masks![i];
        if (m) lm.set(m, k * cells);
      });
      images.lossMask = fromFloat32('loss_mask', [s.indices.length, 1, shape1[1], shape1[2]], lm);
    }
    const o = this.opts;
    return {
      indices: s.indices,
      captions: s.indices.map((i) => trainingCaption(this.dataset.items[i].captions, o.seed, s.epoch, i, { dropoutRate: o.captionDropoutRate, ...o.captionOptions })),
      epoch: s.epoch,
      lastInEpoch: s.lastInEpoch,
      images,
    };
  }
  state(): SampleOrderState {
    return this.order.state();
  }
  async close(): Promise<void> {}
}
