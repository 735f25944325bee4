/**
 * kohya-ss / sd-scripts specifics of a LoRA file: the `ss_*` training metadata that sd-scripts writes
 * (train_network.py: every key it writes for an SD 1.x LoRA, see kohyaMetadata; ss_sd_model_hash /
 * ss_new_sd_model_hash by train_util.model_hash / calculate_sha256, see baseModelHashes), the `modelspec.*` keys it
 * adds (library/sai_model_spec.py, see modelSpecMetadata), and the two model hashes it precalculates
 * (library/train_util.py precalculate_safetensors_hashes), which A1111 / sd-webui-additional-networks use to identify
 * the file.
 *
 *   sshs_model_hash   sha256 of the data section (everything after the header) of
 *                     `safetensors.torch.save(tensors, {ss_* metadata only})`
 *   sshs_legacy_hash  the first 8 hex digits of sha256 of bytes [0x100000, 0x110000) of that same serialization
 *                     (sha256 of nothing when it is shorter than 1 MiB)
 *
 * The LoRA file is written with its tensors in the order Python's safetensors uses (sorted by name; every tensor is
 * F32), so its data section is byte for byte the one sd-scripts hashes: the hashes are computed on the file as
 * written, then added to its header (the data section does not move).
 */
import { createHash, randomInt } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';

import { fsyncPath } from '../checkpoint/fsutil';

/** Python's str() of a float: 8.0, 0.0001, 1e-05, 1.5e+20. */
export function pyFloat(x: number): string {
  if (!Number.isFinite(x)) return Number.isNaN(x) ? 'nan' : x > 0 ? 'inf' : '-inf';
  if (x === 0) return Object.is(x, -0) ? '-0.0' : '0.0';
  const [mant, expStr] = x.toExponential().split('e');
  const exp = Number(expStr);
  if (exp < -4 || exp >= 16) return `${mant}e${exp < 0 ? '-' : '+'}${String(Math.abs(exp)).padStart(2, '0')}`;
  const s = String(x);
  return s.includes('.') ? s : `${s}.0`;
}

/** sd-scripts' ss_bucket_info: {"buckets": {"0": {"resolution": [w, h], "count": n}, ...}, "mean_img_ar_error": x}. */
export interface KohyaBucketInfo {
  buckets: Record<string, { resolution: [number, number]; count: number }>;
  mean_img_ar_error: number;
}

/** What the ss_* metadata describes. */
export interface KohyaTrainingInfo {
  /** --enable-bucket (ss_enable_bucket, ss_bucket_no_upscale, ss_min/max_bucket_reso, ss_bucket_info; info unknown: null). */
  buckets?: { noUpscale: boolean; minReso: number; maxReso: number; info?: KohyaBucketInfo };
  /** --shuffle-caption, --keep-tokens (ss_shuffle_caption, ss_keep_tokens). */
  shuffleCaption?: boolean;
  keepTokens?: number;
  rank: number;
  alpha: number;
  /** LoCon: the rank / alpha of 3x3 conv adapters (sd-scripts' network_args conv_dim / conv_alpha). */
  convRank?: number;
  convAlpha?: number;
  dropout: number;
  steps: number;
  /** 1-based, as sd-scripts counts epochs (the epoch the last step belongs to). */
  epoch: number;
  resolution: number;
  numTrainImages: number;
  /** Held-out images for val_loss (ss_num_validation_images). */
  numValidationImages?: number;
  learningRate: number;
  lrScheduler: string;
  lrWarmupSteps: number;
  maxTrainSteps: number;
  seed: number;
  mixedPrecision: string;
  trainBatchSize: number;
  gradientAccumulationSteps: number;
  /** Data-parallel processes (ss_total_batch_size, ss_num_batches_per_epoch); default 1. */
  numProcesses?: number;
  gradientCheckpointing: boolean;
  cacheLatents: boolean;
  maxGradNorm: number;
  noiseOffset: number;
  snrGamma?: number;
  captionDropoutRate?: number;
  randomFlip?: boolean;
  centerCrop?: boolean;
  /** --image-interpolation-mode (ss_resize_interpolation). */
  resizeInterpolation?: string;
  validationSplit?: number;
  adam: { beta1: number; beta2: number; weightDecay: number; epsilon: number };
  /** Unix time in seconds. */
  trainingStartedAt: number;
  trainingFinishedAt: number;
  outputName: string;
  /** The base model folder or single file (its basename is ss_sd_model_name, as sd-scripts writes for a local path). */
  baseModel: string;
  /** sd-scripts' model_hash / calculate_sha256 of the base model's weights (see baseModelHashes). */
  baseModelHashes?: { legacy: string; sha256: string };
  textEncoderTrained: boolean;
  /** --text-encoder-lr (ss_text_encoder_lr when the text encoder is trained; default learningRate). */
  textEncoderLr?: number;
  /** The training data folder (its basename keys ss_dataset_dirs and ss_tag_frequency, as sd-scripts' image_dir). */
  trainDataDir?: string;
  /** The caption of each training image (sd-scripts reads the first line of a caption file: the first variant); when
   *  unknown (a checkpoint export whose data folder changed), ss_tag_frequency is "{}". */
  captions?: readonly string[];
  /** ss_session_id (sd-scripts: random.randint(0, 2**32) per training session); default random. */
  sessionId?: number;
  /** 'epsilon' or 'v_prediction' (modelspec.prediction_type). */
  predictionType?: string;
  /** train-lora's version (modelspec.implementation_version). */
  version?: string;
}

/**
 * sd-scripts' tag frequency of one folder's captions (library/train_util.py BaseDataset.set_tag_frequency): each caption
 * split at commas, each tag stripped and lowercased, empty tags skipped, counted.
 */
export function tagFrequency(captions: readonly string[]): Map<string, number> {
  const f = new Map<string, number>();
  for (const caption of captions)
    for (let tag of caption.split(',')) {
      tag = pyStrip(tag);
      if (!tag) continue;
      tag = tag.toLowerCase();
      f.set(tag, (f.get(tag) ?? 0) + 1);
    }
  return f;
}

/** Python's str.strip(): the characters str.isspace() counts. */
function pyStrip(s: string): string {
  const ws = '[\\t\\n\\v\\f\\r \\x1c-\\x1f\\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000]';
  return s.replace(new RegExp(`^${ws}+|${ws}+$`, 'g'), '');
}

/** Python's json.dumps (ensure_ascii, ", " and ": " separators, insertion order: a Map keeps it for number-like keys too). */
export function pyJson(v: unknown): string {
  const esc = (s: string): string => JSON.stringify(s).replace(/[\u0080-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
  const enc = (x: unknown): string => {
    if (x === null || x === undefined) return 'null';
    if (typeof x === 'string') return esc(x);
    if (typeof x === 'number') return Number.isInteger(x) ? String(x) : pyFloat(x);
    if (typeof x === 'boolean') return x ? 'true' : 'false';
    if (Array.isArray(x)) return `[${x.map(enc).join(', ')}]`;
    return `{${(x instanceof Map ? [...(x as Map<string, unknown>).entries()] : Object.entries(x as Record<string, unknown>))
      .map(([k, val]) => `${esc(k)}: ${enc(val)}`)
      .join(', ')}}`;
  };
  return enc(v);
}

/** Python's datetime.datetime.fromtimestamp(int(t)).isoformat(): local time, no zone, whole seconds. */
function localIsoSeconds(t: number): string {
  const d = new Date(Math.floor(t) * 1000);
  const p = (n: number): string => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

/**
 * Every ss_* key sd-scripts' train_network.py writes for an SD 1.x LoRA trained from a folder (its
 * `train_data_dir` path, no dataset config; no --vae), spelled as its `str(value)` spells them: booleans
 * `True`/`False`, unset options `None`, floats as Python prints them, JSON values as json.dumps writes them. Options
 * train-lora does not have carry sd-scripts' defaults; ss_sd_scripts_commit_hash is "(unknown)", what sd-scripts
 * writes when it cannot tell. Plus ss_network_train_unet_only and ss_network_args ("{}", or sd-scripts'
 * {"conv_dim": ..., "conv_alpha": ...} for a LoCon run), which train-lora has always written.
 */
export function kohyaMetadata(i: KohyaTrainingInfo): Record<string, string> {
  const none = (v: number | undefined) => (v === undefined || v === 0 ? 'None' : pyFloat(v));
  const bool = (b: boolean | undefined) => (b ? 'True' : 'False');
  const world = i.numProcesses ?? 1;
  // Bucketed: each bucket is cut into global batches on its own (src/data/buckets.ts BucketOrder).
  const bucketCounts = i.buckets?.info ? Object.values(i.buckets.info.buckets).map((b) => b.count) : undefined;
  const batchesPerEpoch = bucketCounts
    ? Math.max(1, bucketCounts.reduce((n, c) => n + Math.ceil(c / (i.trainBatchSize * world)), 0))
    : Math.max(1, Math.ceil(i.numTrainImages / (i.trainBatchSize * world)));
  const numEpochs = Math.ceil(i.maxTrainSteps / Math.ceil(batchesPerEpoch / i.gradientAccumulationSteps));
  const dirName = i.trainDataDir ? path.basename(path.resolve(i.trainDataDir)) : 'train_data';
  const m: Record<string, string> = {
    ss_session_id: String(i.sessionId ?? randomInt(0, 2 ** 32)),
    ss_training_started_at: pyFloat(i.trainingStartedAt),
    ss_output_name: i.outputName,
    ss_learning_rate: pyFloat(i.learningRate),
    ss_text_encoder_lr: i.textEncoderTrained ? pyFloat(i.textEncoderLr ?? i.learningRate) : 'None',
    ss_unet_lr: pyFloat(i.learningRate),
    ss_num_train_images: String(i.numTrainImages),
    ss_num_validation_images: String(i.numValidationImages ?? 0),
    ss_num_reg_images: '0',
    ss_num_batches_per_epoch: String(batchesPerEpoch),
    ss_num_epochs: String(numEpochs),
    ss_gradient_checkpointing: bool(i.gradientCheckpointing),
    ss_gradient_accumulation_steps: String(i.gradientAccumulationSteps),
    ss_max_train_steps: String(i.maxTrainSteps),
    ss_lr_warmup_steps: String(i.lrWarmupSteps),
    ss_lr_scheduler: i.lrScheduler,
    ss_network_module: 'networks.lora',
    ss_network_dim: String(i.rank),
    ss_network_alpha: pyFloat(i.alpha),
    ss_network_dropout: none(i.dropout),
    ss_mixed_precision: i.mixedPrecision,
    ss_full_fp16: 'False',
    ss_v2: 'False',
    ss_base_model_version: 'sd_v1',
    ss_clip_skip: 'None',
    ss_max_token_length: 'None',
    ss_cache_latents: bool(i.cacheLatents),
    ss_seed: String(i.seed),
    ss_lowram: 'False',
    ss_noise_offset: none(i.noiseOffset),
    ss_multires_noise_iterations: 'None',
    ss_multires_noise_discount: '0.3',
    ss_adaptive_noise_scale: 'None',
    ss_zero_terminal_snr: 'False',
    ss_training_comment: 'None',
    ss_sd_scripts_commit_hash: '(unknown)',
    ss_optimizer: `torch.optim.adamw.AdamW(weight_decay=${pyFloat(i.adam.weightDecay)},betas=(${pyFloat(i.adam.beta1)}, ${pyFloat(i.adam.beta2)}),eps=${pyFloat(i.adam.epsilon)})`,
    ss_max_grad_norm: pyFloat(i.maxGradNorm),
    ss_caption_dropout_rate: pyFloat(i.captionDropoutRate ?? 0),
    ss_caption_dropout_every_n_epochs: '0',
    ss_caption_tag_dropout_rate: '0.0',
    ss_face_crop_aug_range: 'None',
    ss_prior_loss_weight: '1.0',
    ss_min_snr_gamma: none(i.snrGamma),
    ss_scale_weight_norms: 'None',
    ss_ip_noise_gamma: 'None',
    ss_debiased_estimation: 'False',
    ss_noise_offset_random_strength: 'False',
    ss_ip_noise_gamma_random_strength: 'False',
    ss_loss_type: 'l2',
    ss_huber_schedule: 'snr',
    ss_huber_scale: '1.0',
    ss_huber_c: '0.1',
    ss_fp8_base: 'False',
    ss_fp8_base_unet: 'False',
    ss_validation_seed: 'None',
    ss_validation_split: pyFloat(i.validationSplit ?? 0),
    ss_max_validation_steps: 'None',
    ss_validate_every_n_epochs: 'None',
    ss_validate_every_n_steps: 'None',
    ss_resize_interpolation: i.resizeInterpolation ?? 'None',
    // The train_data_dir branch (one dataset, one folder).
    ss_batch_size_per_device: String(i.trainBatchSize),
    ss_total_batch_size: String(i.trainBatchSize * world * i.gradientAccumulationSteps),
    ss_resolution: `(${i.resolution}, ${i.resolution})`,
    ss_color_aug: 'False',
    ss_flip_aug: bool(i.randomFlip),
    ss_random_crop: bool(i.centerCrop === false),
    ss_shuffle_caption: bool(i.shuffleCaption),
    ss_enable_bucket: bool(i.buckets !== undefined),
    ss_bucket_no_upscale: bool(i.buckets?.noUpscale),
    ss_min_bucket_reso: i.buckets ? String(i.buckets.minReso) : 'None',
    ss_max_bucket_reso: i.buckets ? String(i.buckets.maxReso) : 'None',
    ss_keep_tokens: String(i.keepTokens ?? 0),
    ss_dataset_dirs: pyJson(new Map([[dirName, { n_repeats: 1, img_count: i.numTrainImages }]])),
    ss_reg_dataset_dirs: pyJson({}),
    ss_tag_frequency: i.captions ? pyJson(new Map([[dirName, tagFrequency(i.captions)]])) : '{}',
    // sd-scripts: json.dumps(dataset.bucket_info), None (null) without buckets; ss_resolution stays the --resolution pair.
    ss_bucket_info: i.buckets?.info ? pyJson(i.buckets.info) : 'null',
    // sd-scripts records --network_args as the strings given: conv_dim=... conv_alpha=...
    ss_network_args: pyJson(i.convRank !== undefined ? { conv_dim: String(i.convRank), conv_alpha: String(i.convAlpha ?? i.convRank) } : {}),
    ss_network_train_unet_only: bool(!i.textEncoderTrained),
  };
  if (i.baseModelHashes) {
    m.ss_sd_model_hash = i.baseModelHashes.legacy;
    m.ss_new_sd_model_hash = i.baseModelHashes.sha256;
  }
  m.ss_sd_model_name = path.basename(path.resolve(i.baseModel));
  m.ss_training_finished_at = pyFloat(i.trainingFinishedAt);
  m.ss_steps = String(i.steps);
  m.ss_epoch = String(i.epoch);
  return m;
}

/**
 * The modelspec.* keys sd-scripts adds to a LoRA it saves (library/sai_model_spec.py build_metadata for an SD 1.x
 * LoRA: lora=True, no SDXL): sai_model_spec 1.0.1, architecture stable-diffusion-v1/lora, implementation diffusers,
 * title = the output name, resolution WxH, date (local ISO time of the save, whole seconds), prediction_type, and
 * implementation_version (here train-lora/<version>). modelspec.hash_sha256 is added with the sshs hashes
 * (addKohyaHashes).
 */
export function modelSpecMetadata(i: Pick<KohyaTrainingInfo, 'outputName' | 'resolution' | 'trainingFinishedAt' | 'predictionType' | 'version'>): Record<string, string> {
  return {
    'modelspec.sai_model_spec': '1.0.1',
    'modelspec.architecture': 'stable-diffusion-v1/lora',
    'modelspec.implementation': 'diffusers',
    'modelspec.title': i.outputName,
    'modelspec.resolution': `${i.resolution}x${i.resolution}`,
    'modelspec.date': localIsoSeconds(i.trainingFinishedAt),
    'modelspec.prediction_type': i.predictionType === 'v_prediction' ? 'v' : 'epsilon',
    'modelspec.implementation_version': `train-lora/${i.version ?? 'unknown'}`,
  };
}

/**
 * sd-scripts' hashes of a base model file (library/train_util.py): model_hash, A1111's old hash (first 8 hex digits of
 * sha256 of the 0x10000 bytes at offset 0x100000; of fewer, or none, when the file is shorter), and calculate_sha256,
 * A1111's new hash (sha256 of the whole file). For a directory sd-scripts writes "IsADirectory" for both.
 */
export async function baseModelHashes(file: string): Promise<{ legacy: string; sha256: string }> {
  if (fs.statSync(file).isDirectory()) return { legacy: 'IsADirectory', sha256: 'IsADirectory' };
  const legacy = createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.alloc(0x10000);
    const n = fs.readSync(fd, buf, 0, 0x10000, 0x100000);
    legacy.update(buf.subarray(0, n));
  } finally {
    fs.closeSync(fd);
  }
  const full = createHash('sha256');
  for await (const chunk of fs.createReadStream(file, { highWaterMark: 1 << 22 })) full.update(chunk as Buffer);
  return { legacy: legacy.digest('hex').slice(0, 8), sha256: full.digest('hex') };
}

interface RawHeader {
  json: Record<string, unknown>;
  /** 8 + header length: where the data section starts. */
  dataStart: number;
}

function readRawHeader(file: string): RawHeader {
  const fd = fs.openSync(file, 'r');
  try {
    const len = Buffer.alloc(8);
    fs.readSync(fd, len, 0, 8, 0);
    const n = Number(len.readBigUInt64LE(0));
    const text = Buffer.alloc(n);
    fs.readSync(fd, text, 0, n, 8);
    return { json: JSON.parse(text.toString('utf8')) as Record<string, unknown>, dataStart: 8 + n };
  } finally {
    fs.closeSync(fd);
  }
}

/** A safetensors header as Python's safetensors serializes it: compact JSON, padded with spaces to 8 bytes. */
function serializeHeader(json: Record<string, unknown>): Buffer {
  let text = JSON.stringify(json);
  while ((8 + Buffer.byteLength(text)) % 8 !== 0) text += ' ';
  const body = Buffer.from(text, 'utf8');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(body.length));
  return Buffer.concat([len, body]);
}

/** sd-scripts' (sshs_model_hash, sshs_legacy_hash) for the tensors of `file` and its ss_* metadata. */
export function kohyaHashes(file: string): { modelHash: string; legacyHash: string } {
  const { json, dataStart } = readRawHeader(file);
  const meta = (json.__metadata__ ?? {}) as Record<string, string>;
  const ss = Object.fromEntries(Object.entries(meta).filter(([k]) => k.startsWith('ss_')));
  // The header sd-scripts serializes: only ss_* metadata, the same tensor entries (Python sorts them by dtype, then
  // name; the file is already in that order).
  const header: Record<string, unknown> = { __metadata__: ss };
  const entries = Object.entries(json).filter(([k]) => k !== '__metadata__');
  entries.sort(([, a], [, b]) => ((a as { data_offsets: number[] }).data_offsets[0] ?? 0) - ((b as { data_offsets: number[] }).data_offsets[0] ?? 0));
  for (const [k, v] of entries) header[k] = v;
  const prefix = serializeHeader(header);
  const data = fs.readFileSync(file).subarray(dataStart);
  const modelHash = createHash('sha256').update(data).digest('hex');
  // bytes [0x100000, 0x110000) of prefix + data
  const from = 0x100000;
  const to = 0x110000;
  const parts: Buffer[] = [];
  if (from < prefix.length) parts.push(prefix.subarray(from, Math.min(to, prefix.length)));
  const dFrom = Math.max(0, from - prefix.length);
  const dTo = Math.max(0, to - prefix.length);
  if (dFrom < data.length) parts.push(data.subarray(dFrom, Math.min(dTo, data.length)));
  const legacyHash = createHash('sha256').update(Buffer.concat(parts)).digest('hex').slice(0, 8);
  return { modelHash, legacyHash };
}

/** Adds metadata entries to a safetensors file's header, leaving the data section as it is (atomic replace). */
export function addSafetensorsMetadata(file: string, extra: Record<string, string>): void {
  const { json, dataStart } = readRawHeader(file);
  json.__metadata__ = { ...((json.__metadata__ ?? {}) as Record<string, string>), ...extra };
  const tmp = `${file}.tmp-${process.pid}`;
  const data = fs.readFileSync(file).subarray(dataStart);
  try {
    const fd = fs.openSync(tmp, 'w');
    try {
      fs.writeSync(fd, serializeHeader(json));
      fs.writeSync(fd, data);
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, file);
  } catch (e) {
    fs.rmSync(tmp, { force: true });
    throw e;
  }
  fsyncPath(path.dirname(file));
}

/**
 * Writes sshs_model_hash and sshs_legacy_hash into a kohya LoRA file, and modelspec.hash_sha256 when the file has
 * modelspec.* keys (the model spec's rule: "0x" + sha256 of each tensor's bytes in order, which for this file, tensors
 * back to back in the data section, is "0x" + sshs_model_hash); returns the sshs hashes.
 */
export function addKohyaHashes(file: string): { modelHash: string; legacyHash: string } {
  const h = kohyaHashes(file);
  const { json } = readRawHeader(file);
  const hasSpec = Object.keys((json.__metadata__ ?? {}) as Record<string, string>).some((k) => k.startsWith('modelspec.'));
  addSafetensorsMetadata(file, { sshs_model_hash: h.modelHash, sshs_legacy_hash: h.legacyHash, ...(hasSpec ? { 'modelspec.hash_sha256': `0x${h.modelHash}` } : {}) });
  return h;
}
