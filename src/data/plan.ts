/**
 * The data options of issue 17 as the training loop uses them: aspect-ratio buckets (--enable-bucket and its
 * settings), masks (--masked-loss with --alpha-mask or --mask-dir), caption tag shuffling. Kept apart from
 * train.ts: the loop asks for a DataPlan once and passes its parts to the loader, the latent cache and val_loss.
 */
import type { TrainConfig } from '../config';
import { flagName } from '../config';
import { assignBuckets, type BucketSettings, bucketSettingsProblems, type BucketTable, describeBuckets, modelPixelStride, vaeStride } from './buckets';
import { type Dataset, DatasetError } from './dataset';
import type { LoaderOptions, MaskOptions } from './loader';
import { findMasks } from './masks';

export interface DataPlan {
  /** --enable-bucket: the training images' buckets. */
  table?: BucketTable;
  /** --enable-bucket: the held-out images' buckets (val_loss). */
  heldOutTable?: BucketTable;
  masks?: MaskOptions;
  heldOutMasks?: MaskOptions;
}

/** Options that decide the buckets: a resume with other values would change the data order mid-run. */
export const BUCKET_KEYS = ['enable_bucket', 'min_bucket_reso', 'max_bucket_reso', 'bucket_reso_steps', 'bucket_no_upscale'] as const;

export function bucketSettings(cfg: TrainConfig): BucketSettings {
  return { resolution: cfg.resolution, minReso: cfg.min_bucket_reso, maxReso: cfg.max_bucket_reso, step: cfg.bucket_reso_steps, noUpscale: cfg.bucket_no_upscale };
}

interface Reporter {
  info(m: string, d?: Record<string, unknown>): void;
  warn(m: string, d?: Record<string, unknown>): void;
}

/** Buckets one dataset: too-small images are an error naming them, or (--skip-bad-images) left out with a warning. */
export function bucketDataset(cfg: TrainConfig, ds: Dataset, report: Reporter, what: string): { dataset: Dataset; table: BucketTable } {
  const s = bucketSettings(cfg);
  let { table, tooSmall } = assignBuckets(ds.items, s);
  if (tooSmall.length === 0) return { dataset: ds, table };
  const list = tooSmall.map((t) => `  ${ds.items[t.index].file}: ${t.reason}`).join('\n');
  if (!cfg.skip_bad_images)
    throw new DatasetError(
      ds.root,
      `${tooSmall.length} ${what} image(s) are too small for the smallest bucket:\n${list}`,
      'use larger images, lower --min-bucket-reso or --bucket-reso-steps, drop --bucket-no-upscale (they are then enlarged), or pass --skip-bad-images to train without them',
    );
  for (const t of tooSmall) report.warn(`--skip-bad-images: left out ${ds.items[t.index].file}: ${t.reason}`);
  const gone = new Set(tooSmall.map((t) => t.index));
  const items = ds.items.filter((_, i) => !gone.has(i));
  if (items.length === 0) throw new DatasetError(ds.root, `every ${what} image is too small for the smallest bucket`, 'use larger images or lower --min-bucket-reso');
  const dataset: Dataset = { ...ds, items, counts: { ...ds.counts, images: items.length } };
  ({ table } = assignBuckets(items, s));
  return { dataset, table };
}

/**
 * Buckets and masks for the training (and held-out) images. May leave out too-small images (--skip-bad-images):
 * `data.dataset` / `data.heldOut` are then replaced. Logs the bucket table.
 */
export async function planData(cfg: TrainConfig, report: Reporter, modelDir: string, data: { dataset: Dataset; heldOut?: Dataset }, log = true): Promise<DataPlan> {
  const plan: DataPlan = {};
  if (cfg.enable_bucket) {
    const stride = modelPixelStride(modelDir);
    const problems = bucketSettingsProblems(bucketSettings(cfg), stride);
    if (problems.length) throw new Error(`aspect-ratio buckets:\n  - ${problems.join('\n  - ')}`);
    const train = bucketDataset(cfg, data.dataset, report, 'training');
    data.dataset = train.dataset;
    plan.table = train.table;
    if (data.heldOut) {
      const held = bucketDataset(cfg, data.heldOut, report, 'held-out');
      data.heldOut = held.dataset;
      plan.heldOutTable = held.table;
    }
    if (log) {
      const t = plan.table;
      report.info(`--enable-bucket: ${t.buckets.length} buckets (area <= ${cfg.resolution}², sides ${cfg.min_bucket_reso}..${cfg.max_bucket_reso} in steps of ${cfg.bucket_reso_steps}${cfg.bucket_no_upscale ? ', no upscaling' : ''}):\n${describeBuckets(t).join('\n')}`, {
        buckets: t.buckets.map((b) => ({ width: b.width, height: b.height, images: b.items.length })),
      });
    }
  }
  if (cfg.masked_loss) {
    const stride = vaeStride(modelDir);
    if (!cfg.enable_bucket && cfg.resolution % stride !== 0) throw new Error(`${flagName('masked_loss')}: --resolution ${cfg.resolution} must be a multiple of ${stride} (the VAE's downsampling)`);
    if (cfg.alpha_mask) {
      plan.masks = { sources: 'alpha', stride };
      if (data.heldOut) plan.heldOutMasks = { sources: 'alpha', stride };
    } else {
      const all = data.heldOut ? [data.dataset, data.heldOut] : [data.dataset];
      const sources = await findMasks(cfg.mask_dir!, data.dataset, all);
      plan.masks = { sources, stride };
      if (data.heldOut) plan.heldOutMasks = { sources: await findMasks(cfg.mask_dir!, data.heldOut, all), stride };
      if (log) report.info(`--masked-loss: ${sources.filter((m) => m !== undefined).length} of ${sources.length} training images have a mask in ${cfg.mask_dir} (the others count fully)`);
    }
  }
  return plan;
}

/** Per-rank batches per epoch for the LR schedule: bucketed, each bucket is cut into global batches on its own. */
export function batchesPerEpochOnRank(plan: DataPlan, numImages: number, batchSize: number, world: number): number {
  const g = batchSize * world;
  if (!plan.table) return Math.ceil(numImages / g);
  return plan.table.buckets.reduce((n, b) => n + Math.ceil(b.items.length / g), 0);
}

/** The loader options of the plan and the caption flags. */
export function loaderExtras(cfg: TrainConfig, plan: DataPlan): Partial<LoaderOptions> {
  return {
    ...(plan.table ? { buckets: plan.table } : {}),
    ...(plan.masks ? { masks: plan.masks } : {}),
    ...(cfg.shuffle_caption ? { captionOptions: { shuffle: true, keepTokens: cfg.keep_tokens, keepTokensSeparator: cfg.keep_tokens_separator } } : {}),
  };
}

/** The bucket settings of a checkpoint's run and this one, where they differ ("--enable-bucket was true, now false"). */
export function bucketChanges(prev: Partial<TrainConfig>, cfg: TrainConfig): string[] {
  const out: string[] = [];
  const on = (c: Partial<TrainConfig>) => c.enable_bucket === true;
  if (!on(prev) && !on(cfg)) return out;
  for (const k of BUCKET_KEYS) {
    const a = (prev as Record<string, unknown>)[k];
    const b = (cfg as Record<string, unknown>)[k];
    if (a === undefined && k !== 'enable_bucket') continue;
    if ((a ?? false) !== b) out.push(`${flagName(k)} was ${String(a ?? false)}, now ${String(b)}`);
  }
  if (on(prev) && on(cfg) && prev.resolution !== cfg.resolution) out.push(`--resolution was ${prev.resolution}, now ${cfg.resolution} (it sets the bucket area)`);
  return out;
}
