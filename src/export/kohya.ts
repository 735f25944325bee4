/**
 * kohya-ss / sd-scripts specifics of a LoRA file: the `ss_*` training metadata that sd-scripts writes
 * (train_network.py) and the two model hashes it precalculates (library/train_util.py
 * precalculate_safetensors_hashes), which A1111 / sd-webui-additional-networks use to identify the file.
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
import { createHash } from 'node:crypto';
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

/** What the ss_* metadata describes. */
export interface KohyaTrainingInfo {
  rank: number;
  alpha: number;
  dropout: number;
  steps: number;
  epoch: number;
  resolution: number;
  numTrainImages: number;
  learningRate: number;
  lrScheduler: string;
  lrWarmupSteps: number;
  maxTrainSteps: number;
  seed: number;
  mixedPrecision: string;
  trainBatchSize: number;
  gradientAccumulationSteps: number;
  gradientCheckpointing: boolean;
  cacheLatents: boolean;
  maxGradNorm: number;
  noiseOffset: number;
  snrGamma?: number;
  adam: { beta1: number; beta2: number; weightDecay: number; epsilon: number };
  /** Unix time in seconds. */
  trainingStartedAt: number;
  trainingFinishedAt: number;
  outputName: string;
  /** The base model folder (its basename is ss_sd_model_name, as sd-scripts writes for a local path). */
  baseModel: string;
  textEncoderTrained: boolean;
}

/** The ss_* strings, spelled as sd-scripts' str(value) spells them. */
export function kohyaMetadata(i: KohyaTrainingInfo): Record<string, string> {
  const none = (v: number | undefined) => (v === undefined || v === 0 ? 'None' : pyFloat(v));
  const m: Record<string, string> = {
    ss_network_module: 'networks.lora',
    ss_network_dim: String(i.rank),
    ss_network_alpha: pyFloat(i.alpha),
    ss_network_dropout: none(i.dropout),
    ss_network_args: JSON.stringify({}),
    ss_network_train_unet_only: i.textEncoderTrained ? 'False' : 'True',
    ss_base_model_version: 'sd_v1',
    ss_v2: 'False',
    ss_sd_model_name: path.basename(path.resolve(i.baseModel)),
    ss_output_name: i.outputName,
    ss_steps: String(i.steps),
    ss_epoch: String(i.epoch),
    ss_max_train_steps: String(i.maxTrainSteps),
    ss_resolution: `(${i.resolution}, ${i.resolution})`,
    ss_num_train_images: String(i.numTrainImages),
    ss_batch_size_per_device: String(i.trainBatchSize),
    ss_gradient_accumulation_steps: String(i.gradientAccumulationSteps),
    ss_gradient_checkpointing: i.gradientCheckpointing ? 'True' : 'False',
    ss_cache_latents: i.cacheLatents ? 'True' : 'False',
    ss_learning_rate: pyFloat(i.learningRate),
    ss_unet_lr: pyFloat(i.learningRate),
    ss_text_encoder_lr: i.textEncoderTrained ? pyFloat(i.learningRate) : 'None',
    ss_lr_scheduler: i.lrScheduler,
    ss_lr_warmup_steps: String(i.lrWarmupSteps),
    ss_optimizer: `torch.optim.adamw.AdamW(weight_decay=${pyFloat(i.adam.weightDecay)},betas=(${pyFloat(i.adam.beta1)}, ${pyFloat(i.adam.beta2)}),eps=${pyFloat(i.adam.epsilon)})`,
    ss_max_grad_norm: pyFloat(i.maxGradNorm),
    ss_seed: String(i.seed),
    ss_mixed_precision: i.mixedPrecision,
    ss_noise_offset: none(i.noiseOffset),
    ss_min_snr_gamma: none(i.snrGamma),
    ss_clip_skip: 'None',
    ss_training_started_at: pyFloat(i.trainingStartedAt),
    ss_training_finished_at: pyFloat(i.trainingFinishedAt),
  };
  return m;
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

/** Writes sshs_model_hash and sshs_legacy_hash into a kohya LoRA file; returns them. */
export function addKohyaHashes(file: string): { modelHash: string; legacyHash: string } {
  const h = kohyaHashes(file);
  addSafetensorsMetadata(file, { sshs_model_hash: h.modelHash, sshs_legacy_hash: h.legacyHash });
  return h;
}
