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
import * as path from 'node:path';

import { type CheckpointEntry, CheckpointError, CheckpointManager, RunLock } from '../checkpoint/manager';
import { dirSize, formatBytes, fsyncPath, renameDirReplacing } from '../checkpoint/fsutil';
import { convAlpha, datasetOptions, loraAlpha, loraTargetModules, textEncoderTargets, type TrainConfig } from '../config';
import {
  loadTrainingState,
  MODEL_FILE,
  randomStates,
  readTrainerState,
  removeRankParts,
  saveTrainingState,
  TRAINER_STATE_VERSION,
  type TrainerStateFile,
  type TrainingSnapshot,
  writeRankPart,
} from '../checkpoint/state';
import { cleanStaleExports, exportLora } from '../export/lora-export';
import { datasetFingerprint, describeDataset, loadDataset, type Dataset } from '../data/dataset';
import { initDistributed, pickBackend, singleProcess, type DistContext } from '../distributed/context';
import { distEnvFromProcess } from '../distributed/env';
import type { LoaderOptions } from '../data/loader';
import type { SampleOrderState } from '../data/sampler';
import { checkModel, modelConfigFile, modelSchedulerConfig, modelTokenizerDir } from '../model-folders/model-folder';
import { modelFingerprint } from '../model-folders/fingerprint';
import { applyThreadPolicy, native, type OptimizerStepResult, type PipelineHandle, type TrainBatch, type TrainerHandle } from '../native';
import { fromInt64 } from '../tensors';
import { CLIPTokenizer } from '../tokenizer';
import { lrForOptimizerStep, lrLambda, lrScheduleFromJSON, trainingLrSchedule, type LrScheduleSpec } from '../schedules/lr';
import { NoiseSchedule } from '../schedules/noise';
import { planPrecision, resolveDevice, type PrecisionPlan } from '../device';
import { buildLatentCache, CachedLatentSource, ImageSource, type MicroBatchSource } from './sources';
import { batchesPerEpochOnRank, type DataPlan, loaderExtras, planData } from '../data/plan';
import { BucketOrder, bucketInfo } from '../data/buckets';
import { Validator, type ValidationResult } from './validation';
import { makeImageRenderer } from './validation-images';
import { splitDataset } from '../data/split';
import { ValidationLoss } from './validation-loss';
import {
  checkOutputDir,
  checkpointRuns,
  compatibilityProblems,
  describeWork,
  type DiffusersCheckpoint,
  EARLIER_RUN_COMPANIONS,
  earlierRunWork,
  foreignLoraFiles,
  importProblems,
  moveAside,
  nextRunDir,
  resolveResume,
  resumeChanges,
  sameSchedule,
} from './resume';

// The checkpoint's state files live in src/checkpoint/state.ts; these stay importable from here.
export { assertFiniteWeights, TRAINER_STATE_VERSION, type TrainerStateFile } from '../checkpoint/state';
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

/** What train() releases when it returns or throws, however far preparing got. */
interface Resources {
  dist: DistContext;
  loader?: MicroBatchSource;
  /** The held-out images' native latents (val_loss). */
  valLoss?: ValidationLoss;
  pipe?: PipelineHandle;
  trainer?: TrainerHandle;
}

/** What train() knows before preparing the run: the folder, the lock, the stop flag, this process's place. */
interface RunSetup {
  cfg: TrainConfig;
  report: TrainReporter;
  opts: TrainOptions;
  /** The wall clock (TrainOptions.now; --checkpointing-minutes counts with it). */
  now: () => number;
  outputDir: string;
  distEnv: ReturnType<typeof distEnvFromProcess>;
  isMain: boolean;
  mgr: CheckpointManager;
  stop: Stop;
  startedAt: number;
  res: Resources;
}

/**
 * One training run once prepared: what prepare() decided (fixed for the run), and the progress the loop advances
 * and every save records. The loop, the saves and finish() read and update this one object.
 */
interface RunState extends Omit<RunSetup, 'distEnv' | 'isMain'> {
  /** Buckets and masks of the run (issue 17; src/train/data-plan.ts). */
  dataPlan: DataPlan;
  dist: DistContext;
  device: string;
  mixed: PrecisionPlan['mixed'];
  modelDir: string;
  tokenizer: CLIPTokenizer;
  dataset: Dataset;
  heldOut?: Dataset;
  modelFp: string;
  dataFp: string;
  stage: string;
  resumeFrom?: CheckpointEntry;
  imported?: DiffusersCheckpoint;
  runId: string;
  trainer: TrainerHandle;
  loader: MicroBatchSource;
  batchSize: number;
  accum: number;
  world: number;
  maxSteps: number;
  valLossSet?: ValidationLoss;
  validator: Validator;

  // ---- progress (recorded in every checkpoint) ----
  spec: LrScheduleSpec;
  globalStep: number;
  schedulerSteps: number;
  samplesSeen: number;
  best: TrainerStateFile['best_metric'];
  /** Optimizer steps skipped for non-finite loss or gradients: in all, and in a row up to now. */
  nonFiniteTotal: number;
  nonFiniteRun: number;
  /** The last step whose update was applied: the weights are that step's. */
  lastGoodStep: number;
  lastLoss: number | null;
  lastVal?: { step: number; loss: number };
  losses: number[];

  // ---- saves ----
  lastCheckpoint?: string;
  /** When the last checkpoint save started (--checkpointing-minutes counts from it). */
  lastSaveAt: number;
  /** The background save in flight (at most one), and its failure, surfaced at the next step. */
  inflight?: Promise<void>;
  saveError?: Error;
  saveStallMs: number[];
  saveBusyMs: number[];

  // ---- how the loop ended ----
  /** Set when an update with non-finite values was applied: the weights are lost, nothing may be saved or exported. */
  poisoned?: string;
  nonFiniteStop: boolean;
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
  const res: Resources = { dist: singleProcess() };
  const lock = new RunLock(outputDir);
  if (isMain) lock.acquire();
  if (lock.staleRemoved) report.warn(`removed a stale lock of ${outputDir}: ${lock.staleRemoved}`);
  const mgr = new CheckpointManager(outputDir, { faultHook: opts.faultHook, freeBytes: opts.freeBytes });
  const stop: Stop = {};
  const removeSignalHandlers = installSignalHandlers(report, lock, stop, opts);
  const startedAt = Date.now();
  try {
    const run = await prepare({ cfg, report, opts, now, outputDir, distEnv, isMain, mgr, stop, startedAt, res });
    await trainLoop(run);
    return await finish(run);
  } finally {
    await res.loader?.close();
    res.valLoss?.dispose();
    await res.dist.destroy().catch(() => undefined);
    // Release the native trainer (weights, AdamW state, gradients) and pipeline now, not when the GC gets to them:
    // a library user may train again in the same process.
    if (res.trainer) native().dispose(res.trainer);
    if (res.pipe) native().dispose(res.pipe);
    removeSignalHandlers();
    lock.release();
  }
}

/** SIGINT/SIGTERM finish the step, save and stop (a second one aborts at once); returns what removes the handlers. */
function installSignalHandlers(report: TrainReporter, lock: RunLock, stop: Stop, opts: TrainOptions): () => void {
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
  if (opts.installSignalHandlers === false) return () => undefined;
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  if (process.env.TRAIN_LORA_SUPERVISED && process.channel) {
    process.channel.unref();
    process.on('disconnect', onDisconnect);
  }
  return () => {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    process.off('disconnect', onDisconnect);
  };
}

// ---- prepare: config checks, model, data, resume ----

/** Everything before the first step: the folder, the device, the data, the resume source, the trainer, the data order, validation. */
async function prepare(s: RunSetup): Promise<RunState> {
  const { cfg, report, mgr, res } = s;
  if (s.isMain) for (const n of mgr.cleanStale()) report.info(`removed an incomplete checkpoint folder left by a crash: ${n}`);
  if (s.isMain) for (const f of cleanStaleExports(s.outputDir)) report.info(`removed a temporary file of an interrupted export: ${f}`);
  checkEarlierRun(s);

  // ---- model, data, schedule ----
  if (cfg.cache_latents && (cfg.random_flip || !cfg.center_crop))
    throw new Error('--cache-latents encodes each image once, so it needs --center-crop and no --random-flip');
  await checkModel(cfg.pretrained_model_name_or_path, ['unet', 'vae', 'text_encoder']);
  const modelDir = path.resolve(cfg.pretrained_model_name_or_path);
  const { device, precision } = await setupDevice(s);
  const tokenizer = CLIPTokenizer.fromFolder(modelTokenizerDir(modelDir));
  const noise = NoiseSchedule.fromFile(modelSchedulerConfig(modelDir), cfg.prediction_type ? { predictionType: cfg.prediction_type } : {});
  if (noise.predictionType === 'sample') throw new Error('prediction_type "sample" is not supported for training; use epsilon or v_prediction');
  const data = await loadData(cfg, report, modelDir);
  // --enable-bucket, --masked-loss: may leave out too-small images (--skip-bad-images), so before the schedule.
  const dataPlan = await planData(cfg, report, modelDir, data, s.isMain);

  // ---- resume ----
  const { resumeFrom, imported, prev } = await resumeSource(s, data.modelFp, data.dataFp);
  // One id for a run and all its resumes (an imported diffusers run starts a new one here).
  const runId = prev?.run_id ?? randomUUID().slice(0, 8);
  if (s.isMain && (resumeFrom || imported)) moveForeignCheckpoints(s, runId, resumeFrom, imported);

  // ---- native pipeline + trainer ----
  const trainer = await createTrainer(s, modelDir, device, precision, noise);
  if (cfg.init_lora_weights && !resumeFrom && !imported) {
    if (cfg.train_mode !== 'lora') throw new Error('--init-lora-weights needs --train-mode lora');
    const n = await native().trainerLoadLora(trainer, path.resolve(cfg.init_lora_weights));
    report.info(`initialized ${n} LoRA modules from ${cfg.init_lora_weights}`);
  }

  // ---- schedule and data order ----
  const batchSize = cfg.train_batch_size;
  const accum = cfg.gradient_accumulation_steps;
  const world = res.dist.worldSize;
  const maxSteps = cfg.max_train_steps;
  const spec = lrScheduleFor(cfg, dataPlan, data.dataset.items.length, world);
  const progress = await restoreProgress(s, { trainer, device, spec, dataFp: data.dataFp, resumeFrom, imported, prev });
  if (progress.globalStep >= maxSteps) {
    report.info(`already at step ${progress.globalStep} of ${maxSteps}: nothing to train (raise --max-train-steps to continue)`);
  }
  if (dataPlan.table && progress.cursor) {
    try {
      BucketOrder.checkResume(progress.cursor, dataPlan.table, batchSize * world);
    } catch (e) {
      throw new CheckpointError(`cannot resume from ${resumeFrom?.path}: ${(e as Error).message}`, 'EINCOMPATIBLE');
    }
  }
  const loaderOpts: LoaderOptions = { ...loaderOptions(cfg, progress.cursor, res.dist), ...loaderExtras(cfg, dataPlan) };
  const loader = await createLoader(s, data.dataset, loaderOpts);

  // ---- validation ----
  // Validation runs on rank 0 only (outside any collective); other ranks wait at the next step's all-reduce.
  const valLossSet = data.heldOut && res.dist.isMain ? await prepareValLoss(s, data.heldOut, tokenizer, noise, heldOutLoaderOptions(loaderOpts, dataPlan)) : undefined;
  const validator = new Validator(cfg, valLossSet, res.dist.isMain ? makeImageRenderer(cfg, res.pipe!, tokenizer, modelDir, s.outputDir) : undefined);

  const run: RunState = {
    cfg,
    report,
    opts: s.opts,
    now: s.now,
    outputDir: s.outputDir,
    mgr,
    stop: s.stop,
    startedAt: s.startedAt,
    res,
    dist: res.dist,
    device,
    mixed: precision.mixed,
    modelDir,
    tokenizer,
    ...data,
    resumeFrom,
    imported,
    runId,
    trainer,
    loader,
    dataPlan,
    batchSize,
    accum,
    world,
    maxSteps,
    valLossSet,
    validator,
    ...progress,
    best: prev?.best_metric ?? null,
    nonFiniteRun: 0,
    lastLoss: prev?.train_loss ?? null,
    losses: [],
    lastSaveAt: 0,
    saveStallMs: [],
    saveBusyMs: [],
    nonFiniteStop: false,
  };
  if (cfg.validation_before_training && validator.enabled && run.globalStep < maxSteps) await validate(run, run.globalStep);
  run.lastSaveAt = s.now();
  return run;
}

/** The LR schedule as diffusers' script builds it: warmup and length in optimizer steps, epochs from the data. */
function lrScheduleFor(cfg: TrainConfig, dataPlan: DataPlan, items: number, world: number): LrScheduleSpec {
  const batchSize = cfg.train_batch_size;
  const accum = cfg.gradient_accumulation_steps;
  const maxSteps = cfg.max_train_steps;
  const batchesPerEpoch = dataPlan.table ? batchesPerEpochOnRank(dataPlan, items, batchSize, world) * world : Math.ceil(items / batchSize);
  const updatesPerEpoch = Math.ceil(batchesPerEpochOnRank(dataPlan, items, batchSize, world) / accum);
  return trainingLrSchedule({
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
}

/** The held-out images' val_loss set, encoded once into native latents (into res, so train() releases it). */
async function prepareValLoss({ cfg, report, res }: RunSetup, heldOut: Dataset, tokenizer: CLIPTokenizer, noise: NoiseSchedule, loader: LoaderOptions): Promise<ValidationLoss> {
  const t1 = Date.now();
  res.valLoss = await ValidationLoss.prepare(res.pipe!, tokenizer, heldOut, {
    loader,
    seed: cfg.validation_seed ?? cfg.seed,
    numTrainTimesteps: noise.alphasCumprod.length,
    batchSize: cfg.train_batch_size,
  });
  report.info(`val_loss: ${res.valLoss.size} held-out images encoded in ${((Date.now() - t1) / 1000).toFixed(1)} s (fixed noise and timesteps)`);
  return res.valLoss;
}

/** A new run never mixes with (or overwrites) an earlier run's checkpoints and LoRA files in the same folder. */
function checkEarlierRun({ cfg, report, outputDir, isMain }: RunSetup): void {
  if (cfg.resume_from_checkpoint || (cfg.overwrite_output_dir && !isMain)) return;
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

/** The device (one GPU per local rank), the process group of a data-parallel run (into res.dist), mixed precision and TF32. */
async function setupDevice({ cfg, report, distEnv, res }: RunSetup): Promise<{ device: string; precision: PrecisionPlan }> {
  const devices = await native().devices();
  let device = await resolveDevice(cfg.device, devices);
  if (distEnv && distEnv.worldSize > 1) {
    if (device === 'cuda') device = `cuda:${distEnv.localRank}`; // one GPU per local rank
    const backend = pickBackend(cfg.dist_backend, device);
    const t = Date.now();
    res.dist = await initDistributed(distEnv, { backend, timeoutMs: cfg.dist_timeout * 1000, device });
    report.info(`joined the process group: ${res.dist.worldSize} processes (${backend}, rendezvous ${distEnv.masterAddr}:${distEnv.masterPort}, ${Date.now() - t} ms)`);
  }
  const precision = planPrecision(cfg.mixed_precision, device, devices, cfg.train_mode);
  report.info(`device: ${device}; ${precision.description}`);
  if (device === 'cpu') report.info(`CPU threads: ${devices.find((d) => d.type === 'cpu')?.threads ?? '?'} intra-op; ${applyThreadPolicy().description}`);
  for (const w of precision.warnings) report.warn(w);
  // TF32 off unless asked for: fp32 results then match a CPU reference (libtorch's own default allows it in cuDNN).
  const tf32 = await native().setAllowTf32(cfg.allow_tf32);
  if (cfg.allow_tf32)
    report.info(
      device.startsWith('cuda')
        ? `--allow-tf32: TF32 matmuls and convolutions on (cuBLAS ${tf32.cublas}, cuDNN ${tf32.cudnn}); fp32 math is then ~10 bits of mantissa on Ampere and newer GPUs`
        : `--allow-tf32 has no effect on ${device}: TF32 exists only on NVIDIA GPUs (Ampere and newer)`,
    );
  return { device, precision };
}

/** The training images (and the held-out ones for val_loss), the model and data fingerprints, the training stage. */
async function loadData(
  cfg: TrainConfig,
  report: TrainReporter,
  modelDir: string,
): Promise<{ dataset: Dataset; heldOut?: Dataset; modelFp: string; dataFp: string; stage: string }> {
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
  return { dataset, heldOut, modelFp, dataFp, stage };
}

/** What --resume-from-checkpoint names, checked against this run (a train-lora checkpoint and its trainer_state.json, or a diffusers one to import). */
async function resumeSource(
  { cfg, report, mgr, outputDir }: RunSetup,
  modelFp: string,
  dataFp: string,
): Promise<{ resumeFrom?: CheckpointEntry; imported?: DiffusersCheckpoint; prev?: TrainerStateFile }> {
  if (!cfg.resume_from_checkpoint) return {};
  const src = await resolveResume(cfg.resume_from_checkpoint, mgr, cfg.strict_resume, (m) => report.warn(m));
  if (!src) {
    report.warn(`--resume-from-checkpoint ${cfg.resume_from_checkpoint}: no valid checkpoint in ${mgr.dir} (nor a diffusers/accelerate checkpoint-N in ${outputDir}); starting a new run`);
    return {};
  }
  if (src.kind === 'diffusers') {
    const problems = await importProblems(src, cfg);
    if (problems.length)
      throw new CheckpointError(`cannot import ${src.path}:\n  - ${problems.join('\n  - ')}\nStart a new run with another --output-dir, or fix the options.`, 'EINCOMPATIBLE');
    return { imported: src };
  }
  const resumeFrom = src.entry;
  const prev = readTrainerState(resumeFrom.path);
  const problems = compatibilityProblems(prev, cfg, modelFp, dataFp);
  if (problems.length)
    throw new CheckpointError(`cannot resume from ${resumeFrom.path}:\n  - ${problems.join('\n  - ')}\nStart a new run with another --output-dir, or fix the options.`, 'EINCOMPATIBLE');
  return { resumeFrom, prev };
}

/** Continuing a run whose checkpoints are elsewhere into a folder that holds another run's checkpoints would mix them. */
function moveForeignCheckpoints({ cfg, report, mgr, outputDir }: RunSetup, runId: string, resumeFrom?: CheckpointEntry, imported?: DiffusersCheckpoint): void {
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

/** Loads the pipeline and creates the native trainer (both into res, so train() releases them), attached to the process group. */
async function createTrainer({ cfg, report, res }: RunSetup, modelDir: string, device: string, precision: PrecisionPlan, noise: NoiseSchedule): Promise<TrainerHandle> {
  const weightDtype = precision.weightDtype;
  const t0 = Date.now();
  const pipe = await native().loadPipeline(modelDir, { device, dtype: weightDtype, variant: cfg.variant });
  res.pipe = pipe;
  report.info(`loaded ${modelDir} on ${device} (${weightDtype}) in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  const created = await native().createTrainer(pipe, {
    mode: cfg.train_mode,
    rank: cfg.rank,
    alpha: loraAlpha(cfg),
    dropout: cfg.lora_dropout,
    init: 'gaussian',
    targets: loraTargetModules(cfg),
    trainTextEncoder: cfg.train_text_encoder,
    textEncoderTargets: cfg.train_text_encoder ? textEncoderTargets(cfg) : undefined,
    convRank: cfg.conv_rank,
    convAlpha: convAlpha(cfg),
    mixedPrecision: precision.mixed,
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
    cudaGraphs: cfg.cuda_graphs,
  });
  const { trainer, trainableParams, totalParams } = created;
  if (cfg.cuda_graphs) await reportCudaGraphs(report, trainer);
  res.trainer = trainer;
  await res.dist.attach(trainer);
  report.info(`trainable parameters: ${trainableParams.toLocaleString('en-US')} of ${totalParams.toLocaleString('en-US')} (${((100 * trainableParams) / totalParams).toFixed(3)} %)`);
  return trainer;
}

/** --cuda-graphs: by this step every shape of a run without buckets has been captured (2 eager warm-up micro-steps). */
const CUDA_GRAPH_REPORT_STEP = 4;

/** --cuda-graphs: one line on whether the micro-steps run from CUDA graphs, and why not (eager then). */
async function reportCudaGraphs(report: { info(m: string): void; warn(m: string): void }, trainer: TrainerHandle): Promise<void> {
  const s = await native().trainerGraphStatus(trainer);
  if (s.graphs > 0 || (s.active && !s.reason)) report.info(`--cuda-graphs: ${s.graphs} shape(s) captured, ${s.replays} micro-steps replayed, ${s.eager} eager${s.reason ? `; ${s.reason}` : ''}`);
  else report.warn(`--cuda-graphs: not used: ${s.reason}`);
}

/** Where training starts: step 0, a checkpoint's state (loaded into the trainer), or a diffusers checkpoint's LoRA and step. */
interface Progress {
  spec: LrScheduleSpec;
  globalStep: number;
  schedulerSteps: number;
  samplesSeen: number;
  nonFiniteTotal: number;
  lastGoodStep: number;
  /** The data cursor to continue at (undefined: the beginning of the data order). */
  cursor?: SampleOrderState;
}

async function restoreProgress(
  s: RunSetup,
  r: { trainer: TrainerHandle; device: string; spec: LrScheduleSpec; dataFp: string; resumeFrom?: CheckpointEntry; imported?: DiffusersCheckpoint; prev?: TrainerStateFile },
): Promise<Progress> {
  const fresh: Progress = { spec: r.spec, globalStep: 0, schedulerSteps: 0, samplesSeen: 0, nonFiniteTotal: 0, lastGoodStep: 0 };
  if (r.resumeFrom && r.prev) return resumeProgress(s, r.resumeFrom, r.prev, r);
  if (!r.imported) return fresh;
  // A diffusers/accelerate checkpoint: its LoRA weights and step; its pickled optimizer, scheduler and RNG state are never read.
  const { cfg, report, mgr, res } = s;
  const imported = r.imported;
  const world = res.dist.worldSize;
  const n = await native().trainerLoadLora(r.trainer, imported.lora);
  const p: Progress = { ...fresh, globalStep: imported.step, schedulerSteps: imported.step, lastGoodStep: imported.step };
  p.samplesSeen = imported.step * cfg.train_batch_size * cfg.gradient_accumulation_steps * world;
  report.warn(
    `imported ${imported.path} (a diffusers/accelerate checkpoint of step ${imported.step}): the LoRA weights of ${n} modules from ${path.basename(imported.lora)}. ` +
      `Not loaded: ${imported.pickles.length ? imported.pickles.join(', ') : 'its optimizer, scheduler and random states'} (pickles, which train-lora never loads). So the AdamW moments restart from zero, ` +
      `the LR schedule continues from step ${imported.step} (${cfg.lr_scheduler}, lr ${lrForOptimizerStep(p.spec, p.schedulerSteps, world)}), and the random generators and the data order restart (epoch 0, sample 0). ` +
      `train-lora's own checkpoints go to ${mgr.dir}; the files of ${imported.path} are left as they are.`,
  );
  if (cfg.init_lora_weights) report.info(`--init-lora-weights ${cfg.init_lora_weights} is not used: the weights come from ${imported.lora}`);
  return p;
}

/** A train-lora checkpoint: its training state into the trainer (checkpoint/state.ts), what changed since, and where to continue. */
async function resumeProgress(
  { cfg, report, res }: RunSetup,
  resumeFrom: CheckpointEntry,
  prev: TrainerStateFile,
  r: { trainer: TrainerHandle; device: string; spec: LrScheduleSpec; dataFp: string },
): Promise<Progress> {
  const dir = resumeFrom.path;
  const world = res.dist.worldSize;
  const batchSize = cfg.train_batch_size;
  const accum = cfg.gradient_accumulation_steps;
  // This rank's RNG streams (every rank draws the same global-batch tensors, so rank 0's serve a new rank).
  const { randomStates: rng, scheduler: sched } = await loadTrainingState(r.trainer, dir, {
    rank: res.dist.rank,
    resetOptimizer: cfg.reset_optimizer,
    beforeLoad: async (saved) => {
      for (const note of crossDeviceNotes(prev, saved, r.device, await native().trainerRngState(r.trainer))) report.warn(note);
    },
  });
  const p: Progress = { spec: r.spec, globalStep: prev.global_step, schedulerSteps: 0, samplesSeen: prev.samples_seen, nonFiniteTotal: prev.nonfinite_steps ?? 0, lastGoodStep: prev.last_good_step ?? prev.global_step };
  const sameData = prev.dataset.fingerprint === r.dataFp;
  p.cursor = sameData ? rng.data.sampler : undefined;
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
    report.warn(`--reset-optimizer: keeping the weights of step ${p.globalStep}, fresh AdamW moments and a fresh LR schedule`);
    p.schedulerSteps = 0;
  } else {
    p.schedulerSteps = sched.scheduler_steps;
    // The schedule the options give now; the checkpoint's own when they give the same one.
    const saved = lrScheduleFromJSON(sched.spec).spec;
    if (sameSchedule(saved, p.spec)) p.spec = saved;
    else
      report.warn(
        `the LR schedule changed on resume (${[...changes.schedule, ...(prevWorld !== world ? [`${prevWorld} -> ${world} process(es)`] : []), ...(cfg.scale_lr ? changes.batch : [])].join(', ') || 'its resolved parameters differ'}): ` +
          `continuing at scheduler step ${p.schedulerSteps} of the new schedule (lr ${lrForOptimizerStep(saved, p.schedulerSteps, prevWorld)} -> ${lrForOptimizerStep(p.spec, p.schedulerSteps, world)})`,
      );
  }
  if (changes.other.length) report.info(`options changed since ${resumeFrom.name}, applied from step ${p.globalStep + 1}: ${changes.other.join(', ')}`);
  if (cfg.init_lora_weights) report.info(`--init-lora-weights ${cfg.init_lora_weights} is not used: the weights come from ${dir}`);
  report.info(`resumed from ${dir} at step ${p.globalStep} (epoch ${prev.epoch}, sample ${prev.position})`);
  return p;
}

function loaderOptions(cfg: TrainConfig, cursor: SampleOrderState | undefined, dist: DistContext): LoaderOptions {
  return {
    batchSize: cfg.train_batch_size,
    seed: cfg.seed,
    resolution: cfg.resolution,
    interpolation: cfg.image_interpolation_mode,
    centerCrop: cfg.center_crop,
    randomFlip: cfg.random_flip,
    resampler: cfg.image_resampler,
    cursor: cursor ? { epoch: cursor.epoch, position: cursor.position } : undefined,
    rank: dist.rank,
    worldSize: dist.worldSize,
    prefetchBatches: 2,
    concurrency: Math.max(4, cfg.dataloader_num_workers * 2),
    // Deterministic augmentation (center crop, no flip): each image is decoded once and kept (exact; bounded).
    imageCacheMb: IMAGE_CACHE_MB,
    captionDropoutRate: cfg.caption_dropout_rate,
  };
}

/** The held-out images' loader options: their own buckets and masks (item indices are the held-out set's). */
function heldOutLoaderOptions(o: LoaderOptions, plan: DataPlan): LoaderOptions {
  const { buckets: _b, masks: _m, ...rest } = o;
  return { ...rest, ...(plan.heldOutTable ? { buckets: plan.heldOutTable } : {}), ...(plan.heldOutMasks ? { masks: plan.heldOutMasks } : {}) };
}

/** The micro-batch source (into res, so train() closes it): images decoded as they come, or --cache-latents encoded once. */
async function createLoader({ cfg, report, res }: RunSetup, dataset: Dataset, loaderOpts: LoaderOptions): Promise<MicroBatchSource> {
  if (cfg.cache_latents) {
    const t1 = Date.now();
    const cache = await buildLatentCache(res.pipe!, dataset, loaderOpts);
    report.info(`--cache-latents: encoded ${dataset.items.length} images once in ${((Date.now() - t1) / 1000).toFixed(1)} s`);
    res.loader = new CachedLatentSource(dataset, cache, loaderOpts);
  } else {
    res.loader = new ImageSource(dataset, loaderOpts);
  }
  // A cursor at the end of an epoch means the next batch starts the next epoch.
  return res.loader;
}

// ---- loop: steps, saves, validation ----

/** Optimizer steps until --max-train-steps, a stop request, a diverging run or a poisoned update. */
async function trainLoop(run: RunState): Promise<void> {
  run.report.start?.(run.maxSteps, run.globalStep);
  let stepStart = Date.now();
  run.lastSaveAt = run.now();
  while (run.globalStep < run.maxSteps && !run.stop.signal) {
    if (run.saveError) throw run.saveError;
    const { cfg, world } = run;
    // Where this step starts: an image that fails to load in its middle saves the last completed step from here.
    // (The RNG streams move with every micro-batch: recorded only when a step has several.)
    const atStepStart: StepStartState = { cursor: run.loader.state(), samplesSeen: run.samplesSeen, rng: run.accum > 1 && world === 1 ? await native().trainerRngState(run.trainer) : undefined };
    // One optimizer step: a full accumulation cycle, or what is left of the epoch.
    const { lossSum, micro, epoch, endOfEpoch } = await accumulate(run, atStepStart);
    const lr = lrForOptimizerStep(run.spec, run.schedulerSteps, world);
    const r = await native().trainerOptimizerStep(run.trainer, lr, textEncoderLr(cfg, run.spec, run.schedulerSteps * world));
    if (!r.skipped) run.schedulerSteps++;
    run.globalStep++;
    if (run.opts.stopAtStep !== undefined && run.globalStep >= run.opts.stopAtStep) run.stop.signal = 'SIGINT';
    let loss = lossSum / micro;
    // --checkpointing-minutes: a save is due when that much wall-clock time passed since the last one started.
    let timeDue = cfg.checkpointing_minutes !== undefined && run.now() - run.lastSaveAt >= cfg.checkpointing_minutes * 60_000;
    if (world > 1) ({ loss, timeDue } = await agreeAcrossRanks(run, loss, timeDue));
    if (Number.isFinite(loss)) run.lastLoss = loss;
    run.losses.push(loss);
    const tNow = Date.now();
    run.report.step({ step: run.globalStep, epoch, loss, lr, gradNorm: r.gradNorm, skipped: r.skipped, lossScale: r.lossScale, stepTime: (tNow - stepStart) / 1000, samplesSeen: run.samplesSeen });
    stepStart = tNow;
    if (cfg.cuda_graphs && run.globalStep === CUDA_GRAPH_REPORT_STEP) await reportCudaGraphs(run.report, run.trainer);
    if (countNonFinite(run, r, loss) === 'stop') break;
    const stepDue = run.globalStep % cfg.checkpointing_steps === 0 || (cfg.checkpoint_every_epoch && endOfEpoch);
    const due = stepDue || timeDue;
    if (run.stop.signal) break;
    if (run.validator.due(run.globalStep, epoch, endOfEpoch)) await validate(run, run.globalStep);
    if (due && run.globalStep < run.maxSteps) await startBackgroundSave(run, !stepDue ? 'time' : endOfEpoch && cfg.checkpoint_every_epoch ? 'epoch-end' : 'interval');
  }
}

/**
 * The text encoder's lr at a scheduler step (--train-text-encoder): its own base lr (--text-encoder-lr, not scaled by
 * --scale-lr, as diffusers' dreambooth LoRA scripts and kohya take it; default the UNet's resolved base lr) times the
 * schedule's LambdaLR factor, which torch applies to every param group alike. Undefined when the text encoder is frozen.
 */
export function textEncoderLr(cfg: TrainConfig, spec: LrScheduleSpec, schedulerStep: number): number | undefined {
  if (!cfg.train_text_encoder) return undefined;
  return (cfg.text_encoder_lr ?? spec.baseLr) * lrLambda(spec, schedulerStep);
}

/** The micro-batches of one optimizer step (forward + backward each): a full accumulation cycle, or what is left of the epoch. */
async function accumulate(run: RunState, atStepStart: StepStartState): Promise<{ lossSum: number; micro: number; epoch: number; endOfEpoch: boolean }> {
  const { tokenizer, loader } = run;
  let micro = 0;
  let lossSum = 0;
  let epoch = 0;
  let endOfEpoch = false;
  do {
    const batch = await loader.next().catch((e: Error) => dataError(run, e, atStepStart));
    const ids = tokenizer.encodeBatch(batch.captions, { maxLength: tokenizer.modelMaxLength, padding: 'max_length' });
    const b = batch.indices.length;
    const inputIds = fromInt64('input_ids', [b, ids[0].length], ids.flat());
    let tb: TrainBatch = { ...batch.images, inputIds };
    if (run.opts.batchHook) tb = run.opts.batchHook(run.globalStep + 1, tb);
    const loss = await native().trainerMicroStep(run.trainer, tb, run.accum);
    lossSum += loss;
    micro++;
    run.samplesSeen += b * run.world;
    epoch = batch.epoch;
    endOfEpoch = batch.lastInEpoch;
  } while (micro < run.accum && !endOfEpoch);
  return { lossSum, micro, epoch, endOfEpoch };
}

/** Several processes: the global mean loss, and a stop request and a due time that every rank honours at this same step. */
async function agreeAcrossRanks(run: RunState, loss: number, timeDue: boolean): Promise<{ loss: number; timeDue: boolean }> {
  const own = run.stop.signal as NodeJS.Signals | undefined;
  const [sum, sigint, sigterm, timeVotes] = await run.dist.allReduce([loss, own === 'SIGINT' ? 1 : 0, own === 'SIGTERM' ? 1 : 0, timeDue ? 1 : 0]);
  if (sigterm > 0) run.stop.signal = 'SIGTERM';
  else if (sigint > 0) run.stop.signal = 'SIGINT';
  return { loss: sum / run.world, timeDue: timeVotes > 0 };
}

/**
 * A non-finite loss or gradients: the native step skips the update (weights and AdamW untouched, the LR schedule
 * holds). Counted, logged, and a run of --max-nonfinite-steps of them in a row stops training ('stop', with
 * nonFiniteStop set); an update applied with non-finite values poisons the weights ('stop', with poisoned set).
 */
function countNonFinite(run: RunState, r: OptimizerStepResult, loss: number): 'stop' | 'go' {
  const { cfg, report } = run;
  const nonFinite = r.skipped || r.nonFinite === true || !Number.isFinite(loss) || !Number.isFinite(r.gradNorm);
  if (nonFinite && !r.skipped) {
    run.poisoned = `step ${run.globalStep}: the loss (${loss}) or the gradients (norm ${r.gradNorm}) were non-finite and the update was applied, so the weights are no longer finite`;
    return 'stop';
  }
  if (!nonFinite) {
    run.nonFiniteRun = 0;
    run.lastGoodStep = run.globalStep;
    return 'go';
  }
  run.nonFiniteRun++;
  run.nonFiniteTotal++;
  const streak = `${run.nonFiniteRun} in a row, ${run.nonFiniteTotal} in all; the run stops after --max-nonfinite-steps ${cfg.max_nonfinite_steps} in a row`;
  const what = Number.isFinite(loss) ? 'gradients' : `loss (${loss})`;
  if (run.mixed === 'fp16')
    report.warn(`step ${run.globalStep}: fp16 overflow (non-finite ${what}), update skipped and the LR schedule held; loss scale now ${r.lossScale} (${streak})`);
  else report.warn(`step ${run.globalStep}: non-finite ${what}: update skipped (weights and AdamW state unchanged) and the LR schedule held (${streak})`);
  if (run.nonFiniteRun < cfg.max_nonfinite_steps) return 'go';
  run.nonFiniteStop = true;
  return 'stop';
}

/** Runs validation (val_loss and/or images) at `step` and reports it. */
async function validate(run: RunState, step: number): Promise<void> {
  const r = await run.validator.run(step, run.trainer);
  if (r.valLoss !== undefined) run.lastVal = { step, loss: r.valLoss };
  run.report.validation?.(r);
  const parts = [r.valLoss !== undefined ? `val_loss ${r.valLoss.toPrecision(5)}` : '', r.images.length ? `${r.images.length} images in ${path.dirname(r.images[0])}` : ''].filter(Boolean);
  run.report.info(`validation at step ${step}: ${parts.join(', ')} (${r.ms} ms)`, { step, val_loss: r.valLoss, images: r.images.length, grid: r.grid });
}

/** --monitor val_loss ranks checkpoints by the held-out loss at their own step: measure it before saving. */
async function measureMonitor(run: RunState): Promise<void> {
  if (run.cfg.monitor !== 'val_loss' || !run.valLossSet || run.lastVal?.step === run.globalStep) return;
  const v = await run.validator.valLoss(run.trainer);
  if (v !== undefined) run.lastVal = { step: run.globalStep, loss: v };
}

/**
 * A save due during the loop. At most one save in flight: waits for the previous one (its failure stops training
 * unless --on-save-error continue), then starts this one in the background.
 */
async function startBackgroundSave(run: RunState, reason: string): Promise<void> {
  await measureMonitor(run);
  const w = Date.now();
  await run.inflight;
  await syncRanksForSave(run);
  run.lastSaveAt = run.now();
  run.inflight = run.dist.isMain && spaceForSave(run) ? saveCheckpoint(run, reason) : undefined;
  run.inflight?.catch((e: unknown) => {
    run.saveError = e as Error; // surfaced at the next step
  });
  run.saveStallMs.push(Date.now() - w);
}

/**
 * Starts a checkpoint save. Everything it records is captured now (the native snapshot is queued on the torch
 * thread right behind the optimizer step), and the files are written in the background while training goes on.
 * Must not await before mgr.save() has queued the native snapshot: it captures the state of this step.
 * `at`: the state at the start of the step in progress (a data error mid-step saves the last completed step).
 */
async function saveCheckpoint(run: RunState, reason: string, at?: StepStartState): Promise<void> {
  const { cfg, mgr, world } = run;
  const valNow = run.lastVal?.step === run.globalStep ? run.lastVal.loss : null;
  // The best checkpoint by the monitored metric, counting this one (recorded in it and, once it is sealed, in best.json).
  const metric = cfg.monitor === 'val_loss' ? valNow : run.lastLoss;
  const best = run.best;
  const improves = metric !== null && Number.isFinite(metric) && (!best || best.name !== cfg.monitor || (cfg.monitor_mode === 'min' ? metric < best.value : metric > best.value));
  const bestNow = improves ? { name: cfg.monitor, value: metric, step: run.globalStep, mode: cfg.monitor_mode } : best;
  const t = Date.now();
  const step = run.globalStep;
  const snapshot = trainingSnapshot(run, { cursor: at?.cursor ?? run.loader.state(), samplesSeen: at?.samplesSeen ?? run.samplesSeen, rng: at?.rng }, valNow, bestNow);
  run.lastSaveAt = run.now();
  // JS-thread time of the save's background parts (the JSON files, the manifest, retention): training's next
  // micro-step waits for the JS thread, so this is stall too. The weight files are written and hashed natively.
  let busyMs = 0;
  try {
    const entry = await mgr.save(
      step,
      async (tmp) => {
        const saved = await saveTrainingState(run.trainer, tmp, snapshot, mgr.dir);
        busyMs += saved.jsMs;
        return saved.files;
      },
      { reason, expectedBytes: lastCheckpointSize(mgr), onBlocked: (ms) => (busyMs += ms) },
    );
    const c1 = Date.now();
    run.lastCheckpoint = entry.path;
    if (world > 1) removeRankParts(mgr.dir, step);
    if (improves && bestNow) {
      run.best = bestNow;
      mgr.writeBest({ step, metric: bestNow.name, value: bestNow.value, mode: bestNow.mode });
    }
    // Checkpoints of another run in the folder (only possible in folders from before run ids) are never counted or deleted.
    const otherRuns = checkpointRuns(mgr).filter((c) => c.runId !== undefined && c.runId !== run.runId).map((c) => c.step);
    const removed = mgr.prune(cfg.checkpoints_total_limit, { best: run.best?.step, final: reason === 'final' ? step : undefined, stage: run.stage, otherRuns });
    busyMs += Date.now() - c1;
    run.saveBusyMs.push(busyMs);
    run.report.info(`saved ${entry.path} (${reason}) in ${Date.now() - t} ms${removed.length ? `; removed ${removed.join(', ')}` : ''}`, {
      checkpoint: entry.path,
      saveMs: Date.now() - t,
      jsBusyMs: busyMs,
    });
  } catch (e) {
    if (world > 1) removeRankParts(mgr.dir, step);
    if (cfg.on_save_error === 'continue' && reason !== 'final' && reason !== 'signal') {
      run.report.error(`${(e as Error).message} (continuing: --on-save-error continue)`);
      return;
    }
    throw e;
  }
}

/** What a checkpoint of the run's current step records (checkpoint/state.ts writes it). */
function trainingSnapshot(run: RunState, at: StepStartState, valNow: number | null, bestNow: TrainerStateFile['best_metric']): TrainingSnapshot {
  const { cfg, world } = run;
  const state = at.cursor;
  return {
    config: cfg,
    schedule: { spec: run.spec, schedulerSteps: run.schedulerSteps },
    worldSize: world,
    cursor: state,
    rng: at.rng,
    trainerState: {
      version: TRAINER_STATE_VERSION,
      run_id: run.runId,
      global_step: run.globalStep,
      scheduler_steps: run.schedulerSteps,
      nonfinite_steps: run.nonFiniteTotal,
      last_good_step: run.lastGoodStep,
      epoch: state.epoch,
      position: state.position,
      world_size: world,
      samples_seen: at.samplesSeen,
      max_train_steps: run.maxSteps,
      train_loss: run.lastLoss,
      val_loss: valNow,
      stage: run.stage,
      best_metric: bestNow,
      base_model: { path: run.modelDir, fingerprint: run.modelFp },
      dataset: { path: path.resolve(cfg.train_data_dir), fingerprint: run.dataFp, size: run.dataset.items.length },
      config: cfg,
      device: run.device,
      mixed_precision: run.mixed,
      resumed_from: run.resumeFrom?.path ?? run.imported?.path ?? null,
      ...(run.imported ? { imported_from: { path: run.imported.path, format: 'diffusers' as const, step: run.imported.step } } : {}),
    },
  };
}

/**
 * Every rank at the same step before a save: ranks > 0 stage their RNG state (random_states_<rank>.json), then
 * all meet at a barrier (failing after --dist-timeout), so rank 0 seals the checkpoint only with every part in.
 */
async function syncRanksForSave(run: RunState): Promise<void> {
  if (run.world === 1) return;
  if (!run.dist.isMain) writeRankPart(run.mgr.dir, run.globalStep, run.dist.rank, randomStates(await native().trainerRngState(run.trainer), run.loader.state(), run.cfg.seed));
  await run.dist.barrier(`checkpoint-${run.globalStep}: waiting for every rank's random state`);
}

/**
 * The free-space pre-check of a background save, run synchronously before it starts and before the next step
 * trains, so a refused save stops the run at this step (no step trained after the last save is lost twice).
 * False: skipped by --on-save-error continue.
 */
function spaceForSave(run: RunState): boolean {
  try {
    run.mgr.checkFreeSpace(run.globalStep, lastCheckpointSize(run.mgr));
    return true;
  } catch (e) {
    if (run.world > 1) removeRankParts(run.mgr.dir, run.globalStep);
    if (run.cfg.on_save_error !== 'continue') throw e;
    run.report.error(`${(e as Error).message} (continuing without this checkpoint: --on-save-error continue)`);
    return false;
  }
}

/**
 * A training image failed to load mid-run (changed on disk since the start, an I/O error; damaged images are
 * refused when the dataset loads). Saves the last completed step (unless a checkpoint of it exists), then stops with
 * the error and what to do. With several processes the other ranks wait in a collective, so nothing is saved.
 */
async function dataError(run: RunState, e: Error, at: StepStartState): Promise<never> {
  const { globalStep } = run;
  run.report.finish?.();
  if (run.world > 1) throw e;
  await run.inflight?.catch(() => undefined);
  let saved = '';
  const ckpt = CheckpointManager.pathFor(run.mgr.dir, globalStep);
  if (globalStep > 0 && !fs.existsSync(ckpt)) {
    try {
      await saveCheckpoint(run, 'data-error', at);
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
}

// ---- finish: final save, export ----

/** After the loop: the final validation and checkpoint, the errors of a diverged run, the save timings, the final LoRA / UNet. */
async function finish(run: RunState): Promise<TrainResult> {
  const { cfg, report, stop } = run;
  if (run.poisoned) {
    report.finish?.();
    await run.inflight?.catch(() => undefined);
    throw new DivergedError(
      `${run.poisoned}: nothing is saved or exported from them. The last checkpoint (${run.lastCheckpoint ?? 'none yet'}) holds the last good state. ` +
        'Lower --learning-rate, then continue with --resume-from-checkpoint latest.',
      run.lastCheckpoint,
    );
  }
  const finished = run.globalStep >= run.maxSteps && !run.nonFiniteStop;
  if (finished && run.validator.enabled && !run.validator.done(run.globalStep) && !stop.signal) await validate(run, run.globalStep);
  report.finish?.();
  await run.inflight;
  if (run.dist.isMain) await measureMonitor(run);
  await syncRanksForSave(run);
  if (run.dist.isMain) await saveCheckpoint(run, run.nonFiniteStop ? 'nonfinite' : stop.signal ? 'signal' : finished ? 'final' : 'interval');
  if (run.nonFiniteStop) {
    const { globalStep, nonFiniteRun, lastCheckpoint } = run;
    const first = globalStep - nonFiniteRun + 1;
    throw new DivergedError(
      `stopped at step ${globalStep}: ${nonFiniteRun} optimizer steps in a row (steps ${first}-${globalStep}) had a non-finite loss or gradients (--max-nonfinite-steps ${cfg.max_nonfinite_steps}). ` +
        `None of them was applied, so the weights are those of step ${run.lastGoodStep}, the last good step${lastCheckpoint ? `; saved in ${lastCheckpoint}` : ''}. ` +
        `The run is diverging: lower --learning-rate (e.g. by half), keep --max-grad-norm 1${run.mixed === 'fp16' ? ', or train with --mixed-precision bf16 or no instead of fp16' : ''}, then continue with --resume-from-checkpoint latest.`,
      lastCheckpoint,
    );
  }
  const { saveStallMs, saveBusyMs } = run;
  if (saveStallMs.length)
    report.info(
      `checkpoint saves stalled training by ${Math.max(...saveStallMs)} ms at most to start (${saveStallMs.length} background saves), ` +
        `and held the JS thread for ${Math.max(0, ...saveBusyMs)} ms at most while they finished (JSON files, manifest, retention; weight files are written and hashed off it)`,
      { saveStallMs, saveBusyMs },
    );
  const loraFiles = finished && run.dist.isMain ? await exportFinal(run) : [];
  return { outputDir: run.outputDir, globalStep: run.globalStep, finished, signal: stop.signal, lastCheckpoint: run.lastCheckpoint, loraFiles, losses: run.losses };
}

/** The trained result of a finished run (rank 0): the LoRA in every --save-format, or the full run's UNet folder. */
async function exportFinal(run: RunState): Promise<string[]> {
  const { cfg, report, outputDir, modelDir } = run;
  const loraFiles: string[] = [];
  if (cfg.train_mode === 'lora') {
    // A LoRA file that train-lora did not write (a diffusers run's, in its own output folder) is never replaced.
    const foreign = await foreignLoraFiles(outputDir, cfg.save_format);
    const exportDir = foreign.length ? path.join(outputDir, 'exports', `checkpoint-${run.globalStep}`) : outputDir;
    if (foreign.length)
      report.warn(`${foreign.map((f) => path.join(outputDir, f)).join(', ')}: not written by train-lora (another trainer's LoRA), left as it is; this run's LoRA goes to ${exportDir}`);
    const r = await exportLora(
      {
        source: { trainer: run.trainer },
        outDir: exportDir,
        formats: cfg.save_format,
        merge: cfg.merge,
        baseModel: modelDir,
        variant: cfg.variant,
        config: cfg,
        steps: run.globalStep,
        epoch: run.loader.state().epoch,
        numTrainImages: run.dataset.items.length,
        numValidationImages: run.heldOut?.items.length ?? 0,
        captions: run.dataset.items.map((i) => i.captions[0] ?? ''),
        ...(run.dataPlan.table ? { bucketInfo: bucketInfo(run.dataPlan.table) } : {}),
        mixedPrecision: run.mixed,
        baseModelFingerprint: run.modelFp,
        trainingStartedAt: run.startedAt,
      },
      (m) => report.info(m),
    );
    loraFiles.push(...r.files);
  } else if (cfg.train_mode === 'full' && run.lastCheckpoint) {
    // Full training: the trained UNet as a diffusers component folder (OUT/unet), loadable with from_pretrained.
    const unetDir = writeUnetFolder(path.join(run.lastCheckpoint, MODEL_FILE), modelConfigFile(modelDir, 'unet'), outputDir);
    loraFiles.push(path.join(unetDir, 'diffusion_pytorch_model.safetensors'));
    report.info(`trained UNet: ${unetDir} (diffusers layout: UNet2DConditionModel.from_pretrained("${unetDir}"))`);
    if (cfg.merge) report.warn('--merge applies to LoRA training; the full run\'s UNet is in OUT/unet');
  }
  return loraFiles;
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
