/**
 * Writing a trained LoRA for inference, from a live trainer (end of training) or from a checkpoint folder
 * (`train-lora checkpoints export`). One call writes any of:
 *
 *   OUT/pytorch_lora_weights.safetensors       diffusers: `pipe.load_lora_weights(OUT)`. Keys
 *                                              `unet.<module>.lora.down.weight` / `.lora.up.weight` (text encoder:
 *                                              `text_encoder.<module>.lora_linear_layer.down.weight`), metadata
 *                                              `lora_adapter_metadata` (the peft LoraConfig, keys prefixed
 *                                              `unet.` / `text_encoder.`, JSON indent 2, sorted) so rank and
 *                                              alpha survive, exactly as diffusers' save_lora_weights writes it.
 *   OUT/lora_weights/adapter_model.safetensors peft: `PeftModel.from_pretrained(unet, OUT/lora_weights)`; keys
 *       OUT/lora_weights/adapter_config.json   `base_model.model.<module>.lora_A.weight`. A peft adapter folder
 *                                              belongs to one model, so a text-encoder adapter (if any) goes to
 *                                              OUT/lora_weights/text_encoder/ (same layout; keys as
 *                                              transformers 5's CLIPTextModel names its modules, without the
 *                                              `text_model.` level: `base_model.model.encoder.layers.N...`, so
 *                                              `PeftModel.from_pretrained(CLIPTextModel..., OUT/lora_weights/text_encoder)`
 *                                              loads it), as diffusers' older scripts saved per-model peft folders.
 *   OUT/lora_kohya.safetensors                 kohya-ss / A1111 / ComfyUI: `lora_unet_<module_>.lora_down.weight`,
 *                                              `.lora_up.weight`, `.alpha` (+ `lora_te_` keys), sd-scripts' ss_*
 *                                              metadata and sshs_* hashes (see kohya.ts).
 *   OUT/final_pipeline/                        with `merge`: a complete diffusers pipeline folder whose UNet (and
 *                                              text encoder when it has adapters) has W + alpha/r·B·A folded in,
 *                                              in the base file's dtype; the other components are hard-linked
 *                                              (copied when linking fails). With a --variant base (e.g. fp16:
 *                                              unet/diffusion_pytorch_model.fp16.safetensors) the merged file keeps
 *                                              the variant name and the links theirs, so
 *                                              `from_pretrained(final_pipeline, variant="fp16")` loads it as the
 *                                              base loads.
 *
 * Every file is written atomically (temporary file, fsync, rename). Every tensor file has `train_lora.*` metadata
 * (rank, alpha, steps, base model fingerprint).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import { fsyncPath, renameDirReplacing, writeJsonDurable } from '../checkpoint/fsutil';
import { mtimeOf, verifyCheckpoint, writerGone } from '../checkpoint/manager';
import { MODEL_FILE, TRAINER_STATE_FILE } from '../checkpoint/state';
import { convAlpha, datasetOptions, loraTargetModules, type TrainConfig } from '../config';
import { datasetFingerprint, loadDataset } from '../data/dataset';
import { ASSETS, checkModel, isSingleFile, modelConfig, modelSchedulerConfig, modelTokenizerDir } from '../model-folders/model-folder';
import { native, type LoraComponent, type LoraComponentSummary, type LoraFileFormat, type LoraSource, type LoraSummary } from '../native';
import { splitDataset } from '../data/split';
import { bucketDataset } from '../data/plan';
import { bucketInfo } from '../data/buckets';
import { addKohyaHashes, baseModelHashes, type KohyaBucketInfo, kohyaMetadata, modelSpecMetadata } from './kohya';

export const LORA_FORMATS: readonly LoraFileFormat[] = ['diffusers', 'peft', 'kohya'];
/** File names inside the output folder. */
export const LORA_FILES: Record<LoraFileFormat, string> = {
  diffusers: 'pytorch_lora_weights.safetensors',
  peft: path.join('lora_weights', 'adapter_model.safetensors'),
  kohya: 'lora_kohya.safetensors',
};
export const MERGED_PIPELINE_DIR = 'final_pipeline';

export class ExportError extends Error {
  override name = 'ExportError';
  constructor(
    message: string,
    readonly code: string,
  ) {
    super(message);
  }
}

export interface ExportSpec {
  source: LoraSource;
  /** Output folder (the run folder at the end of training). */
  outDir: string;
  formats: readonly LoraFileFormat[];
  /** Also write OUT/final_pipeline/ with the LoRA merged in. */
  merge?: boolean;
  /** Write the one format to this file instead of its name in outDir (`checkpoints export --out FILE.safetensors`). */
  file?: string;
  /** The base model folder the LoRA was trained on (diffusers layout). */
  baseModel: string;
  variant?: string;
  /** The run's configuration. */
  config: TrainConfig;
  steps: number;
  /** The 0-based epoch of the last step (the data loader's); the kohya file's ss_epoch is this + 1, as sd-scripts counts. */
  epoch: number;
  numTrainImages: number;
  /** Held-out images for val_loss (kohya ss_num_validation_images). */
  numValidationImages?: number;
  /** Each training image's first caption variant (kohya ss_tag_frequency); unknown when absent. */
  captions?: readonly string[];
  /** --enable-bucket: the bucket table as kohya's ss_bucket_info (src/data/buckets.ts bucketInfo). */
  bucketInfo?: KohyaBucketInfo;
  mixedPrecision: 'no' | 'fp16' | 'bf16';
  baseModelFingerprint?: string;
  /** ms since the epoch. */
  trainingStartedAt: number;
  /** ms since the epoch; default now. */
  trainingFinishedAt?: number;
}

export interface ExportResult {
  /** Every file written, LoRA files first. */
  files: string[];
  mergedPipeline?: string;
  summary: LoraSummary;
}

/** peft target names of module paths: the last part (two for `to_out.0`), as diffusers' scripts target them. */
export function targetNames(paths: readonly string[]): string[] {
  const out = new Set<string>();
  for (const p of paths) {
    const parts = p.split('.');
    const last = parts[parts.length - 1];
    out.add(/^\d+$/.test(last) && parts.length > 1 ? parts.slice(-2).join('.') : last);
  }
  return [...out].sort();
}

/** peft's LoraConfig as a dict (the keys diffusers reads from `lora_adapter_metadata` and peft from adapter_config.json). */
export function loraConfigDict(c: LoraComponentSummary, targets: readonly string[], dropout: number): Record<string, unknown> {
  return {
    alpha_pattern: { ...(c.alphaPattern ?? {}) },
    bias: 'none',
    fan_in_fan_out: false,
    init_lora_weights: 'gaussian',
    lora_alpha: c.alpha,
    lora_dropout: dropout,
    peft_type: 'LORA',
    r: c.rank,
    rank_pattern: { ...(c.rankPattern ?? {}) },
    target_modules: [...targets].sort(),
    use_dora: false,
    use_rslora: false,
  };
}

/** JSON as Python's json.dumps(value, indent=2, sort_keys=True) writes it (ASCII keys and values). */
function pyJsonSorted(v: unknown): string {
  const sort = (x: unknown): unknown =>
    Array.isArray(x) ? x.map(sort) : x && typeof x === 'object' ? Object.fromEntries(Object.keys(x).sort().map((k) => [k, sort((x as Record<string, unknown>)[k])])) : x;
  return JSON.stringify(sort(v), null, 2);
}

function components(summary: LoraSummary): LoraComponent[] {
  return (['unet', 'text_encoder'] as const).filter((c) => summary[c] !== undefined);
}

/** The target list of a component: the configured one for the UNet (what the run targeted), else derived. */
function targetsOf(spec: ExportSpec, comp: LoraComponent, c: LoraComponentSummary): string[] {
  return comp === 'unet' ? loraTargetModules(spec.config) : targetNames(c.modules);
}

function baseMetadata(spec: ExportSpec, summary: LoraSummary): Record<string, string> {
  const u = summary.unet ?? summary.text_encoder!;
  const m: Record<string, string> = {
    format: 'pt',
    'train_lora.rank': String(u.rank),
    'train_lora.alpha': String(u.alpha),
    'train_lora.steps': String(spec.steps),
    'train_lora.components': components(summary).join(','),
  };
  if (spec.baseModelFingerprint) m['train_lora.base_model_fingerprint'] = spec.baseModelFingerprint;
  return m;
}

/** diffusers' `lora_adapter_metadata`: each component's LoraConfig dict with keys prefixed `<component>.`. */
function adapterMetadata(spec: ExportSpec, summary: LoraSummary, only?: LoraComponent): string {
  const adapter: Record<string, unknown> = {};
  for (const comp of components(summary)) {
    if (only && comp !== only) continue;
    const c = summary[comp]!;
    for (const [k, v] of Object.entries(loraConfigDict(c, targetsOf(spec, comp, c), spec.config.lora_dropout))) adapter[`${comp}.${k}`] = v;
  }
  return pyJsonSorted(adapter);
}

async function writeDiffusers(spec: ExportSpec, summary: LoraSummary, file: string): Promise<string[]> {
  const metadata = { ...baseMetadata(spec, summary), lora_adapter_metadata: adapterMetadata(spec, summary) };
  await native().loraExport(spec.source, file, 'diffusers', { metadata });
  return [file];
}

async function writePeft(spec: ExportSpec, summary: LoraSummary, dir: string, fileName = 'adapter_model.safetensors'): Promise<string[]> {
  const files: string[] = [];
  for (const comp of components(summary)) {
    const c = summary[comp]!;
    const d = comp === 'unet' ? dir : path.join(dir, comp);
    fs.mkdirSync(d, { recursive: true });
    const f = path.join(d, comp === 'unet' ? fileName : 'adapter_model.safetensors');
    // peft ignores header metadata; lora_adapter_metadata lets train-lora's own readers (--init-lora-weights,
    // forward --lora) see alpha in this file too.
    const metadata = { ...baseMetadata(spec, summary), lora_adapter_metadata: adapterMetadata(spec, summary, comp) };
    await native().loraExport(spec.source, f, 'peft', { metadata, prefix: 'base_model.model', components: [comp] });
    const cfgFile = path.join(d, 'adapter_config.json');
    writeJsonDurable(cfgFile, {
      ...loraConfigDict(c, targetsOf(spec, comp, c), spec.config.lora_dropout),
      base_model_name_or_path: path.join(path.resolve(spec.baseModel), comp),
      inference_mode: true,
      modules_to_save: null,
      revision: null,
      task_type: null,
    });
    files.push(f, cfgFile);
  }
  return files;
}

/**
 * The base model file sd-scripts' ss_sd_model_hash / ss_new_sd_model_hash describe: a single-file checkpoint itself,
 * else the folder's UNet weights (the --variant file when there is one); the unet folder when its weights are sharded
 * (hashed as sd-scripts hashes a folder: "IsADirectory").
 */
export function baseModelHashFile(baseModel: string, variant?: string): string {
  const base = path.resolve(baseModel);
  if (isSingleFile(base)) return base;
  const dir = path.join(base, 'unet');
  const names = [
    ...(variant ? [`diffusion_pytorch_model.${variant}.safetensors`, `diffusion_pytorch_model.${variant}.bin`] : []),
    'diffusion_pytorch_model.safetensors',
    'diffusion_pytorch_model.bin',
  ];
  for (const n of names) if (fs.existsSync(path.join(dir, n))) return path.join(dir, n);
  return dir;
}

/** modelspec.prediction_type's source: the run's --prediction-type, else the base model's scheduler config. */
function predictionTypeOf(spec: ExportSpec): string {
  if (spec.config.prediction_type) return spec.config.prediction_type;
  try {
    const c = JSON.parse(fs.readFileSync(modelSchedulerConfig(path.resolve(spec.baseModel)), 'utf8')) as { prediction_type?: string };
    return c.prediction_type ?? 'epsilon';
  } catch {
    return 'epsilon';
  }
}

let packageVersion: string | undefined;
function trainLoraVersion(): string {
  if (packageVersion === undefined) {
    try {
      packageVersion = String((JSON.parse(fs.readFileSync(path.resolve(__dirname, '..', '..', 'package.json'), 'utf8')) as { version?: string }).version ?? 'unknown');
    } catch {
      packageVersion = 'unknown';
    }
  }
  return packageVersion;
}

async function writeKohya(spec: ExportSpec, summary: LoraSummary, file: string): Promise<string[]> {
  const u = summary.unet ?? summary.text_encoder!;
  const cfg = spec.config;
  const hashFile = baseModelHashFile(spec.baseModel, spec.variant);
  const outputName = path.basename(file, '.safetensors');
  const finishedAt = (spec.trainingFinishedAt ?? Date.now()) / 1000;
  const ss = kohyaMetadata({
    rank: u.rank,
    alpha: u.alpha,
    convRank: cfg.conv_rank,
    convAlpha: convAlpha(cfg),
    dropout: cfg.lora_dropout,
    steps: spec.steps,
    epoch: spec.epoch + 1,
    numValidationImages: spec.numValidationImages,
    numProcesses: cfg.num_processes * cfg.nnodes,
    captionDropoutRate: cfg.caption_dropout_rate,
    randomFlip: cfg.random_flip,
    centerCrop: cfg.center_crop,
    resizeInterpolation: cfg.image_interpolation_mode,
    validationSplit: cfg.validation_split,
    trainDataDir: cfg.train_data_dir,
    captions: spec.captions,
    baseModelHashes: fs.existsSync(hashFile) ? await baseModelHashes(hashFile) : undefined,
    resolution: cfg.resolution,
    numTrainImages: spec.numTrainImages,
    learningRate: cfg.learning_rate,
    lrScheduler: cfg.lr_scheduler,
    lrWarmupSteps: cfg.lr_warmup_steps,
    maxTrainSteps: cfg.max_train_steps,
    seed: cfg.seed,
    mixedPrecision: spec.mixedPrecision,
    trainBatchSize: cfg.train_batch_size,
    gradientAccumulationSteps: cfg.gradient_accumulation_steps,
    gradientCheckpointing: cfg.gradient_checkpointing,
    cacheLatents: cfg.cache_latents,
    ...(cfg.enable_bucket ? { buckets: { noUpscale: cfg.bucket_no_upscale, minReso: cfg.min_bucket_reso, maxReso: cfg.max_bucket_reso, info: spec.bucketInfo } } : {}),
    shuffleCaption: cfg.shuffle_caption,
    keepTokens: cfg.keep_tokens,
    maxGradNorm: cfg.max_grad_norm,
    noiseOffset: cfg.noise_offset,
    snrGamma: cfg.snr_gamma,
    adam: { beta1: cfg.adam_beta1, beta2: cfg.adam_beta2, weightDecay: cfg.adam_weight_decay, epsilon: cfg.adam_epsilon },
    trainingStartedAt: spec.trainingStartedAt / 1000,
    trainingFinishedAt: finishedAt,
    outputName,
    baseModel: spec.baseModel,
    textEncoderTrained: summary.text_encoder !== undefined,
    textEncoderLr: cfg.text_encoder_lr,
  });
  const modelspec = modelSpecMetadata({ outputName, resolution: cfg.resolution, trainingFinishedAt: finishedAt, predictionType: predictionTypeOf(spec), version: trainLoraVersion() });
  await native().loraExport(spec.source, file, 'kohya', { metadata: { ...baseMetadata(spec, summary), ...ss, ...modelspec } });
  addKohyaHashes(file);
  return [file];
}

/** Hard-links a folder tree (copies a file when linking fails, e.g. across file systems). */
function linkTree(src: string, dst: string): void {
  fs.mkdirSync(dst, { recursive: true });
  for (const e of fs.readdirSync(src, { withFileTypes: true })) {
    const s = path.join(src, e.name);
    const d = path.join(dst, e.name);
    if (e.isDirectory()) linkTree(s, d);
    else if (e.isFile() || e.isSymbolicLink()) {
      try {
        fs.linkSync(fs.realpathSync(s), d);
      } catch {
        fs.copyFileSync(s, d);
      }
    }
  }
}

/** A merged component's file name with a --variant base: diffusers' variant naming, `<stem>.<variant>.safetensors`. */
export function mergedFileName(file: string, variant?: string): string {
  return variant ? file.replace(/\.safetensors$/, `.${variant}.safetensors`) : file;
}

/** Whether a component folder holds weights of `variant` (`<stem>.<variant>.safetensors`, sharded or not). */
function hasVariantFiles(dir: string, variant: string): boolean {
  return fs.readdirSync(dir).some((f) => f.includes(`.${variant}.`) || f.includes(`.${variant}-`));
}

const WEIGHT_FILE = /\.(safetensors|bin|ckpt|pt|pth|msgpack|h5|onnx)$|\.safetensors\.index\.json$|\.bin\.index\.json$/;

/**
 * --merge from a single-file SD 1.x base checkpoint: a diffusers pipeline folder whose components are the file's, under
 * diffusers names with their inferred configs (UNet and text encoder with the LoRA folded in, the VAE converted), plus
 * the tokenizer and SD 1.5 scheduler config train-lora uses for such a file.
 */
async function writeMergedPipelineFromFile(spec: ExportSpec, summary: LoraSummary, base: string): Promise<{ dir: string; files: string[]; merged: string[] }> {
  await checkModel(base, ['unet', 'vae', 'text_encoder']);
  const final = path.join(spec.outDir, MERGED_PIPELINE_DIR);
  const files: string[] = [];
  const merged: string[] = [];
  await writeFolderAtomically(final, async (tmp) => {
    fs.copyFileSync(path.join(ASSETS, 'sd15-model', 'model_index.json'), path.join(tmp, 'model_index.json'));
    for (const comp of ['unet', 'vae', 'text_encoder'] as const) {
      const dst = path.join(tmp, comp);
      fs.mkdirSync(dst);
      fs.writeFileSync(path.join(dst, 'config.json'), `${JSON.stringify(modelConfig(base, comp), null, 2)}\n`);
      const r = await native().loraMergeComponent(spec.source, comp, base, dst, {});
      files.push(path.join(final, comp, path.basename(r.file)));
      if (comp !== 'vae' && summary[comp]) merged.push(`${comp}: ${r.merged} weights (${r.dtype})`);
    }
    fs.cpSync(modelTokenizerDir(base), path.join(tmp, 'tokenizer'), { recursive: true });
    fs.mkdirSync(path.join(tmp, 'scheduler'));
    fs.copyFileSync(modelSchedulerConfig(base), path.join(tmp, 'scheduler', 'scheduler_config.json'));
  });
  return { dir: final, files, merged };
}

/**
 * Fills `<final>.tmp-<pid>` with `fill`, fsyncs it and its sub-folders, then swaps it in for `final` (an earlier one
 * is replaced only once the new one is complete); a failure removes the temporary folder.
 */
async function writeFolderAtomically(final: string, fill: (tmp: string) => Promise<void>): Promise<void> {
  const tmp = `${final}.tmp-${process.pid}`;
  fs.rmSync(tmp, { recursive: true, force: true });
  fs.mkdirSync(tmp, { recursive: true });
  try {
    await fill(tmp);
    for (const d of [tmp, ...fs.readdirSync(tmp).map((n) => path.join(tmp, n)).filter((p) => fs.statSync(p).isDirectory())]) fsyncPath(d);
    renameDirReplacing(tmp, final, `${final}.old-${process.pid}`);
  } catch (e) {
    fs.rmSync(tmp, { recursive: true, force: true });
    throw e;
  }
}

async function writeMergedPipeline(spec: ExportSpec, summary: LoraSummary): Promise<{ dir: string; files: string[]; merged: string[] }> {
  const base = path.resolve(spec.baseModel);
  if (isSingleFile(base)) return writeMergedPipelineFromFile(spec, summary, base);
  const indexFile = path.join(base, 'model_index.json');
  if (!fs.existsSync(indexFile))
    throw new ExportError(`--merge: ${indexFile} not found: the base model must be a diffusers pipeline folder (pass it with --model)`, 'ENOENT');
  const index = JSON.parse(fs.readFileSync(indexFile, 'utf8')) as Record<string, unknown>;
  const final = path.join(spec.outDir, MERGED_PIPELINE_DIR);
  const files: string[] = [];
  const merged: string[] = [];
  await writeFolderAtomically(final, async (tmp) => {
    fs.copyFileSync(indexFile, path.join(tmp, 'model_index.json'));
    for (const [name, v] of Object.entries(index)) {
      if (!Array.isArray(v) || v[0] === null || !fs.existsSync(path.join(base, name))) continue;
      const src = path.join(base, name);
      const dst = path.join(tmp, name);
      const comp = name as LoraComponent;
      if ((comp === 'unet' || comp === 'text_encoder') && summary[comp]) {
        fs.mkdirSync(dst);
        for (const f of fs.readdirSync(src))
          if (!WEIGHT_FILE.test(f) && fs.statSync(path.join(src, f)).isFile()) fs.copyFileSync(path.join(src, f), path.join(dst, f));
        const r = await native().loraMergeComponent(spec.source, comp, src, dst, { variant: spec.variant });
        // The merged weights keep the base file's dtype; when the base component has --variant files they also keep
        // the variant name (<stem>.<variant>.safetensors), so from_pretrained(final_pipeline, variant=...) loads them as
        // it loads the base (a component without variant files was read from, and stays under, the plain name).
        let written = r.file;
        if (spec.variant && hasVariantFiles(src, spec.variant)) {
          written = path.join(dst, mergedFileName(path.basename(r.file), spec.variant));
          fs.renameSync(r.file, written);
        }
        files.push(path.join(final, name, path.basename(written)));
        merged.push(`${comp}: ${r.merged} weights (${r.dtype})`);
      } else {
        linkTree(src, dst);
      }
    }
  });
  return { dir: final, files, merged };
}

/**
 * Removes what a killed export (or end-of-training UNet write) left in `outDir`: only this program's temporary names
 * (`pytorch_lora_weights.safetensors.tmp-<pid>`, `lora_weights/adapter_model.safetensors.tmp-<pid>`,
 * `final_pipeline.tmp-<pid>/`, `.tmp-unet-<pid>/`, ...; `extraFiles`' `<file>.tmp-<pid>` too) whose process is gone
 * (or whose pid now belongs to a process started after the file was written, or is this one: at the start nothing of
 * ours is being written). Anything else, and every live writer's files, stay.
 * Returns the paths removed.
 */
export function cleanStaleExports(outDir: string, extraFiles: readonly string[] = []): string[] {
  const dir = path.resolve(outDir);
  const names = new Set<string>([
    ...Object.values(LORA_FILES),
    path.join('lora_weights', 'adapter_config.json'),
    path.join('lora_weights', 'text_encoder', 'adapter_model.safetensors'),
    path.join('lora_weights', 'text_encoder', 'adapter_config.json'),
  ]);
  // <name>.tmp-<pid> beside each of our files (native safetensors writes, writeFileDurable, kohya hashing).
  const candidates: Array<{ folder: string; re: RegExp }> = [];
  const byFolder = new Map<string, string[]>();
  for (const n of names) {
    const folder = path.join(dir, path.dirname(n));
    byFolder.set(folder, [...(byFolder.get(folder) ?? []), path.basename(n)]);
  }
  for (const f of extraFiles) {
    const abs = path.resolve(f);
    byFolder.set(path.dirname(abs), [...(byFolder.get(path.dirname(abs)) ?? []), path.basename(abs)]);
  }
  const esc = (x: string): string => x.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  for (const [folder, files] of byFolder) candidates.push({ folder, re: new RegExp(`^(?:${files.map(esc).join('|')})\\.tmp-(\\d+)$`) });
  // Folders: final_pipeline.tmp-<pid>, final_pipeline.old-<pid> (merge), .tmp-unet-<pid>, .old-unet-<pid> (full training).
  candidates.push({ folder: dir, re: new RegExp(`^(?:${esc(MERGED_PIPELINE_DIR)}\\.(?:tmp|old)-|\\.(?:tmp|old)-unet-)(\\d+)$`) });
  const removed: string[] = [];
  for (const { folder, re } of candidates) {
    let entries: string[];
    try {
      entries = fs.readdirSync(folder);
    } catch {
      continue;
    }
    for (const name of entries) {
      const m = re.exec(name);
      if (!m) continue;
      const pid = Number(m[1]);
      if (!writerGone(pid, mtimeOf(path.join(folder, name)))) continue; // a live export's file
      // A replaced folder set aside (renameDirReplacing) whose successor never arrived: put it back instead.
      const final = name.startsWith(`${MERGED_PIPELINE_DIR}.old-`) ? MERGED_PIPELINE_DIR : name.startsWith('.old-unet-') ? 'unet' : undefined;
      if (final && !fs.existsSync(path.join(folder, final))) {
        fs.renameSync(path.join(folder, name), path.join(folder, final));
        continue;
      }
      fs.rmSync(path.join(folder, name), { recursive: true, force: true });
      removed.push(path.join(folder, name));
    }
  }
  // The peft folders an interrupted export created and left holding only its temporary files: empty now, removed.
  for (const sub of [path.join('lora_weights', 'text_encoder'), 'lora_weights']) {
    const folder = path.join(dir, sub);
    if (!removed.some((r) => r.startsWith(folder + path.sep))) continue;
    try {
      if (fs.readdirSync(folder).length === 0) fs.rmdirSync(folder);
    } catch {
      /* not there, or not empty */
    }
  }
  return removed;
}

/** Writes the requested formats (and the merged pipeline); `log` gets one line listing what was written. */
export async function exportLora(spec: ExportSpec, log?: (msg: string) => void): Promise<ExportResult> {
  for (const f of spec.formats)
    if (!LORA_FORMATS.includes(f)) throw new ExportError(`unknown LoRA format "${String(f)}" (use ${LORA_FORMATS.join(', ')})`, 'EFORMAT');
  if (spec.file && (spec.formats.length !== 1 || spec.merge))
    throw new ExportError(`${spec.file}: a single output file takes exactly one --format and no --merge; give a folder with --out to write several`, 'EINPUT');
  const summary = await native().loraSummary(spec.source);
  if (!components(summary).length) throw new ExportError('there are no LoRA adapters to export', 'ENOLORA');
  fs.mkdirSync(spec.outDir, { recursive: true });
  cleanStaleExports(spec.outDir, spec.file ? [spec.file] : []);
  const files: string[] = [];
  for (const format of spec.formats) {
    const target = spec.file ?? path.join(spec.outDir, LORA_FILES[format]);
    fs.mkdirSync(path.dirname(target), { recursive: true });
    if (format === 'diffusers') files.push(...(await writeDiffusers(spec, summary, target)));
    else if (format === 'peft') files.push(...(await writePeft(spec, summary, path.dirname(target), path.basename(target))));
    else files.push(...(await writeKohya(spec, summary, target)));
  }
  let mergedPipeline: string | undefined;
  let mergedNote = '';
  if (spec.merge) {
    const m = await writeMergedPipeline(spec, summary);
    mergedPipeline = m.dir;
    files.push(...m.files);
    mergedNote = `; merged pipeline ${m.dir} (${m.merged.join(', ')})`;
  }
  const u = summary.unet ?? summary.text_encoder!;
  log?.(`exported LoRA (rank ${u.rank}, alpha ${u.alpha}, ${components(summary).join(' + ')}, step ${spec.steps}): ${files.join(', ')}${mergedNote}`);
  return { files, mergedPipeline, summary };
}

/** What a checkpoint folder's trainer_state.json holds that an export needs (see src/train/train.ts). */
interface CheckpointState {
  global_step: number;
  epoch: number;
  base_model: { path: string; fingerprint: string };
  dataset: { size: number; path?: string; fingerprint?: string };
  config: TrainConfig;
  mixed_precision?: 'no' | 'fp16' | 'bf16';
  time: string;
}

export interface CheckpointExportOptions {
  formats: readonly LoraFileFormat[];
  /** Output folder, or a .safetensors file for a single format. Default: <run>/exports/<checkpoint name>/. */
  out?: string;
  merge?: boolean;
  /** The base model folder, when it moved since training (default: the path recorded in trainer_state.json). */
  model?: string;
}

/**
 * The training images' captions of a checkpoint's run (first variant each), for the kohya file's ss_tag_frequency: the
 * data folder read again (image headers only) and used only when it is still the one trained on (same dataset
 * fingerprint as trainer_state.json records); the --validation-split images left out as in training. Else undefined.
 */
async function checkpointCaptions(st: CheckpointState): Promise<{ captions: string[]; held: number; bucketInfo?: KohyaBucketInfo } | undefined> {
  const cfg = st.config;
  const dir = st.dataset.path ?? cfg.train_data_dir;
  if (!st.dataset.fingerprint || !dir || !fs.existsSync(dir)) return undefined;
  try {
    const full = await loadDataset(dir, { ...datasetOptions(cfg), validateImages: 'header' });
    if (datasetFingerprint(full) !== st.dataset.fingerprint) return undefined;
    const { train, val } = cfg.validation_split !== undefined ? splitDataset(full, cfg.validation_split, cfg.seed) : { train: full, val: undefined };
    if (train.items.length !== st.dataset.size) return undefined;
    // --enable-bucket: the same table as in training (the same images, settings and rule), for ss_bucket_info.
    const silent = { info: () => undefined, warn: () => undefined };
    const buckets = cfg.enable_bucket ? bucketInfo(bucketDataset(cfg, train, silent, 'training').table) : undefined;
    return { captions: train.items.map((i) => i.captions[0] ?? ''), held: val?.items.length ?? 0, ...(buckets ? { bucketInfo: buckets } : {}) };
  } catch {
    return undefined;
  }
}

/** `train-lora checkpoints export`: the LoRA of a checkpoint folder in the requested formats. */
export async function exportCheckpoint(checkpoint: string, opts: CheckpointExportOptions, log?: (msg: string) => void): Promise<ExportResult> {
  const dir = path.resolve(checkpoint);
  if (!fs.existsSync(dir)) throw new ExportError(`${dir}: no such checkpoint folder`, 'ENOENT');
  const modelFile = path.join(dir, MODEL_FILE);
  if (!fs.existsSync(modelFile))
    throw new ExportError(`${dir}: has no ${MODEL_FILE}, so there are no weights to export (is this a checkpoint-<step> folder of a train-lora run?)`, 'ENOENT');
  const stateFile = path.join(dir, TRAINER_STATE_FILE);
  if (!fs.existsSync(stateFile)) throw new ExportError(`${dir}: has no ${TRAINER_STATE_FILE} (LoRA rank/alpha and the base model are recorded there)`, 'ENOENT');
  const v = await verifyCheckpoint(dir);
  if (!v.valid) throw new ExportError(`${dir}: not a valid checkpoint (${v.problem}); pick another with \`train-lora checkpoints list\``, 'EBADCKPT');
  const st = JSON.parse(fs.readFileSync(stateFile, 'utf8')) as CheckpointState;
  const cfg = st.config;
  if (cfg.train_mode !== 'lora')
    throw new ExportError(
      `${dir}: is a --train-mode ${cfg.train_mode} checkpoint: its ${MODEL_FILE} holds the whole UNet, not a LoRA, so it cannot be exported as a LoRA file`,
      'ECKPTLORA',
    );
  const baseModel = path.resolve(opts.model ?? st.base_model.path);
  if (opts.merge && !fs.existsSync(baseModel))
    throw new ExportError(`--merge: the base model ${baseModel} (recorded in ${TRAINER_STATE_FILE}) does not exist; pass its folder with --model`, 'ENOENT');
  const isFile = opts.out?.endsWith('.safetensors') ?? false;
  const parent = path.dirname(dir);
  const defaultOut = path.basename(parent) === 'checkpoints' ? path.join(path.dirname(parent), 'exports', path.basename(dir)) : `${dir}-export`;
  const outDir = opts.out ? (isFile ? path.dirname(path.resolve(opts.out)) : path.resolve(opts.out)) : defaultOut;
  // The precision the run resolved (recorded since 0.2); older checkpoints: what they asked for, 'auto' read as fp32.
  const mixed = st.mixed_precision ?? (cfg.mixed_precision === 'auto' ? 'no' : cfg.mixed_precision);
  const data = opts.formats.includes('kohya') ? await checkpointCaptions(st) : undefined;
  return exportLora(
    {
      source: { checkpoint: modelFile, alpha: cfg.lora_alpha ?? cfg.rank, convAlpha: convAlpha(cfg) },
      outDir,
      file: isFile ? path.resolve(opts.out!) : undefined,
      formats: opts.formats,
      merge: opts.merge,
      baseModel,
      variant: cfg.variant,
      config: cfg,
      steps: st.global_step,
      epoch: st.epoch,
      numTrainImages: st.dataset.size,
      captions: data?.captions,
      ...(data?.bucketInfo ? { bucketInfo: data.bucketInfo } : {}),
      numValidationImages: data?.held,
      mixedPrecision: mixed,
      baseModelFingerprint: st.base_model.fingerprint,
      // trainer_state.json records when the checkpoint was saved, not when training started.
      trainingStartedAt: Date.parse(st.time),
      trainingFinishedAt: Date.parse(st.time),
    },
    log,
  );
}
