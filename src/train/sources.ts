/**
 * Where micro-batches come from: decoded images (the prefetching BatchLoader), or VAE posteriors cached once per
 * image (`--cache-latents`: each step samples mean + std·N(0,1) natively, as diffusers' latent_dist.sample()).
 * Both follow the same seeded SampleOrder, so a checkpoint's data cursor means the same thing for either.
 */
import { pickCaption, type Dataset } from '../data/dataset';
import { BatchLoader, type LoaderOptions } from '../data/loader';
import { SampleOrder, type SampleOrderState, type ShardOptions } from '../data/sampler';
import { native, type HostTensor, type PipelineHandle, type TrainBatch } from '../native';
import { fromFloat32, numel } from '../tensors';

export interface MicroBatch {
  indices: number[];
  captions: string[];
  epoch: number;
  lastInEpoch: boolean;
  /** The image part of the native micro-batch. */
  images: Pick<TrainBatch, 'pixelValues' | 'latentMean' | 'latentStd'>;
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
    const r = this.opts.resolution;
    return {
      indices: b.indices,
      captions: b.captions,
      epoch: b.epoch,
      lastInEpoch: b.lastInEpoch,
      images: { pixelValues: fromFloat32('pixel_values', [b.indices.length, 3, r, r], b.pixelValues) },
    };
  }
  state(): SampleOrderState {
    return this.loader.state();
  }
  close(): Promise<void> {
    return this.loader.close();
  }
}

export interface LatentCache {
  shape: number[]; // [C, h, w]
  mean: Float32Array[];
  std: Float32Array[];
}

/** Encodes every image once (center crop, no flip) with the pipeline's VAE. */
export async function buildLatentCache(pipe: PipelineHandle, dataset: Dataset, opts: LoaderOptions, onProgress?: (done: number, total: number) => void): Promise<LatentCache> {
  const loader = new BatchLoader(dataset, { ...opts, prefetchBatches: 0 });
  const n = dataset.items.length;
  const r = opts.resolution;
  const cache: LatentCache = { shape: [], mean: new Array(n), std: new Array(n) };
  const chunk = 8;
  try {
    for (let start = 0; start < n; start += chunk) {
      const idx = Array.from({ length: Math.min(chunk, n - start) }, (_, k) => start + k);
      const imgs = await Promise.all(idx.map((i) => loader.loadForCache(i)));
      const px = new Float32Array(idx.length * 3 * r * r);
      imgs.forEach((im, k) => px.set(im.pixels, k * 3 * r * r));
      const [mean, std] = await native().vaeEncode(pipe, fromFloat32('pixel_values', [idx.length, 3, r, r], px));
      cache.shape = mean.shape.slice(1);
      const per = numel(cache.shape);
      const m = new Float32Array(mean.data.buffer.slice(mean.data.byteOffset, mean.data.byteOffset + mean.data.byteLength));
      const s = new Float32Array(std.data.buffer.slice(std.data.byteOffset, std.data.byteOffset + std.data.byteLength));
      idx.forEach((i, k) => {
        cache.mean[i] = m.slice(k * per, (k + 1) * per);
        cache.std[i] = s.slice(k * per, (k + 1) * per);
      });
      onProgress?.(Math.min(start + chunk, n), n);
    }
  } finally {
    await loader.close();
  }
  return cache;
}

export class CachedLatentSource implements MicroBatchSource {
  private readonly order: SampleOrder;
  constructor(
    private readonly dataset: Dataset,
    private readonly cache: LatentCache,
    private readonly batchSize: number,
    private readonly seed: number,
    cursor?: { epoch: number; position: number },
    shard: ShardOptions = {},
    private readonly captionDropoutRate = 0,
  ) {
    this.order = new SampleOrder(dataset.items.length, { seed, cursor, ...shard });
  }
  async next(): Promise<MicroBatch> {
    const s = this.order.nextBatch(this.batchSize);
    const per = numel(this.cache.shape);
    const mean = new Float32Array(s.indices.length * per);
    const std = new Float32Array(s.indices.length * per);
    s.indices.forEach((i, k) => {
      mean.set(this.cache.mean[i], k * per);
      std.set(this.cache.std[i], k * per);
    });
    const shape = [s.indices.length, ...this.cache.shape];
    const images: { latentMean: HostTensor; latentStd: HostTensor } = { latentMean: fromFloat32('latent_mean', shape, mean), latentStd: fromFloat32('latent_std', shape, std) };
    return {
      indices: s.indices,
      captions: s.indices.map((i) => pickCaption(this.dataset.items[i].captions, this.seed, s.epoch, i, this.captionDropoutRate)),
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
