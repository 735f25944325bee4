/**
 * The training loop of diffusers' train_text_to_image_lora.py (+ accelerate's accumulation, clipping and LR
 * stepping), with checkpoints that resume exactly. TypeScript decides everything (data order, accumulation, LR,
 * when to save); the native Trainer runs the step and holds the tensors.
 *
 * Accumulation follows accelerate: micro-batches of an epoch are grouped in cycles of
 * `gradient_accumulation_steps`; the last cycle of an epoch may be shorter (the dataloader's end forces a sync);
 * every micro-loss is divided by gradient_accumulation_steps. The LR used by an optimizer step is the schedule's
 * value after the number of optimizer steps that were not skipped (non-finite gradients, an fp16 overflow or a
 * diverging run, skip the step and the schedule; --max-nonfinite-steps of them in a row stop the run).
 * Checkpoints are written only between optimizer steps, so a resume never lands inside an accumulation cycle.
 * One run per output folder: every checkpoint records its run id, a new run refuses a folder holding another run's
 * work (--overwrite-output-dir moves it aside), and `latest` and retention never mix two runs.
 */
import { randomUUID } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { z } from 'zod';

import { type CheckpointEntry, CheckpointError, CheckpointManager, MANIFEST, RunLock, verifyCheckpoint } from '../checkpoint/manager';
import { dirSize, formatBytes, fsyncPath, renameDirReplacing, writeJsonDurable } from '../checkpoint/fsutil';
import { datasetOptions, flagName, loraAlpha, TrainConfigSchema, type TrainConfig } from '../config';
import { readStateFile } from '../checkpoint/schema';
import { cleanStaleExports, exportLora, LORA_FILES } from '../export/lora-export';
import { datasetFingerprint, describeDataset, loadDataset, type Dataset } from '../data/dataset';
import { collectRankParts, initDistributed, pickBackend, removeRankParts, singleProcess, writeRankPart, type DistContext } from '../distributed/context';
import { distEnvFromProcess } from '../distributed/env';
import type { LoaderOptions } from '../data/loader';
import type { SampleOrderState } from '../data/sampler';
import { checkModel, modelConfigFile, modelSchedulerConfig, modelTokenizerDir } from '../models/model-folder';
import { modelFingerprint } from '../models/fingerprint';
import { native, type LoraFileFormat, type PipelineHandle, type SafetensorsHeader, type TrainBatch, type TrainerHandle, type TrainerStateJson } from '../native';
import { fromInt64 } from '../tensors';
import { CLIPTokenizer } from '../tokenizer';
import { lrForOptimizerStep, lrScheduleFromJSON, trainingLrSchedule, type LrScheduleSpec } from './schedules/lr';
import { NoiseSchedule } from './schedules/noise';
import { planPrecision, resolveDevice } from '../device';
import { buildLatentCache, CachedLatentSource, ImageSource, type MicroBatchSource } from './sources';
import { Validator, type ValidationResult } from './validation';
import { makeImageRenderer } from './validation-images';
import { splitDataset, ValidationLoss, vaeScalingFactor } from './validation-loss';

export const TRAINER_STATE_VERSION = 1;
/** Memory for decoded training images when the augmentation is deterministic (see LoaderOptions.imageCacheMb). */
const IMAGE_CACHE_MB = 1024;

/** Where training reports to (logger + progress bar + metrics files). */
export interface TrainReporter {
  info(msg: string, data?: Record<string, unknown>): void;
  warn(msg: string, data?: Record<string, unknown>): void;
  error(msg: string, data?: Record<string, unknown>): void;
  /** After every optimizer step. */
  step(m: StepMetrics): void;
  /** After each validation (val_loss and/or images). */
  validation?(r: ValidationResult): void;
  /** Progress bar lifecycle. */
  start?(total: number, initial: number): void;
  finish?(): void;
}

export interface StepMetrics {
  step: number;
  epoch: number;
  loss: number;
  lr: number;
  gradNorm: number;
  skipped: boolean;
  lossScale: number;
  /** Optimizer steps per second (smoothed by the reporter if it likes). */
  stepTime: number;
  samplesSeen: number;
}

export interface TrainerStateFile {
  version: number;
  /**
   * Identifies one training run across its resumes (absent in older checkpoints): `latest` and
   * retention never mix the checkpoints of two runs in one folder.
   */
  run_id?: string;
  global_step: number;
  /** Optimizer steps that advanced the LR schedule (not skipped for non-finite gradients). */
  scheduler_steps: number;
  /** Optimizer steps skipped so far for a non-finite loss or gradients (fp16 overflows included). */
  nonfinite_steps?: number;
  /** The last optimizer step whose update was applied (the weights are that step's). */
  last_good_step?: number;
  epoch: number;
  /** Samples of `epoch` already consumed (the data cursor; global over all ranks). */
  position: number;
  /** Data-parallel processes that trained up to here (absent: 1). */
  world_size?: number;
  samples_seen: number;
  max_train_steps: number;
  train_loss: number | null;
  /** Held-out loss at this step (when validation data exists and it was measured here). */
  val_loss?: number | null;
  /** Training stage (the last checkpoint of each earlier stage is kept by retention). */
  stage?: string;
  best_metric: { name: string; value: number; step: number; mode: 'min' | 'max' } | null;
  base_model: { path: string; fingerprint: string };
  dataset: { path: string; fingerprint: string; size: number };
  config: TrainConfig;
  /** The device and mixed precision this run resolved (absent in checkpoints of train-lora before 0.2). */
  device?: string;
  mixed_precision?: 'no' | 'fp16' | 'bf16';
  resumed_from: string | null;
  /** Set when the run was imported from a diffusers/accelerate checkpoint folder (its LoRA weights and step). */
  imported_from?: { path: string; format: 'diffusers'; step: number };
  versions: { train_lora: string; torch: string; node: string };
  time: string;
  host: string;
}

export interface TrainResult {
  outputDir: string;
  globalStep: number;
  finished: boolean;
  /** Set when a signal stopped the run (after saving). */
  signal?: NodeJS.Signals;
  lastCheckpoint?: string;
  loraFiles: string[];
  losses: number[];
}

interface Stop {
  signal?: NodeJS.Signals;
}

/** What a checkpoint of the last completed step needs once the next step has begun (its micro-batches moved these on). */
interface StepStartState {
  cursor: SampleOrderState;
  samplesSeen: number;
  /** The RNG streams before the step's first micro-batch (absent: nothing drew from them yet). */
  rng?: Record<string, string>;
}

/** Training stopped because it diverged (non-finite loss or gradients); `checkpoint` holds the last good state. */
export class DivergedError extends Error {
  override name = 'DivergedError';
  readonly code = 'ENONFINITE';
  constructor(
    message: string,
    readonly checkpoint?: string,
  ) {
    super(message);
  }
}

/** Throws when a weights file holds NaN or inf (a checkpoint must never keep them). */
export async function assertFiniteWeights(file: string, step: number): Promise<void> {
  const { tensors } = await native().safetensorsRead(file, { dtype: 'fp32' });
  for (const t of tensors) {
    const buf = new ArrayBuffer(t.data.byteLength);
    new Uint8Array(buf).set(t.data);
    const v = new Float32Array(buf);
    for (let i = 0; i < v.length; i++)
      if (!Number.isFinite(v[i])) throw new CheckpointError(`checkpoint-${step} not saved: ${t.name} holds non-finite values (${v[i]}); earlier checkpoints are intact`, 'ENONFINITE');
  }
}

/** Final LoRA files in `outputDir` that train-lora did not write (no train_lora.* metadata): a diffusers run's, never replaced. */
async function foreignLoraFiles(outputDir: string, formats: readonly LoraFileFormat[]): Promise<string[]> {
  const out: string[] = [];
  for (const f of formats) {
    const file = path.join(outputDir, LORA_FILES[f]);
    if (!fs.existsSync(file)) continue;
    let ours = false;
    try {
      ours = Object.keys((await native().safetensorsHeader(file)).metadata).some((k) => k.startsWith('train_lora.'));
    } catch {
      /* unreadable: not ours either */
    }
    if (!ours) out.push(LORA_FILES[f]);
  }
  return out;
}

function packageVersion(): string {
  try {
    return (JSON.parse(fs.readFileSync(path.join(__dirname, '..', '..', 'package.json'), 'utf8')) as { version: string }).version;
  } catch {
    return '0.0.0';
  }
}

/** outputs/run-NNN, numbered after the highest existing one. */
export function nextRunDir(root = 'outputs'): string {
  let max = 0;
  if (fs.existsSync(root))
    for (const n of fs.readdirSync(root)) {
      const m = /^run-(\d+)$/.exec(n);
      if (m) max = Math.max(max, Number(m[1]));
    }
  return path.join(root, `run-${String(max + 1).padStart(3, '0')}`);
}

/** Where a resume starts: a train-lora checkpoint, or a diffusers/accelerate checkpoint folder (its LoRA and step only). */
export type ResumeSource = { kind: 'train-lora'; entry: CheckpointEntry } | ({ kind: 'diffusers' } & DiffusersCheckpoint);

/** A `checkpoint-N` folder written by diffusers' training scripts through accelerate's save_state. */
export interface DiffusersCheckpoint {
  path: string;
  /** N of the folder name: the optimizer steps it was saved after. */
  step: number;
  /** The LoRA file train-lora imports (safetensors; diffusers or peft keys). */
  lora: string;
  /** accelerate's pickled state (optimizer.bin, scheduler.bin, random_states_0.pkl, ...): never loaded. */
  pickles: string[];
}

const CKPT_NAME_RE = /^checkpoint-(\d+)$/;
const DIFFUSERS_LORA_FILES = ['pytorch_lora_weights.safetensors', 'adapter_model.safetensors'];
const CHECKPOINT_HINT =
  'A train-lora checkpoint is a folder OUT/checkpoints/checkpoint-<step>/ holding model.safetensors, optimizer.safetensors, ' +
  'trainer_state.json, ... and manifest.json (written last, when the save is complete). Pass such a folder, a run folder (OUT, with checkpoints/ in it), ' +
  'a diffusers/accelerate checkpoint-<step>/ folder with pytorch_lora_weights.safetensors, or latest';

function isDir(p: string): boolean {
  try {
    return fs.statSync(p).isDirectory();
  } catch {
    return false;
  }
}

/** `dir` when it is a diffusers/accelerate checkpoint-N folder with a LoRA train-lora can import (no train-lora manifest). */
export function diffusersCheckpoint(dir: string): DiffusersCheckpoint | undefined {
  const m = CKPT_NAME_RE.exec(path.basename(dir));
  if (!m || !isDir(dir) || fs.existsSync(path.join(dir, MANIFEST))) return undefined;
  const lora = DIFFUSERS_LORA_FILES.map((f) => path.join(dir, f)).find((f) => fs.existsSync(f));
  if (!lora) return undefined;
  const pickles = fs.readdirSync(dir).filter((n) => /\.(bin|pkl|pt|pth)$/.test(n)).sort();
  return { path: dir, step: Number(m[1]), lora, pickles };
}

/** The diffusers/accelerate checkpoint folders directly in a run folder (OUT/checkpoint-N), highest step first. */
export function diffusersCheckpoints(outputDir: string): DiffusersCheckpoint[] {
  if (!isDir(outputDir)) return [];
  return fs
    .readdirSync(outputDir)
    .map((n) => diffusersCheckpoint(path.join(outputDir, n)))
    .filter((d): d is DiffusersCheckpoint => d !== undefined)
    .sort((a, b) => b.step - a.step);
}

/**
 * What keeps a diffusers checkpoint's LoRA from continuing in this run: the mode and the rank (read from the file's
 * header). Adapters on modules that are not --lora-target-modules are the native loader's error, naming the flag.
 */
async function importProblems(d: DiffusersCheckpoint, cfg: TrainConfig): Promise<string[]> {
  if (cfg.train_mode !== 'lora') return [`--train-mode is ${cfg.train_mode}, but a diffusers/accelerate checkpoint holds LoRA weights only: import it with --train-mode lora`];
  let header: SafetensorsHeader;
  try {
    header = await native().safetensorsHeader(d.lora);
  } catch (e) {
    return [`${d.lora} is not a readable safetensors file (${(e as Error).message})`];
  }
  const down = header.tensors.find((t) => !/^(text_encoder|lora_te)/.test(t.name) && /(\.lora\.down|\.lora_A|\.lora_down|lora_linear_layer\.down)(\.default)?\.weight$/.test(t.name));
  if (!down) return [`${d.lora} holds no UNet LoRA weights (no lora.down / lora_A keys)`];
  const rank = down.shape[0];
  return rank === cfg.rank ? [] : [`--rank is ${cfg.rank}, but the LoRA in ${path.basename(d.lora)} has rank ${rank}: pass --rank ${rank}`];
}

/** The same resolved LR schedule (a checkpoint's, and the one the options give now). */
function sameSchedule(a: LrScheduleSpec, b: LrScheduleSpec): boolean {
  return (['kind', 'baseLr', 'warmupSteps', 'totalSteps', 'numCycles', 'power', 'lrEnd', 'stepRules'] as const).every((k) => (a[k] ?? null) === (b[k] ?? null));
}

/** What a folder that is not a checkpoint is, for the error that refuses to resume from it. */
function describeNonCheckpoint(p: string): string {
  const names = fs.readdirSync(p).filter((n) => !n.startsWith('.'));
  const base = path.basename(p);
  if (base.startsWith('.tmp-')) return `${p} is the temporary folder of a save that was interrupted, not a checkpoint`;
  if (names.length === 0) return `${p} is an empty folder, not a checkpoint`;
  if (names.includes('trainer_state.json') || (names.includes('model.safetensors') && names.includes('optimizer.safetensors')))
    return `${p} holds checkpoint files but no ${MANIFEST}: its save did not finish (or ${MANIFEST} was removed), so it is not a complete checkpoint`;
  if (names.includes('model_index.json') || (names.includes('unet') && names.includes('vae'))) return `${p} is a model folder (a diffusers pipeline), not a checkpoint`;
  if (CKPT_NAME_RE.test(base) && names.some((n) => /lora.*\.bin$|^adapter_model\.bin$/.test(n)))
    return `${p} is a diffusers/accelerate checkpoint whose LoRA is only a pickle (${names.filter((n) => n.endsWith('.bin')).join(', ')}), and train-lora never loads pickles; save the LoRA as safetensors (diffusers' save_lora_weights) and pass the folder again`;
  return `${p} is not a checkpoint (it holds ${names.slice(0, 6).join(', ')}${names.length > 6 ? ', ...' : ''})`;
}

/** The run id and step of every checkpoint-N folder in OUT/checkpoints (run id undefined: made before run ids, or unreadable). */
export function checkpointRuns(mgr: CheckpointManager): Array<{ name: string; step: number; runId?: string }> {
  if (!isDir(mgr.dir)) return [];
  const out: Array<{ name: string; step: number; runId?: string }> = [];
  for (const name of fs.readdirSync(mgr.dir)) {
    const m = CKPT_NAME_RE.exec(name);
    if (!m) continue;
    let runId: string | undefined;
    try {
      const v = (readJson<{ run_id?: unknown }>(path.join(mgr.dir, name, 'trainer_state.json'))).run_id;
      if (typeof v === 'string') runId = v;
    } catch {
      /* no trainer_state.json, or unreadable: no run id */
    }
    out.push({ name, step: Number(m[1]), runId });
  }
  return out.sort((a, b) => a.step - b.step);
}

/** `latest` of a run folder, refusing when its checkpoints belong to more than one run (which one is meant is unclear). */
async function latestOfOneRun(mgr: CheckpointManager, report: (e: CheckpointEntry) => void): Promise<CheckpointEntry | undefined> {
  const runs = new Map<string, number[]>();
  const valid = new Set((await mgr.list('quick')).filter((e) => e.valid).map((e) => e.name));
  for (const c of checkpointRuns(mgr)) if (c.runId && valid.has(c.name)) runs.set(c.runId, [...(runs.get(c.runId) ?? []), c.step]);
  if (runs.size > 1)
    throw new CheckpointError(
      `${mgr.dir} holds the checkpoints of ${runs.size} different runs (${[...runs].map(([id, steps]) => `run ${id}: step ${steps.join(', ')}`).join('; ')}), ` +
        `so "latest" cannot tell which run to continue. Pass the checkpoint to continue: --resume-from-checkpoint ${path.join(mgr.dir, 'checkpoint-<step>')}`,
      'EMIXEDRUNS',
    );
  return mgr.latest(report);
}

/** Finds the checkpoint a `--resume-from-checkpoint` value names. */
export async function resolveResume(value: string, mgr: CheckpointManager, strict: boolean, warn: (m: string) => void): Promise<ResumeSource | undefined> {
  const report = (e: CheckpointEntry) => {
    const msg = `skipping ${e.path}: ${e.problem}`;
    if (strict) throw new CheckpointError(`${msg} (--strict-resume)`, 'EBADCKPT');
    warn(msg);
  };
  if (value === 'latest') {
    const e = await latestOfOneRun(mgr, report);
    const d = diffusersCheckpoints(mgr.outputDir)[0];
    if (e) {
      if (d && d.step > e.step)
        warn(`${d.path} (a diffusers/accelerate checkpoint, step ${d.step}) is further than ${e.path}; continuing train-lora's own checkpoint (pass --resume-from-checkpoint ${d.path} to import that one instead)`);
      return { kind: 'train-lora', entry: e };
    }
    return d ? { kind: 'diffusers', ...d } : undefined;
  }
  const p = path.resolve(value);
  if (!fs.existsSync(p)) throw new CheckpointError(`--resume-from-checkpoint ${value}: no such checkpoint or run folder`, 'ENOENT');
  if (!isDir(p)) throw new CheckpointError(`--resume-from-checkpoint ${value}: ${p} is a file, not a checkpoint folder. ${CHECKPOINT_HINT}`, 'ENOTCKPT');
  const runFolder = isDir(path.join(p, 'checkpoints'));
  if (runFolder) {
    // Another run's output folder: its latest valid checkpoint.
    const e = await latestOfOneRun(new CheckpointManager(p), report);
    if (e) return { kind: 'train-lora', entry: e };
  }
  const d = diffusersCheckpoint(p) ?? diffusersCheckpoints(p)[0];
  if (d) return { kind: 'diffusers', ...d };
  if (runFolder) throw new CheckpointError(`--resume-from-checkpoint ${value}: that run has no valid checkpoint`, 'ENOENT');
  if (!fs.existsSync(path.join(p, MANIFEST))) throw new CheckpointError(`--resume-from-checkpoint ${value}: ${describeNonCheckpoint(p)}. ${CHECKPOINT_HINT}`, 'ENOTCKPT');
  const e = await verifyCheckpoint(p);
  if (!e.valid) throw new CheckpointError(`--resume-from-checkpoint ${value}: ${e.problem}`, 'EBADCKPT');
  return { kind: 'train-lora', entry: e };
}

/** Names (relative to the run folder) of the work of an earlier run that a new run would mix with or overwrite. */
const EARLIER_RUN_FILES = ['pytorch_lora_weights.safetensors', 'lora_weights', 'lora_kohya.safetensors', 'final_pipeline', 'unet'];
/** Moved aside with them by --overwrite-output-dir (they describe that run), but no reason to refuse by themselves. */
const EARLIER_RUN_COMPANIONS = ['exports', 'validation'];

/** What an earlier run left in `outputDir` that a new run there would mix with (checkpoints) or overwrite (its LoRA files). */
export function earlierRunWork(outputDir: string): string[] {
  if (!isDir(outputDir)) return [];
  const found: string[] = [];
  const ck = path.join(outputDir, 'checkpoints');
  if (isDir(ck) && fs.readdirSync(ck).some((n) => CKPT_NAME_RE.test(n))) found.push('checkpoints');
  for (const n of fs.readdirSync(outputDir).sort()) if (CKPT_NAME_RE.test(n) && isDir(path.join(outputDir, n))) found.push(n);
  for (const n of EARLIER_RUN_FILES) if (fs.existsSync(path.join(outputDir, n))) found.push(n);
  return found;
}

function describeWork(outputDir: string, names: readonly string[]): string {
  return names
    .map((n) => {
      if (n !== 'checkpoints') return CKPT_NAME_RE.test(n) ? `${n}/ (diffusers/accelerate)` : n;
      const runs = checkpointRuns(new CheckpointManager(outputDir));
      const ids = [...new Set(runs.map((r) => r.runId).filter(Boolean))];
      return `checkpoints/ (${runs.map((r) => r.name).join(', ')}${ids.length ? `; run ${ids.join(', ')}` : ''})`;
    })
    .join(', ');
}

/**
 * --overwrite-output-dir: moves `names` (paths relative to the run folder) into OUT/previous/<time>/, keeping their
 * relative paths. Nothing is deleted; returns the folder they went to.
 */
function moveAside(outputDir: string, names: readonly string[]): string {
  const dest = path.join(outputDir, 'previous', new Date().toISOString().replace(/[:.]/g, '-'));
  for (const n of names) {
    const to = path.join(dest, n);
    fs.mkdirSync(path.dirname(to), { recursive: true });
    fs.renameSync(path.join(outputDir, n), to);
    fsyncPath(path.dirname(path.join(outputDir, n)));
  }
  fsyncPath(dest);
  return dest;
}

/**
 * The output folder is usable: it does not exist yet (it will be created), or it is a folder. A file in its place or
 * on its path is an error naming it and the fix (instead of mkdir's raw ENOTDIR / EEXIST).
 */
export function checkOutputDir(dir: string): void {
  const abs = path.resolve(dir);
  for (let p = abs; ; p = path.dirname(p)) {
    let st: fs.Stats | undefined;
    try {
      st = fs.statSync(p);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOTDIR') continue; // a file further up: found on the next iteration
      if (code !== 'ENOENT') throw e;
    }
    if (st && !st.isDirectory())
      throw new CheckpointError(
        p === abs
          ? `--output-dir ${dir}: ${abs} is a file, not a folder. Pass a folder for the run (it is created if missing), or move the file away.`
          : `--output-dir ${dir}: ${p} is a file, so the folder ${abs} cannot be created inside it. Pass another --output-dir, or move the file away.`,
        'ENOTDIR',
      );
    if (st || path.dirname(p) === p) return;
  }
}

function readJson<T>(file: string): T {
  return JSON.parse(fs.readFileSync(file, 'utf8')) as T;
}

/** Differences between a checkpoint's run and this one that make resuming wrong, with the flag that accepts them. */
function compatibilityProblems(prev: TrainerStateFile, cfg: TrainConfig, modelFp: string, dataFp: string): string[] {
  const problems: string[] = [];
  if (prev.base_model.fingerprint !== modelFp)
    problems.push(`the base model differs (checkpoint: ${prev.base_model.path}, now: ${cfg.pretrained_model_name_or_path})`);
  const p = prev.config;
  if (p.train_mode !== cfg.train_mode) problems.push(`--train-mode was ${p.train_mode}, now ${cfg.train_mode}`);
  if (cfg.train_mode === 'lora') {
    if (p.rank !== cfg.rank) problems.push(`--rank was ${p.rank}, now ${cfg.rank}`);
    if ((p.lora_alpha ?? p.rank) !== loraAlpha(cfg)) problems.push(`--lora-alpha was ${p.lora_alpha ?? p.rank}, now ${loraAlpha(cfg)}`);
    if (p.lora_target_modules.join(',') !== cfg.lora_target_modules.join(','))
      problems.push(`--lora-target-modules was ${p.lora_target_modules.join(',')}, now ${cfg.lora_target_modules.join(',')}`);
  }
  if (prev.dataset.fingerprint !== dataFp && !cfg.allow_dataset_change)
    problems.push(`the dataset changed since the checkpoint (${prev.dataset.path}); pass --allow-dataset-change to continue on the new data`);
  if (p.seed !== undefined && p.seed !== cfg.seed)
    problems.push(`--seed was ${p.seed}, now ${cfg.seed}: the data order and augmentation of the checkpoint's epoch come from its seed; resume with --seed ${p.seed}, or start a new run`);
  if (changed(p, cfg, 'validation_split') && !cfg.allow_dataset_change)
    problems.push(`--validation-split was ${show(p.validation_split)}, now ${show(cfg.validation_split)}: the training images differ; pass --allow-dataset-change to continue on the new split`);
  return problems;
}

/** Options of one invocation, not of the training: a resume changes them without a note. */
const PER_INVOCATION: ReadonlySet<string> = new Set(['output_dir', 'resume_from_checkpoint', 'strict_resume', 'reset_optimizer', 'allow_dataset_change', 'overwrite_output_dir', 'log_level']);
/**
 * Compared on their own: model and data by fingerprint, mode / rank / alpha / targets / seed / split as compatibility
 * problems, the device by crossDeviceNotes, the processes by the world-size note, the LoRA init is unused on resume.
 */
const COMPARED_ELSEWHERE: ReadonlySet<string> = new Set([
  'pretrained_model_name_or_path', 'train_data_dir', 'max_train_samples', 'train_mode', 'rank', 'lora_alpha', 'lora_target_modules', 'seed', 'validation_split',
  'device', 'num_processes', 'nnodes', 'node_rank', 'master_addr', 'master_port', 'dist_backend', 'dist_timeout', 'init_lora_weights',
]);
/** What the LR schedule is built from. */
const SCHEDULE_KEYS = ['learning_rate', 'scale_lr', 'lr_scheduler', 'lr_warmup_steps', 'lr_num_cycles', 'lr_power', 'max_train_steps'] as const;
/** The global batch. */
const BATCH_KEYS = ['train_batch_size', 'gradient_accumulation_steps'] as const;

const show = (v: unknown): string => (v === undefined ? 'unset' : Array.isArray(v) ? v.join(',') : String(v));
/** The option differs between the checkpoint's configuration and this one (an option the checkpoint predates does not). */
function changed(prev: TrainConfig, cfg: TrainConfig, key: string): boolean {
  const b = (cfg as Record<string, unknown>)[key];
  // An option with a default is in every configuration that knew it: absent, the checkpoint predates it.
  if (!(key in prev) && TrainConfigSchema.innerType().shape[key as keyof TrainConfig] instanceof z.ZodDefault) return false;
  return JSON.stringify((prev as Record<string, unknown>)[key]) !== JSON.stringify(b);
}
const changeText = (prev: TrainConfig, cfg: TrainConfig, key: string): string =>
  `${flagName(key)} ${show((prev as Record<string, unknown>)[key])} -> ${show((cfg as Record<string, unknown>)[key])}`;

/**
 * Every option a resume changes, by how it is applied: the LR schedule is rebuilt, the global batch changes, or the
 * rest takes effect from the next step. (Changes that cannot be applied are compatibilityProblems.)
 */
export function resumeChanges(prev: TrainConfig, cfg: TrainConfig): { schedule: string[]; batch: string[]; other: string[] } {
  const out = { schedule: [] as string[], batch: [] as string[], other: [] as string[] };
  for (const key of Object.keys(cfg).sort()) {
    if (PER_INVOCATION.has(key) || COMPARED_ELSEWHERE.has(key) || !changed(prev, cfg, key)) continue;
    const group = (SCHEDULE_KEYS as readonly string[]).includes(key) ? out.schedule : (BATCH_KEYS as readonly string[]).includes(key) ? out.batch : out.other;
    group.push(changeText(prev, cfg, key));
  }
  return out;
}

export interface TrainOptions {
  /** Test-only fault injection for checkpoint saves. */
  faultHook?: (stage: string) => void;
  /** Default true: SIGINT/SIGTERM finish the step, save and stop. */
  installSignalHandlers?: boolean;
  /** Behave as if SIGINT arrived during this step (tests of interruption and resume). */
  stopAtStep?: number;
  /** Test-only fault injection: may replace a micro-batch of optimizer step `step` (1-based) before it runs. */
  batchHook?: (step: number, batch: TrainBatch) => TrainBatch;
  /** The wall clock in ms (default Date.now); tests of --checkpointing-minutes pass their own. */
  now?: () => number;
  /** Free bytes on the checkpoint folder's file system (default: statfs); tests of a full disk pass their own. */
  freeBytes?: (dir: string) => number;
}

/** Reporter of ranks > 0: only warnings and errors, prefixed with the rank (rank 0 logs, shows progress, writes metrics). */
function rankReporter(report: TrainReporter, rank: number): TrainReporter {
  return {
    info: () => undefined,
    warn: (m, d) => report.warn(`[rank ${rank}] ${m}`, d),
    error: (m, d) => report.error(`[rank ${rank}] ${m}`, d),
    step: () => undefined,
  };
}

export async function train(cfg: TrainConfig, report: TrainReporter, opts: TrainOptions = {}): Promise<TrainResult> {
  const outputDir = path.resolve(cfg.output_dir ?? nextRunDir());
  checkOutputDir(outputDir);
  fs.mkdirSync(outputDir, { recursive: true });
  const now = opts.now ?? Date.now;
  // Data parallel (torchrun's environment, or train-lora --num-processes): rank 0 owns the run folder.
  const distEnv = distEnvFromProcess();
  const isMain = !distEnv || distEnv.worldSize === 1 || distEnv.rank === 0;
  if (!isMain) report = rankReporter(report, distEnv!.rank);
  let dist: DistContext = singleProcess();
  const lock = new RunLock(outputDir);
  if (isMain) lock.acquire();
  if (lock.staleRemoved) report.warn(`removed a stale lock of ${outputDir}: ${lock.staleRemoved}`);
  const mgr = new CheckpointManager(outputDir, { faultHook: opts.faultHook, freeBytes: opts.freeBytes });
  const stop: Stop = {};
  const onSignal = (sig: NodeJS.Signals) => {
    if (stop.signal) {
      report.error(`second ${sig}: aborting now without saving (the last checkpoint is intact)`);
      lock.release();
      process.exit(sig === 'SIGINT' ? 130 : 143);
    }
    stop.signal = sig;
    report.warn(`${sig} received: finishing the current optimizer step, then saving a checkpoint (press again to abort)`);
  };
  // A worker started by train-lora --num-processes: the supervisor going away is a SIGTERM.
  const onDisconnect = () => onSignal('SIGTERM');
  if (opts.installSignalHandlers !== false) {
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
    if (process.env.TRAIN_LORA_SUPERVISED && process.channel) {
      process.channel.unref();
      process.on('disconnect', onDisconnect);
    }
  }
  let loader: MicroBatchSource | undefined;
  let pipe: PipelineHandle | undefined;
  let trainerHandle: TrainerHandle | undefined;
  const startedAt = Date.now();
  try {
    if (isMain) for (const n of mgr.cleanStale()) report.info(`removed an incomplete checkpoint folder left by a crash: ${n}`);
    if (isMain) for (const f of cleanStaleExports(outputDir)) report.info(`removed a temporary file of an interrupted export: ${f}`);
    // A new run never mixes with (or overwrites) an earlier run's checkpoints and LoRA files in the same folder.
    if (!cfg.resume_from_checkpoint && !(cfg.overwrite_output_dir && !isMain)) {
      const work = earlierRunWork(outputDir);
      if (work.length && !cfg.overwrite_output_dir)
        throw new CheckpointError(
          `${outputDir} already holds the work of an earlier run: ${describeWork(outputDir, work)}. A new run there would mix its checkpoints with that run's ` +
            `(and its final LoRA would replace that run's). Choose one:\n` +
            `  - continue that run: add --resume-from-checkpoint latest\n` +
            `  - start the new run in another folder: --output-dir OTHER_FOLDER\n` +
            `  - start the new run here anyway: add --overwrite-output-dir (the earlier run's files are moved to ${path.join(outputDir, 'previous', '<time>')}/; nothing is deleted)`,
          'ERUNEXISTS',
        );
      if (work.length && isMain) {
        const companions = EARLIER_RUN_COMPANIONS.filter((n) => fs.existsSync(path.join(outputDir, n)));
        const what = describeWork(outputDir, work);
        const dest = moveAside(outputDir, [...work, ...companions]);
        report.warn(`--overwrite-output-dir: moved the earlier run's ${what}${companions.length ? `, ${companions.join(', ')}` : ''} to ${dest} (nothing was deleted; remove that folder to free ${formatBytes(dirSize(dest))})`);
      }
    }

    // ---- model, data, schedule ----
    if (cfg.cache_latents && (cfg.random_flip || !cfg.center_crop))
      throw new Error('--cache-latents encodes each image once, so it needs --center-crop and no --random-flip');
    await checkModel(cfg.pretrained_model_name_or_path, ['unet', 'vae', 'text_encoder']);
    const modelDir = path.resolve(cfg.pretrained_model_name_or_path);
    const devices = await native().devices();
    let device = await resolveDevice(cfg.device, devices);
    if (distEnv && distEnv.worldSize > 1) {
      if (device === 'cuda') device = `cuda:${distEnv.localRank}`; // one GPU per local rank
      const backend = pickBackend(cfg.dist_backend, device);
      const t = Date.now();
      dist = await initDistributed(distEnv, { backend, timeoutMs: cfg.dist_timeout * 1000, device });
      report.info(`joined the process group: ${dist.worldSize} processes (${backend}, rendezvous ${distEnv.masterAddr}:${distEnv.masterPort}, ${Date.now() - t} ms)`);
    }
    const precision = planPrecision(cfg.mixed_precision, device, devices, cfg.train_mode);
    const mixed = precision.mixed;
    report.info(`device: ${device}; ${precision.description}`);
    for (const w of precision.warnings) report.warn(w);
    // TF32 off unless asked for: fp32 results then match a CPU reference (libtorch's own default allows it in cuDNN).
    const tf32 = await native().setAllowTf32(cfg.allow_tf32);
    if (cfg.allow_tf32)
      report.info(
        device.startsWith('cuda')
          ? `--allow-tf32: TF32 matmuls and convolutions on (cuBLAS ${tf32.cublas}, cuDNN ${tf32.cudnn}); fp32 math is then ~10 bits of mantissa on Ampere and newer GPUs`
          : `--allow-tf32 has no effect on ${device}: TF32 exists only on NVIDIA GPUs (Ampere and newer)`,
      );
    const tokenizer = CLIPTokenizer.fromFolder(modelTokenizerDir(modelDir));
    const noise = NoiseSchedule.fromFile(modelSchedulerConfig(modelDir), cfg.prediction_type ? { predictionType: cfg.prediction_type } : {});
    if (noise.predictionType === 'sample') throw new Error('prediction_type "sample" is not supported for training; use epsilon or v_prediction');
    const fullDataset: Dataset = await loadDataset(cfg.train_data_dir, datasetOptions(cfg));
    report.info(describeDataset(fullDataset));
    for (const s of fullDataset.skipped) report.warn(`skipped ${s.file}: ${s.reason}`);
    const modelFp = await modelFingerprint(modelDir);
    const dataFp = datasetFingerprint(fullDataset);
    // Held-out images for val_loss: a seeded split of the training folder, or a folder of their own.
    let dataset = fullDataset;
    let heldOut: Dataset | undefined;
    if (cfg.validation_split !== undefined) {
      ({ train: dataset, val: heldOut } = splitDataset(fullDataset, cfg.validation_split, cfg.seed));
      report.info(`--validation-split ${cfg.validation_split}: ${heldOut.items.length} images held out for val_loss, ${dataset.items.length} train`);
    } else if (cfg.validation_data_dir) {
      // Its own folder: any layout, every image (no --max-train-samples subset).
      heldOut = await loadDataset(cfg.validation_data_dir, { ...datasetOptions(cfg), layout: undefined, maxTrainSamples: undefined });
      report.info(`--validation-data-dir: ${heldOut.items.length} held-out images for val_loss`);
    }
    const stage = cfg.stage ?? `${cfg.train_mode}-${dataFp.slice(0, 12)}`;

    // ---- resume ----
    let resumeFrom: CheckpointEntry | undefined;
    let imported: DiffusersCheckpoint | undefined;
    let prev: TrainerStateFile | undefined;
    if (cfg.resume_from_checkpoint) {
      const src = await resolveResume(cfg.resume_from_checkpoint, mgr, cfg.strict_resume, (m) => report.warn(m));
      if (!src) report.warn(`--resume-from-checkpoint ${cfg.resume_from_checkpoint}: no valid checkpoint in ${mgr.dir} (nor a diffusers/accelerate checkpoint-N in ${outputDir}); starting a new run`);
      else if (src.kind === 'diffusers') {
        imported = src;
        const problems = await importProblems(src, cfg);
        if (problems.length)
          throw new CheckpointError(`cannot import ${src.path}:\n  - ${problems.join('\n  - ')}\nStart a new run with another --output-dir, or fix the options.`, 'EINCOMPATIBLE');
      } else {
        resumeFrom = src.entry;
        prev = readStateFile<TrainerStateFile>(resumeFrom.path, 'trainer_state.json');
        const problems = compatibilityProblems(prev, cfg, modelFp, dataFp);
        if (problems.length)
          throw new CheckpointError(`cannot resume from ${resumeFrom.path}:\n  - ${problems.join('\n  - ')}\nStart a new run with another --output-dir, or fix the options.`, 'EINCOMPATIBLE');
      }
    }
    // One id for a run and all its resumes (an imported diffusers run starts a new one here).
    const runId = prev?.run_id ?? randomUUID().slice(0, 8);
    if (isMain && (resumeFrom || imported)) {
      // Continuing a run whose checkpoints are elsewhere into a folder that holds another run's checkpoints would mix them.
      const sourceHere = resumeFrom !== undefined && path.dirname(resumeFrom.path) === mgr.dir;
      const foreign = checkpointRuns(mgr).filter((c) => (c.runId ? c.runId !== runId : !sourceHere));
      if (foreign.length && !cfg.overwrite_output_dir)
        throw new CheckpointError(
          `cannot continue ${(resumeFrom ?? imported)!.path} in ${outputDir}: ${mgr.dir} holds checkpoints of another run (${foreign.map((c) => c.name + (c.runId ? ` of run ${c.runId}` : '')).join(', ')}). ` +
            `Continuing here would mix the two runs. Resume into another --output-dir, or add --overwrite-output-dir to move those checkpoints to ${path.join(outputDir, 'previous', '<time>')}/ (nothing is deleted).`,
          'ERUNEXISTS',
        );
      if (foreign.length) {
        const names = foreign.map((c) => path.join('checkpoints', c.name));
        const bestStep = mgr.readBest()?.step;
        if (bestStep !== undefined && foreign.some((c) => c.step === bestStep)) names.push(path.join('checkpoints', 'best.json'));
        const dest = moveAside(outputDir, names);
        report.warn(`--overwrite-output-dir: moved the checkpoints of another run (${foreign.map((c) => c.name).join(', ')}) out of ${mgr.dir} to ${dest} (nothing was deleted)`);
      }
    }

    // ---- native pipeline + trainer ----
    const weightDtype = precision.weightDtype;
    const t0 = Date.now();
    pipe = await native().loadPipeline(modelDir, { device, dtype: weightDtype, variant: cfg.variant });
    report.info(`loaded ${modelDir} on ${device} (${weightDtype}) in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    const created = await native().createTrainer(pipe, {
      mode: cfg.train_mode,
      rank: cfg.rank,
      alpha: loraAlpha(cfg),
      dropout: cfg.lora_dropout,
      init: 'gaussian',
      targets: cfg.lora_target_modules,
      mixedPrecision: mixed,
      gradientCheckpointing: cfg.gradient_checkpointing,
      predictionType: noise.predictionType as 'epsilon' | 'v_prediction',
      noiseOffset: cfg.noise_offset,
      snrGamma: cfg.snr_gamma,
      alphasCumprod: Array.from(noise.alphasCumprod),
      adamBeta1: cfg.adam_beta1,
      adamBeta2: cfg.adam_beta2,
      adamWeightDecay: cfg.adam_weight_decay,
      adamEpsilon: cfg.adam_epsilon,
      maxGradNorm: cfg.max_grad_norm,
      seed: cfg.seed,
    });
    const { trainer, trainableParams, totalParams } = created;
    trainerHandle = trainer;
    await dist.attach(trainer);
    report.info(`trainable parameters: ${trainableParams.toLocaleString('en-US')} of ${totalParams.toLocaleString('en-US')} (${((100 * trainableParams) / totalParams).toFixed(3)} %)`);

    if (cfg.init_lora_weights && !resumeFrom && !imported) {
      if (cfg.train_mode !== 'lora') throw new Error('--init-lora-weights needs --train-mode lora');
      const n = await native().trainerLoadLora(trainer, path.resolve(cfg.init_lora_weights));
      report.info(`initialized ${n} LoRA modules from ${cfg.init_lora_weights}`);
    }

    // ---- schedule and data order ----
    const batchSize = cfg.train_batch_size;
    const accum = cfg.gradient_accumulation_steps;
    const world = dist.worldSize;
    const batchesPerEpoch = Math.ceil(dataset.items.length / batchSize);
    const updatesPerEpoch = Math.ceil(Math.ceil(dataset.items.length / (batchSize * world)) / accum);
    const maxSteps = cfg.max_train_steps;
    let spec: LrScheduleSpec = trainingLrSchedule({
      kind: cfg.lr_scheduler as LrScheduleSpec['kind'],
      learningRate: cfg.learning_rate,
      scaleLr: cfg.scale_lr,
      lrWarmupSteps: cfg.lr_warmup_steps,
      maxTrainSteps: maxSteps,
      numTrainEpochs: Math.ceil(maxSteps / updatesPerEpoch),
      batchesPerEpoch,
      gradientAccumulationSteps: accum,
      trainBatchSize: batchSize,
      numProcesses: world,
      numCycles: cfg.lr_num_cycles,
      power: cfg.lr_power,
    });
    let globalStep = 0;
    let schedulerSteps = 0;
    let samplesSeen = 0;
    let cursor: SampleOrderState | undefined;
    let best = prev?.best_metric ?? null;
    /** Optimizer steps skipped for non-finite loss or gradients: in all, and in a row up to now. */
    let nonFiniteTotal = 0;
    let nonFiniteRun = 0;
    /** The last step whose update was applied: the weights are that step's. */
    let lastGoodStep = 0;
    if (resumeFrom && prev) {
      const dir = resumeFrom.path;
      // This rank's RNG streams (every rank draws the same global-batch tensors, so rank 0's serve a new rank).
      const ownRng = path.join(dir, `random_states_${dist.rank}.json`);
      const rng = readStateFile<{ torch: Record<string, string>; data: { sampler: SampleOrderState } }>(dir, fs.existsSync(ownRng) ? path.basename(ownRng) : 'random_states_0.json');
      const scaler = readStateFile<TrainerStateJson['scaler']>(dir, 'scaler.json');
      const optim = readStateFile<{ per_parameter_steps: Record<string, number> }>(dir, 'optimizer.json');
      for (const note of crossDeviceNotes(prev, rng.torch, device, await native().trainerRngState(trainer))) report.warn(note);
      const sched = readStateFile<{ spec: unknown; scheduler_steps: number }>(dir, 'scheduler.json');
      await native().trainerLoadState(trainer, dir, {
        optimizerSteps: cfg.reset_optimizer ? undefined : optim.per_parameter_steps,
        scaler,
        rng: rng.torch,
      });
      globalStep = prev.global_step;
      samplesSeen = prev.samples_seen;
      nonFiniteTotal = prev.nonfinite_steps ?? 0;
      lastGoodStep = prev.last_good_step ?? prev.global_step;
      const sameData = prev.dataset.fingerprint === dataFp;
      cursor = sameData ? rng.data.sampler : undefined;
      if (!sameData) report.warn('the dataset changed: starting its order from the beginning of a new epoch');
      const prevWorld = prev.world_size ?? 1;
      const changes = resumeChanges(prev.config, cfg);
      const batchNow = `the global batch is now ${batchSize * accum * world} (was ${prev.config.train_batch_size * prev.config.gradient_accumulation_steps * prevWorld})`;
      const order = `the data cursor is global, so the same sample order continues at epoch ${prev.epoch}, sample ${prev.position}`;
      if (prevWorld !== world)
        report.warn(
          `resuming a checkpoint made by ${prevWorld} process(es) with ${world}${changes.batch.length ? ` and ${changes.batch.join(', ')}` : ''}: ${order}; ` +
            `${batchNow} and the LR schedule is rebuilt for ${world} process(es)`,
        );
      else if (changes.batch.length) report.warn(`resuming a checkpoint made with ${changes.batch.join(', ')}: ${batchNow}; ${order}`);
      if (cfg.reset_optimizer) {
        report.warn(`--reset-optimizer: keeping the weights of step ${globalStep}, fresh AdamW moments and a fresh LR schedule`);
        schedulerSteps = 0;
      } else {
        schedulerSteps = sched.scheduler_steps;
        // The schedule the options give now; the checkpoint's own when they give the same one.
        const saved = lrScheduleFromJSON(sched.spec).spec;
        if (sameSchedule(saved, spec)) spec = saved;
        else
          report.warn(
            `the LR schedule changed on resume (${[...changes.schedule, ...(prevWorld !== world ? [`${prevWorld} -> ${world} process(es)`] : []), ...(cfg.scale_lr ? changes.batch : [])].join(', ') || 'its resolved parameters differ'}): ` +
              `continuing at scheduler step ${schedulerSteps} of the new schedule (lr ${lrForOptimizerStep(saved, schedulerSteps, prevWorld)} -> ${lrForOptimizerStep(spec, schedulerSteps, world)})`,
          );
      }
      if (changes.other.length) report.info(`options changed since ${resumeFrom.name}, applied from step ${globalStep + 1}: ${changes.other.join(', ')}`);
      if (cfg.init_lora_weights) report.info(`--init-lora-weights ${cfg.init_lora_weights} is not used: the weights come from ${dir}`);
      report.info(`resumed from ${dir} at step ${globalStep} (epoch ${prev.epoch}, sample ${prev.position})`);
    } else if (imported) {
      // A diffusers/accelerate checkpoint: its LoRA weights and step; its pickled optimizer, scheduler and RNG state are never read.
      const n = await native().trainerLoadLora(trainer, imported.lora);
      globalStep = imported.step;
      schedulerSteps = imported.step;
      lastGoodStep = imported.step;
      samplesSeen = imported.step * batchSize * accum * world;
      report.warn(
        `imported ${imported.path} (a diffusers/accelerate checkpoint of step ${imported.step}): the LoRA weights of ${n} modules from ${path.basename(imported.lora)}. ` +
          `Not loaded: ${imported.pickles.length ? imported.pickles.join(', ') : 'its optimizer, scheduler and random states'} (pickles, which train-lora never loads). So the AdamW moments restart from zero, ` +
          `the LR schedule continues from step ${imported.step} (${cfg.lr_scheduler}, lr ${lrForOptimizerStep(spec, schedulerSteps, world)}), and the random generators and the data order restart (epoch 0, sample 0). ` +
          `train-lora's own checkpoints go to ${mgr.dir}; the files of ${imported.path} are left as they are.`,
      );
      if (cfg.init_lora_weights) report.info(`--init-lora-weights ${cfg.init_lora_weights} is not used: the weights come from ${imported.lora}`);
    }
    if (globalStep >= maxSteps) {
      report.info(`already at step ${globalStep} of ${maxSteps}: nothing to train (raise --max-train-steps to continue)`);
    }

    const loaderOpts: LoaderOptions = {
      batchSize,
      seed: cfg.seed,
      resolution: cfg.resolution,
      interpolation: cfg.image_interpolation_mode,
      centerCrop: cfg.center_crop,
      randomFlip: cfg.random_flip,
      resampler: cfg.image_resampler,
      cursor: cursor ? { epoch: cursor.epoch, position: cursor.position } : undefined,
      rank: dist.rank,
      worldSize: world,
      prefetchBatches: 2,
      concurrency: Math.max(4, cfg.dataloader_num_workers * 2),
      // Deterministic augmentation (center crop, no flip): each image is decoded once and kept (exact; bounded).
      imageCacheMb: IMAGE_CACHE_MB,
      captionDropoutRate: cfg.caption_dropout_rate,
    };
    if (cfg.cache_latents) {
      const t1 = Date.now();
      const cache = await buildLatentCache(pipe, dataset, loaderOpts);
      report.info(`--cache-latents: encoded ${dataset.items.length} images once in ${((Date.now() - t1) / 1000).toFixed(1)} s`);
      loader = new CachedLatentSource(dataset, cache, batchSize, cfg.seed, loaderOpts.cursor, { rank: dist.rank, worldSize: world }, cfg.caption_dropout_rate);
    } else {
      loader = new ImageSource(dataset, loaderOpts);
    }
    // A cursor at the end of an epoch means the next batch starts the next epoch.

    // ---- validation ----
    // Validation runs on rank 0 only (outside any collective); other ranks wait at the next step's all-reduce.
    let valLossSet: ValidationLoss | undefined;
    if (heldOut && dist.isMain) {
      const t1 = Date.now();
      valLossSet = await ValidationLoss.prepare(pipe, tokenizer, heldOut, {
        loader: loaderOpts,
        seed: cfg.validation_seed ?? cfg.seed,
        numTrainTimesteps: noise.alphasCumprod.length,
        scalingFactor: vaeScalingFactor(modelDir),
        batchSize,
      });
      report.info(`val_loss: ${valLossSet.size} held-out images encoded in ${((Date.now() - t1) / 1000).toFixed(1)} s (fixed noise and timesteps)`);
    }
    const validator = new Validator(cfg, valLossSet, dist.isMain ? makeImageRenderer(cfg, pipe, tokenizer, modelDir, outputDir) : undefined);
    let lastVal: { step: number; loss: number } | undefined;
    const validate = async (step: number): Promise<void> => {
      const r = await validator.run(step, trainer);
      if (r.valLoss !== undefined) lastVal = { step, loss: r.valLoss };
      report.validation?.(r);
      const parts = [r.valLoss !== undefined ? `val_loss ${r.valLoss.toPrecision(5)}` : '', r.images.length ? `${r.images.length} images in ${path.dirname(r.images[0])}` : ''].filter(Boolean);
      report.info(`validation at step ${step}: ${parts.join(', ')} (${r.ms} ms)`, { step, val_loss: r.valLoss, images: r.images.length, grid: r.grid });
    };
    if (cfg.validation_before_training && validator.enabled && globalStep < maxSteps) await validate(globalStep);

    const losses: number[] = [];
    let lastCheckpoint: string | undefined;
    /** When the last checkpoint save started (--checkpointing-minutes counts from it). */
    let lastSaveAt = now();
    let lastLoss: number | null = prev?.train_loss ?? null;

    /**
     * Starts a checkpoint save. Everything it records is captured now (the native snapshot is queued on the torch
     * thread right behind the optimizer step), and the files are written in the background while training goes on.
     */
    /** --monitor val_loss ranks checkpoints by the held-out loss at their own step: measure it before saving. */
    const measureMonitor = async (): Promise<void> => {
      if (cfg.monitor !== 'val_loss' || !valLossSet || lastVal?.step === globalStep) return;
      const v = await validator.valLoss(trainer);
      if (v !== undefined) lastVal = { step: globalStep, loss: v };
    };
    // Must not await before mgr.save() has queued the native snapshot: it captures the state of this step.
    // `at`: the state at the start of the step in progress (a data error mid-step saves the last completed step).
    const saveCheckpoint = async (reason: string, at?: StepStartState): Promise<void> => {
      const valNow = lastVal?.step === globalStep ? lastVal.loss : null;
      // The best checkpoint by the monitored metric, counting this one (recorded in it and, once it is sealed, in best.json).
      const metric = cfg.monitor === 'val_loss' ? valNow : lastLoss;
      const improves =
        metric !== null && Number.isFinite(metric) && (!best || best.name !== cfg.monitor || (cfg.monitor_mode === 'min' ? metric < best.value : metric > best.value));
      const bestNow = improves ? { name: cfg.monitor, value: metric, step: globalStep, mode: cfg.monitor_mode } : best;
      const t = Date.now();
      const state = at?.cursor ?? loader!.state();
      const step = globalStep;
      const schedSteps = schedulerSteps;
      const seen = at?.samplesSeen ?? samplesSeen;
      const loss = lastLoss;
      const nfTotal = nonFiniteTotal;
      const lastGood = lastGoodStep;
      lastSaveAt = now();
      // JS-thread time of the save's background parts (the JSON files, the manifest, retention): training's next
      // micro-step waits for the JS thread, so this is stall too. The weight files are written and hashed natively.
      let busyMs = 0;
      try {
        const entry = await mgr.save(
          step,
          async (tmp) => {
            // lora_rank / lora_alpha: the checkpoint's model.safetensors loads at its true strength on its own (--lora, --init-lora-weights).
            const loraMeta: Record<string, string> = cfg.train_mode === 'lora' ? { lora_rank: String(cfg.rank), lora_alpha: String(loraAlpha(cfg)) } : {};
            const st = await native().trainerSaveState(trainer, tmp, { format: 'pt', step: String(step), ...loraMeta });
            // Never a checkpoint of non-finite weights (LoRA weights are small enough to check at every save).
            if (cfg.train_mode === 'lora') await assertFiniteWeights(path.join(tmp, 'model.safetensors'), step);
            const c0 = Date.now();
            writeJsonDurable(path.join(tmp, 'optimizer.json'), {
              kind: 'AdamW',
              betas: [cfg.adam_beta1, cfg.adam_beta2],
              eps: cfg.adam_epsilon,
              weight_decay: cfg.adam_weight_decay,
              per_parameter_steps: st.optimizerSteps,
            });
            writeJsonDurable(path.join(tmp, 'scheduler.json'), { spec, scheduler_steps: schedSteps, num_processes: world, next_lr: lrForOptimizerStep(spec, schedSteps, world) });
            writeJsonDurable(path.join(tmp, 'scaler.json'), st.scaler);
            writeJsonDurable(path.join(tmp, 'random_states_0.json'), { torch: at?.rng ?? st.rng, data: { sampler: state, seed: cfg.seed } });
            if (world > 1) collectRankParts(mgr.dir, step, world, tmp);
            const ts: TrainerStateFile = {
              version: TRAINER_STATE_VERSION,
              run_id: runId,
              global_step: step,
              scheduler_steps: schedSteps,
              nonfinite_steps: nfTotal,
              last_good_step: lastGood,
              epoch: state.epoch,
              position: state.position,
              world_size: world,
              samples_seen: seen,
              max_train_steps: maxSteps,
              train_loss: loss,
              val_loss: valNow,
              stage,
              best_metric: bestNow,
              base_model: { path: modelDir, fingerprint: modelFp },
              dataset: { path: path.resolve(cfg.train_data_dir), fingerprint: dataFp, size: dataset.items.length },
              config: cfg,
              device,
              mixed_precision: mixed,
              resumed_from: resumeFrom?.path ?? imported?.path ?? null,
              ...(imported ? { imported_from: { path: imported.path, format: 'diffusers' as const, step: imported.step } } : {}),
              versions: { train_lora: packageVersion(), torch: native().version().torch, node: process.version },
              time: new Date().toISOString(),
              host: os.hostname(),
            };
            writeJsonDurable(path.join(tmp, 'trainer_state.json'), ts);
            busyMs += Date.now() - c0;
            return st.files;
          },
          { reason, expectedBytes: lastCheckpointSize(mgr), onBlocked: (ms) => (busyMs += ms) },
        );
        const c1 = Date.now();
        lastCheckpoint = entry.path;
        if (world > 1) removeRankParts(mgr.dir, step);
        if (improves && bestNow) {
          best = bestNow;
          mgr.writeBest({ step, metric: bestNow.name, value: bestNow.value, mode: bestNow.mode });
        }
        // Checkpoints of another run in the folder (only possible in folders from before run ids) are never counted or deleted.
        const otherRuns = checkpointRuns(mgr).filter((c) => c.runId !== undefined && c.runId !== runId).map((c) => c.step);
        const removed = mgr.prune(cfg.checkpoints_total_limit, { best: best?.step, final: reason === 'final' ? step : undefined, stage, otherRuns });
        busyMs += Date.now() - c1;
        saveBusyMs.push(busyMs);
        report.info(`saved ${entry.path} (${reason}) in ${Date.now() - t} ms${removed.length ? `; removed ${removed.join(', ')}` : ''}`, {
          checkpoint: entry.path,
          saveMs: Date.now() - t,
          jsBusyMs: busyMs,
        });
      } catch (e) {
        if (world > 1) removeRankParts(mgr.dir, step);
        if (cfg.on_save_error === 'continue' && reason !== 'final' && reason !== 'signal') {
          report.error(`${(e as Error).message} (continuing: --on-save-error continue)`);
          return;
        }
        throw e;
      }
    };

    /**
     * Every rank at the same step before a save: ranks > 0 stage their RNG state (random_states_<rank>.json), then
     * all meet at a barrier (failing after --dist-timeout), so rank 0 seals the checkpoint only with every part in.
     */
    const syncRanksForSave = async (): Promise<void> => {
      if (world === 1) return;
      if (!dist.isMain) writeRankPart(mgr.dir, globalStep, dist.rank, { torch: await native().trainerRngState(trainer), data: { sampler: loader!.state(), seed: cfg.seed } });
      await dist.barrier(`checkpoint-${globalStep}: waiting for every rank's random state`);
    };

    let inflight: Promise<void> | undefined;
    let saveError: Error | undefined;
    const saveStallMs: number[] = [];
    const saveBusyMs: number[] = [];

    /**
     * The free-space pre-check of a background save, run synchronously before it starts and before the next step
     * trains, so a refused save stops the run at this step (no step trained after the last save is lost twice).
     * False: skipped by --on-save-error continue.
     */
    const spaceForSave = (): boolean => {
      try {
        mgr.checkFreeSpace(globalStep, lastCheckpointSize(mgr));
        return true;
      } catch (e) {
        if (world > 1) removeRankParts(mgr.dir, globalStep);
        if (cfg.on_save_error !== 'continue') throw e;
        report.error(`${(e as Error).message} (continuing without this checkpoint: --on-save-error continue)`);
        return false;
      }
    };

    /**
     * A training image failed to load mid-run (changed on disk since the start, an I/O error; damaged images are
     * refused when the dataset loads). Saves the last completed step (unless a checkpoint of it exists), then stops with
     * the error and what to do. With several processes the other ranks wait in a collective, so nothing is saved.
     */
    const dataError = async (e: Error, at: StepStartState): Promise<never> => {
      report.finish?.();
      if (world > 1) throw e;
      await inflight?.catch(() => undefined);
      let saved = '';
      const ckpt = CheckpointManager.pathFor(mgr.dir, globalStep);
      if (globalStep > 0 && !fs.existsSync(ckpt)) {
        try {
          await saveCheckpoint('data-error', at);
          saved = fs.existsSync(ckpt) ? `saved ${ckpt}, the last completed step (${globalStep})` : `the checkpoint of step ${globalStep} could not be saved (see above)`;
        } catch (se) {
          saved = `the checkpoint of step ${globalStep} could not be saved: ${(se as Error).message}`;
        }
      } else if (globalStep > 0) saved = `${ckpt} holds the last completed step`;
      throw Object.assign(
        new Error(
          `${e.message}\nTraining stopped at step ${globalStep}${saved ? `; ${saved}` : ''}. Restore or re-export that image (or remove its caption), ` +
            'then continue with --resume-from-checkpoint latest (with --skip-bad-images a damaged image is left out at the start instead, which changes the dataset: add --allow-dataset-change).',
          { cause: e },
        ),
        { code: 'EDATA' },
      );
    };
    /** Set when an update with non-finite values was applied: the weights are lost, nothing may be saved or exported. */
    let poisoned: string | undefined;
    let nonFiniteStop = false;
    report.start?.(maxSteps, globalStep);
    let stepStart = Date.now();
    lastSaveAt = now();
    while (globalStep < maxSteps && !stop.signal) {
      if (saveError) throw saveError;
      // Where this step starts: an image that fails to load in its middle saves the last completed step from here.
      // (The RNG streams move with every micro-batch: recorded only when a step has several.)
      const atStepStart: StepStartState = { cursor: loader.state(), samplesSeen, rng: accum > 1 && world === 1 ? await native().trainerRngState(trainer) : undefined };
      // One optimizer step: a full accumulation cycle, or what is left of the epoch.
      let micro = 0;
      let lossSum = 0;
      let epoch = 0;
      let endOfEpoch = false;
      do {
        const batch = await loader.next().catch((e: Error) => dataError(e, atStepStart));
        const ids = tokenizer.encodeBatch(batch.captions, { maxLength: tokenizer.modelMaxLength, padding: 'max_length' });
        const b = batch.indices.length;
        const inputIds = fromInt64('input_ids', [b, ids[0].length], ids.flat());
        let tb: TrainBatch = { ...batch.images, inputIds };
        if (opts.batchHook) tb = opts.batchHook(globalStep + 1, tb);
        const loss = await native().trainerMicroStep(trainer, tb, accum);
        lossSum += loss;
        micro++;
        samplesSeen += b * world;
        epoch = batch.epoch;
        endOfEpoch = batch.lastInEpoch;
      } while (micro < accum && !endOfEpoch);
      const lr = lrForOptimizerStep(spec, schedulerSteps, world);
      const r = await native().trainerOptimizerStep(trainer, lr);
      if (!r.skipped) schedulerSteps++;
      globalStep++;
      if (opts.stopAtStep !== undefined && globalStep >= opts.stopAtStep) stop.signal = 'SIGINT';
      let loss = lossSum / micro;
      // --checkpointing-minutes: a save is due when that much wall-clock time passed since the last one started.
      let timeDue = cfg.checkpointing_minutes !== undefined && now() - lastSaveAt >= cfg.checkpointing_minutes * 60_000;
      if (world > 1) {
        // The global mean loss, and a stop request and a due time that every rank honours at this same step.
        const own = stop.signal as NodeJS.Signals | undefined;
        const [sum, sigint, sigterm, timeVotes] = await dist.allReduce([loss, own === 'SIGINT' ? 1 : 0, own === 'SIGTERM' ? 1 : 0, timeDue ? 1 : 0]);
        loss = sum / world;
        if (sigterm > 0) stop.signal = 'SIGTERM';
        else if (sigint > 0) stop.signal = 'SIGINT';
        timeDue = timeVotes > 0;
      }
      if (Number.isFinite(loss)) lastLoss = loss;
      losses.push(loss);
      const tNow = Date.now();
      report.step({ step: globalStep, epoch, loss, lr, gradNorm: r.gradNorm, skipped: r.skipped, lossScale: r.lossScale, stepTime: (tNow - stepStart) / 1000, samplesSeen });
      stepStart = tNow;
      // A non-finite loss or gradients: the native step skips the update (weights and AdamW untouched, the LR schedule
      // holds). Counted, logged, and a run of --max-nonfinite-steps of them in a row stops training.
      const nonFinite = r.skipped || r.nonFinite === true || !Number.isFinite(loss) || !Number.isFinite(r.gradNorm);
      if (nonFinite && !r.skipped) {
        poisoned = `step ${globalStep}: the loss (${loss}) or the gradients (norm ${r.gradNorm}) were non-finite and the update was applied, so the weights are no longer finite`;
        break;
      }
      if (nonFinite) {
        nonFiniteRun++;
        nonFiniteTotal++;
        const streak = `${nonFiniteRun} in a row, ${nonFiniteTotal} in all; the run stops after --max-nonfinite-steps ${cfg.max_nonfinite_steps} in a row`;
        const what = Number.isFinite(loss) ? 'gradients' : `loss (${loss})`;
        if (mixed === 'fp16')
          report.warn(`step ${globalStep}: fp16 overflow (non-finite ${what}), update skipped and the LR schedule held; loss scale now ${r.lossScale} (${streak})`);
        else report.warn(`step ${globalStep}: non-finite ${what}: update skipped (weights and AdamW state unchanged) and the LR schedule held (${streak})`);
        if (nonFiniteRun >= cfg.max_nonfinite_steps) {
          nonFiniteStop = true;
          break;
        }
      } else {
        nonFiniteRun = 0;
        lastGoodStep = globalStep;
      }
      const stepDue = globalStep % cfg.checkpointing_steps === 0 || (cfg.checkpoint_every_epoch && endOfEpoch);
      const due = stepDue || timeDue;
      if (stop.signal) break;
      if (validator.due(globalStep, epoch, endOfEpoch)) await validate(globalStep);
      if (due && globalStep < maxSteps) {
        // At most one save in flight: wait for the previous one (its failure stops training unless
        // --on-save-error continue), then start this one in the background.
        await measureMonitor();
        const w = Date.now();
        await inflight;
        await syncRanksForSave();
        lastSaveAt = now();
        inflight = dist.isMain && spaceForSave() ? saveCheckpoint(!stepDue ? 'time' : endOfEpoch && cfg.checkpoint_every_epoch ? 'epoch-end' : 'interval') : undefined;
        inflight?.catch((e: unknown) => {
          saveError = e as Error; // surfaced at the next step
        });
        saveStallMs.push(Date.now() - w);
      }
    }
    if (poisoned) {
      report.finish?.();
      await inflight?.catch(() => undefined);
      throw new DivergedError(
        `${poisoned}: nothing is saved or exported from them. The last checkpoint (${lastCheckpoint ?? 'none yet'}) holds the last good state. ` +
          'Lower --learning-rate, then continue with --resume-from-checkpoint latest.',
        lastCheckpoint,
      );
    }
    const finished = globalStep >= maxSteps && !nonFiniteStop;
    if (finished && validator.enabled && !validator.done(globalStep) && !stop.signal) await validate(globalStep);
    report.finish?.();
    await inflight;
    if (dist.isMain) await measureMonitor();
    await syncRanksForSave();
    if (dist.isMain) await saveCheckpoint(nonFiniteStop ? 'nonfinite' : stop.signal ? 'signal' : finished ? 'final' : 'interval');
    if (nonFiniteStop) {
      const first = globalStep - nonFiniteRun + 1;
      throw new DivergedError(
        `stopped at step ${globalStep}: ${nonFiniteRun} optimizer steps in a row (steps ${first}-${globalStep}) had a non-finite loss or gradients (--max-nonfinite-steps ${cfg.max_nonfinite_steps}). ` +
          `None of them was applied, so the weights are those of step ${lastGoodStep}, the last good step${lastCheckpoint ? `; saved in ${lastCheckpoint}` : ''}. ` +
          `The run is diverging: lower --learning-rate (e.g. by half), keep --max-grad-norm 1${mixed === 'fp16' ? ', or train with --mixed-precision bf16 or no instead of fp16' : ''}, then continue with --resume-from-checkpoint latest.`,
        lastCheckpoint,
      );
    }
    if (saveStallMs.length)
      report.info(
        `checkpoint saves stalled training by ${Math.max(...saveStallMs)} ms at most to start (${saveStallMs.length} background saves), ` +
          `and held the JS thread for ${Math.max(0, ...saveBusyMs)} ms at most while they finished (JSON files, manifest, retention; weight files are written and hashed off it)`,
        { saveStallMs, saveBusyMs },
      );
    const loraFiles: string[] = [];
    if (finished && cfg.train_mode === 'lora' && dist.isMain) {
      // A LoRA file that train-lora did not write (a diffusers run's, in its own output folder) is never replaced.
      const foreign = await foreignLoraFiles(outputDir, cfg.save_format);
      const exportDir = foreign.length ? path.join(outputDir, 'exports', `checkpoint-${globalStep}`) : outputDir;
      if (foreign.length)
        report.warn(`${foreign.map((f) => path.join(outputDir, f)).join(', ')}: not written by train-lora (another trainer's LoRA), left as it is; this run's LoRA goes to ${exportDir}`);
      const r = await exportLora(
        {
          source: { trainer },
          outDir: exportDir,
          formats: cfg.save_format,
          merge: cfg.merge,
          baseModel: modelDir,
          variant: cfg.variant,
          config: cfg,
          steps: globalStep,
          epoch: loader.state().epoch,
          numTrainImages: dataset.items.length,
          numValidationImages: heldOut?.items.length ?? 0,
          captions: dataset.items.map((i) => i.captions[0] ?? ''),
          mixedPrecision: mixed,
          baseModelFingerprint: modelFp,
          trainingStartedAt: startedAt,
        },
        (m) => report.info(m),
      );
      loraFiles.push(...r.files);
    } else if (finished && cfg.train_mode === 'full' && dist.isMain && lastCheckpoint) {
      // Full training: the trained UNet as a diffusers component folder (OUT/unet), loadable with from_pretrained.
      const unetDir = writeUnetFolder(path.join(lastCheckpoint, 'model.safetensors'), modelConfigFile(modelDir, 'unet'), outputDir);
      loraFiles.push(path.join(unetDir, 'diffusion_pytorch_model.safetensors'));
      report.info(`trained UNet: ${unetDir} (diffusers layout: UNet2DConditionModel.from_pretrained("${unetDir}"))`);
      if (cfg.merge) report.warn('--merge applies to LoRA training; the full run\'s UNet is in OUT/unet');
    }
    return { outputDir, globalStep, finished, signal: stop.signal, lastCheckpoint, loraFiles, losses };
  } finally {
    await loader?.close();
    await dist.destroy().catch(() => undefined);
    // Release the native trainer (weights, AdamW state, gradients) and pipeline now, not when the GC gets to them:
    // a library user may train again in the same process.
    if (trainerHandle) native().dispose(trainerHandle);
    if (pipe) native().dispose(pipe);
    if (opts.installSignalHandlers !== false) {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
      process.off('disconnect', onDisconnect);
    }
    lock.release();
  }
}

/**
 * What a resume on another device cannot continue bit-exactly: the random streams of the checkpoint's device are not
 * this device's. Weights, optimizer, LR schedule, loss scaler and the data position carry over exactly either way.
 */
export function crossDeviceNotes(prev: Pick<TrainerStateFile, 'device' | 'config'>, saved: Record<string, string>, device: string, here: Record<string, string>): string[] {
  const notes: string[] = [];
  const before = prev.device ?? (prev.config.device === 'auto' ? undefined : prev.config.device);
  const type = (d: string) => d.split(':')[0];
  if (before && type(before) !== type(device))
    notes.push(
      `this checkpoint was trained on ${before} and resumes on ${device}: weights, optimizer, LR schedule, loss scaler and data position continue exactly, ` +
        `but noise and timesteps now come from ${type(device)}'s random generator, so the run will not be bit-identical to one that stayed on ${before}`,
    );
  const lost = Object.keys(saved).filter((k) => !(k in here));
  if (lost.length && !notes.length)
    notes.push(`random streams ${lost.join(', ')} of the checkpoint do not exist on this machine and are not restored (a run on them is not continued bit-exactly)`);
  return notes;
}

/** OUT/unet/{config.json, diffusion_pytorch_model.safetensors}, written into a temporary folder, fsynced and renamed into place. */
function writeUnetFolder(weights: string, config: string, outputDir: string): string {
  const dir = path.join(outputDir, 'unet');
  const tmp = path.join(outputDir, `.tmp-unet-${process.pid}`);
  fs.rmSync(tmp, { recursive: true, force: true });
  fs.mkdirSync(tmp, { recursive: true });
  for (const [src, name] of [[weights, 'diffusion_pytorch_model.safetensors'], [config, 'config.json']]) {
    fs.copyFileSync(src, path.join(tmp, name));
    fsyncPath(path.join(tmp, name));
  }
  fsyncPath(tmp);
  renameDirReplacing(tmp, dir, path.join(outputDir, `.old-unet-${process.pid}`));
  return dir;
}

function lastCheckpointSize(mgr: CheckpointManager): number | undefined {
  if (!fs.existsSync(mgr.dir)) return undefined;
  const steps = fs.readdirSync(mgr.dir).map((n) => /^checkpoint-(\d+)$/.exec(n)?.[1]).filter((x): x is string => x !== undefined).map(Number);
  return steps.length ? dirSize(CheckpointManager.pathFor(mgr.dir, Math.max(...steps))) : undefined;
}
