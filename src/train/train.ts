/**
 * The training loop of diffusers' train_text_to_image_lora.py (+ accelerate's accumulation, clipping and LR
 * stepping), with checkpoints that resume exactly. TypeScript decides everything (data order, accumulation, LR,
 * when to save); the native Trainer runs the step and holds the tensors.
 *
 * Accumulation follows accelerate: micro-batches of an epoch are grouped in cycles of
 * `gradient_accumulation_steps`; the last cycle of an epoch may be shorter (the dataloader's end forces a sync);
 * every micro-loss is divided by gradient_accumulation_steps. The LR used by an optimizer step is the schedule's
 * value after the number of optimizer steps that were not skipped (an fp16 overflow skips the step and the schedule).
 * Checkpoints are written only between optimizer steps, so a resume never lands inside an accumulation cycle.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { type CheckpointEntry, CheckpointError, CheckpointManager, RunLock, verifyCheckpoint } from '../checkpoint/manager';
import { dirSize, fsyncPath, renameDirReplacing, writeJsonDurable } from '../checkpoint/fsutil';
import { loraAlpha, type TrainConfig } from '../config';
import { exportLora } from '../export/lora-export';
import { datasetFingerprint, describeDataset, loadDataset, type Dataset } from '../data/dataset';
import { collectRankParts, initDistributed, pickBackend, removeRankParts, singleProcess, writeRankPart, type DistContext } from '../distributed/context';
import { distEnvFromProcess } from '../distributed/env';
import type { LoaderOptions } from '../data/loader';
import type { SampleOrderState } from '../data/sampler';
import { checkModelFolder } from '../models/model-folder';
import { modelFingerprint } from '../models/fingerprint';
import { native, type PipelineHandle, type TrainBatch, type TrainerStateJson } from '../native';
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
  global_step: number;
  /** Optimizer steps that advanced the LR schedule (not skipped by fp16 overflow). */
  scheduler_steps: number;
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

/** Finds the checkpoint a `--resume-from-checkpoint` value names. */
export async function resolveResume(value: string, mgr: CheckpointManager, strict: boolean, warn: (m: string) => void): Promise<CheckpointEntry | undefined> {
  const report = (e: CheckpointEntry) => {
    const msg = `skipping ${e.path}: ${e.problem}`;
    if (strict) throw new CheckpointError(`${msg} (--strict-resume)`, 'EBADCKPT');
    warn(msg);
  };
  if (value === 'latest') return mgr.latest(report);
  const p = path.resolve(value);
  if (!fs.existsSync(p)) throw new CheckpointError(`--resume-from-checkpoint ${value}: no such checkpoint or run folder`, 'ENOENT');
  if (fs.existsSync(path.join(p, 'checkpoints'))) {
    // Another run's output folder: its latest valid checkpoint.
    const e = await new CheckpointManager(p).latest(report);
    if (!e) throw new CheckpointError(`--resume-from-checkpoint ${value}: that run has no valid checkpoint`, 'ENOENT');
    return e;
  }
  const e = await verifyCheckpoint(p);
  if (!e.valid) throw new CheckpointError(`--resume-from-checkpoint ${value}: ${e.problem}`, 'EBADCKPT');
  return e;
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
  return problems;
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
  fs.mkdirSync(outputDir, { recursive: true });
  // Data parallel (torchrun's environment, or train-lora --num-processes): rank 0 owns the run folder.
  const distEnv = distEnvFromProcess();
  const isMain = !distEnv || distEnv.worldSize === 1 || distEnv.rank === 0;
  if (!isMain) report = rankReporter(report, distEnv!.rank);
  let dist: DistContext = singleProcess();
  const lock = new RunLock(outputDir);
  if (isMain) lock.acquire();
  const mgr = new CheckpointManager(outputDir, { faultHook: opts.faultHook });
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
  const startedAt = Date.now();
  try {
    if (isMain) for (const n of mgr.cleanStale()) report.info(`removed an incomplete checkpoint folder left by a crash: ${n}`);

    // ---- model, data, schedule ----
    if (cfg.cache_latents && (cfg.random_flip || !cfg.center_crop))
      throw new Error('--cache-latents encodes each image once, so it needs --center-crop and no --random-flip');
    checkModelFolder(cfg.pretrained_model_name_or_path, ['unet', 'vae', 'text_encoder']);
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
    const tokenizer = CLIPTokenizer.fromFolder(path.join(modelDir, 'tokenizer'));
    const noise = NoiseSchedule.fromFile(path.join(modelDir, 'scheduler', 'scheduler_config.json'), cfg.prediction_type ? { predictionType: cfg.prediction_type } : {});
    if (noise.predictionType === 'sample') throw new Error('prediction_type "sample" is not supported for training; use epsilon or v_prediction');
    const fullDataset: Dataset = await loadDataset(cfg.train_data_dir, {
      captionColumn: cfg.caption_column,
      imageColumn: cfg.image_column,
      skipBadImages: cfg.skip_bad_images,
      skipUncaptioned: cfg.skip_uncaptioned,
      layout: cfg.dataset_layout,
      maxTrainSamples: cfg.max_train_samples,
      seed: cfg.seed,
    });
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
      heldOut = await loadDataset(cfg.validation_data_dir, { captionColumn: cfg.caption_column, imageColumn: cfg.image_column, skipBadImages: cfg.skip_bad_images, skipUncaptioned: cfg.skip_uncaptioned, seed: cfg.seed });
      report.info(`--validation-data-dir: ${heldOut.items.length} held-out images for val_loss`);
    }
    const stage = cfg.stage ?? `${cfg.train_mode}-${dataFp.slice(0, 12)}`;

    // ---- resume ----
    let resumeFrom: CheckpointEntry | undefined;
    let prev: TrainerStateFile | undefined;
    if (cfg.resume_from_checkpoint) {
      resumeFrom = await resolveResume(cfg.resume_from_checkpoint, mgr, cfg.strict_resume, (m) => report.warn(m));
      if (!resumeFrom) report.warn(`--resume-from-checkpoint ${cfg.resume_from_checkpoint}: no valid checkpoint in ${mgr.dir}; starting a new run`);
      else {
        prev = readJson<TrainerStateFile>(path.join(resumeFrom.path, 'trainer_state.json'));
        const problems = compatibilityProblems(prev, cfg, modelFp, dataFp);
        if (problems.length)
          throw new CheckpointError(`cannot resume from ${resumeFrom.path}:\n  - ${problems.join('\n  - ')}\nStart a new run with another --output-dir, or fix the options.`, 'EINCOMPATIBLE');
      }
    }

    // ---- native pipeline + trainer ----
    const weightDtype = precision.weightDtype;
    const t0 = Date.now();
    pipe = await native().loadPipeline(modelDir, { device, dtype: weightDtype, variant: cfg.variant });
    report.info(`loaded ${modelDir} on ${device} (${weightDtype}) in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
    const { trainer, trainableParams, totalParams } = await native().createTrainer(pipe, {
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
    await dist.attach(trainer);
    report.info(`trainable parameters: ${trainableParams.toLocaleString('en-US')} of ${totalParams.toLocaleString('en-US')} (${((100 * trainableParams) / totalParams).toFixed(3)} %)`);

    if (cfg.init_lora_weights && !resumeFrom) {
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
    if (resumeFrom && prev) {
      const dir = resumeFrom.path;
      // This rank's RNG streams (every rank draws the same global-batch tensors, so rank 0's serve a new rank).
      const ownRng = path.join(dir, `random_states_${dist.rank}.json`);
      const rng = readJson<{ torch: Record<string, string>; data: { sampler: SampleOrderState } }>(fs.existsSync(ownRng) ? ownRng : path.join(dir, 'random_states_0.json'));
      const scaler = readJson<TrainerStateJson['scaler']>(path.join(dir, 'scaler.json'));
      const optim = readJson<{ per_parameter_steps: Record<string, number> }>(path.join(dir, 'optimizer.json'));
      for (const note of crossDeviceNotes(prev, rng.torch, device, await native().trainerRngState(trainer))) report.warn(note);
      const sched = readJson<{ spec: unknown; scheduler_steps: number }>(path.join(dir, 'scheduler.json'));
      await native().trainerLoadState(trainer, dir, {
        optimizerSteps: cfg.reset_optimizer ? undefined : optim.per_parameter_steps,
        scaler,
        rng: rng.torch,
      });
      globalStep = prev.global_step;
      samplesSeen = prev.samples_seen;
      const sameData = prev.dataset.fingerprint === dataFp;
      cursor = sameData ? rng.data.sampler : undefined;
      if (!sameData) report.warn('the dataset changed: starting its order from the beginning of a new epoch');
      const prevWorld = prev.world_size ?? 1;
      if (prevWorld !== world)
        report.warn(
          `resuming a checkpoint made by ${prevWorld} process(es) with ${world}: the data cursor is global, so the same sample order continues at epoch ${prev.epoch}, sample ${prev.position}; ` +
            `the global batch is now ${batchSize * accum * world} (was ${prev.config.train_batch_size * prev.config.gradient_accumulation_steps * prevWorld}) and the LR schedule is rebuilt for ${world} process(es)`,
        );
      const changedArgs = prev.config.learning_rate !== cfg.learning_rate || prev.max_train_steps !== maxSteps || prev.config.lr_scheduler !== cfg.lr_scheduler;
      const newSchedule = cfg.reset_optimizer || changedArgs || prevWorld !== world;
      if (cfg.reset_optimizer) {
        report.warn(`--reset-optimizer: keeping the weights of step ${globalStep}, fresh AdamW moments and a fresh LR schedule`);
        schedulerSteps = 0;
      } else {
        schedulerSteps = sched.scheduler_steps;
        if (!newSchedule) spec = lrScheduleFromJSON(sched.spec).spec;
        else if (changedArgs) report.warn(`the LR schedule changed on resume (learning rate ${prev.config.learning_rate} -> ${cfg.learning_rate}, max steps ${prev.max_train_steps} -> ${maxSteps}): continuing at scheduler step ${schedulerSteps} of the new schedule`);
      }
      report.info(`resumed from ${dir} at step ${globalStep} (epoch ${prev.epoch}, sample ${prev.position})`);
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
    const saveCheckpoint = async (reason: string): Promise<void> => {
      const valNow = lastVal?.step === globalStep ? lastVal.loss : null;
      // The best checkpoint by the monitored metric, counting this one (recorded in it and, once it is sealed, in best.json).
      const metric = cfg.monitor === 'val_loss' ? valNow : lastLoss;
      const improves =
        metric !== null && Number.isFinite(metric) && (!best || best.name !== cfg.monitor || (cfg.monitor_mode === 'min' ? metric < best.value : metric > best.value));
      const bestNow = improves ? { name: cfg.monitor, value: metric, step: globalStep, mode: cfg.monitor_mode } : best;
      const t = Date.now();
      const state = loader!.state();
      const step = globalStep;
      const schedSteps = schedulerSteps;
      const seen = samplesSeen;
      const loss = lastLoss;
      try {
        const entry = await mgr.save(
          step,
          async (tmp) => {
            const st = await native().trainerSaveState(trainer, tmp, { format: 'pt', step: String(step) });
            writeJsonDurable(path.join(tmp, 'optimizer.json'), {
              kind: 'AdamW',
              betas: [cfg.adam_beta1, cfg.adam_beta2],
              eps: cfg.adam_epsilon,
              weight_decay: cfg.adam_weight_decay,
              per_parameter_steps: st.optimizerSteps,
            });
            writeJsonDurable(path.join(tmp, 'scheduler.json'), { spec, scheduler_steps: schedSteps, num_processes: world, next_lr: lrForOptimizerStep(spec, schedSteps, world) });
            writeJsonDurable(path.join(tmp, 'scaler.json'), st.scaler);
            writeJsonDurable(path.join(tmp, 'random_states_0.json'), { torch: st.rng, data: { sampler: state, seed: cfg.seed } });
            if (world > 1) collectRankParts(mgr.dir, step, world, tmp);
            const ts: TrainerStateFile = {
              version: TRAINER_STATE_VERSION,
              global_step: step,
              scheduler_steps: schedSteps,
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
              resumed_from: resumeFrom?.path ?? null,
              versions: { train_lora: packageVersion(), torch: native().version().torch, node: process.version },
              time: new Date().toISOString(),
              host: os.hostname(),
            };
            writeJsonDurable(path.join(tmp, 'trainer_state.json'), ts);
          },
          { reason, expectedBytes: lastCheckpointSize(mgr) },
        );
        lastCheckpoint = entry.path;
        if (world > 1) removeRankParts(mgr.dir, step);
        if (improves && bestNow) {
          best = bestNow;
          mgr.writeBest({ step, metric: bestNow.name, value: bestNow.value, mode: bestNow.mode });
        }
        const removed = mgr.prune(cfg.checkpoints_total_limit, { best: best?.step, final: reason === 'final' ? step : undefined, stage });
        report.info(`saved ${entry.path} (${reason}) in ${Date.now() - t} ms${removed.length ? `; removed ${removed.join(', ')}` : ''}`, {
          checkpoint: entry.path,
          saveMs: Date.now() - t,
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
    report.start?.(maxSteps, globalStep);
    let stepStart = Date.now();
    while (globalStep < maxSteps && !stop.signal) {
      if (saveError) throw saveError;
      // One optimizer step: a full accumulation cycle, or what is left of the epoch.
      let micro = 0;
      let lossSum = 0;
      let epoch = 0;
      let endOfEpoch = false;
      do {
        const batch = await loader.next();
        const ids = tokenizer.encodeBatch(batch.captions, { maxLength: tokenizer.modelMaxLength, padding: 'max_length' });
        const b = batch.indices.length;
        const inputIds = fromInt64('input_ids', [b, ids[0].length], ids.flat());
        let tb: TrainBatch = { ...batch.images, inputIds };
        if (opts.batchHook) tb = opts.batchHook(globalStep + 1, tb);
        const loss = await native().trainerMicroStep(trainer, tb, accum);
        if (!Number.isFinite(loss)) report.warn(`non-finite loss ${loss} at step ${globalStep + 1}`);
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
      if (world > 1) {
        // The global mean loss, and a stop request that every rank honours at this same step.
        const own = stop.signal as NodeJS.Signals | undefined;
        const [sum, sigint, sigterm] = await dist.allReduce([loss, own === 'SIGINT' ? 1 : 0, own === 'SIGTERM' ? 1 : 0]);
        loss = sum / world;
        if (sigterm > 0) stop.signal = 'SIGTERM';
        else if (sigint > 0) stop.signal = 'SIGINT';
      }
      lastLoss = loss;
      losses.push(loss);
      const now = Date.now();
      report.step({ step: globalStep, epoch, loss, lr, gradNorm: r.gradNorm, skipped: r.skipped, lossScale: r.lossScale, stepTime: (now - stepStart) / 1000, samplesSeen });
      if (r.skipped) report.warn(`step ${globalStep}: fp16 overflow (non-finite gradients), update skipped and the LR schedule held; loss scale now ${r.lossScale}`);
      stepStart = now;
      const due =
        globalStep % cfg.checkpointing_steps === 0 || (cfg.checkpoint_every_epoch && endOfEpoch);
      if (stop.signal) break;
      if (validator.due(globalStep, epoch, endOfEpoch)) await validate(globalStep);
      if (due && globalStep < maxSteps) {
        // At most one save in flight: wait for the previous one (its failure stops training unless
        // --on-save-error continue), then start this one in the background.
        await measureMonitor();
        const w = Date.now();
        await inflight;
        await syncRanksForSave();
        inflight = dist.isMain ? saveCheckpoint(endOfEpoch && cfg.checkpoint_every_epoch ? 'epoch-end' : 'interval') : undefined;
        inflight?.catch((e: unknown) => {
          saveError = e as Error; // surfaced at the next step
        });
        saveStallMs.push(Date.now() - w);
      }
    }
    const finished = globalStep >= maxSteps;
    if (finished && validator.enabled && !validator.done(globalStep) && !stop.signal) await validate(globalStep);
    report.finish?.();
    await inflight;
    if (dist.isMain) await measureMonitor();
    await syncRanksForSave();
    if (dist.isMain) await saveCheckpoint(stop.signal ? 'signal' : finished ? 'final' : 'interval');
    if (saveStallMs.length)
      report.info(`checkpoint saves stalled training by ${Math.max(...saveStallMs)} ms at most (${saveStallMs.length} background saves)`, { saveStallMs });
    const loraFiles: string[] = [];
    if (finished && cfg.train_mode === 'lora' && dist.isMain) {
      const r = await exportLora(
        {
          source: { trainer },
          outDir: outputDir,
          formats: cfg.save_format,
          merge: cfg.merge,
          baseModel: modelDir,
          variant: cfg.variant,
          config: cfg,
          steps: globalStep,
          epoch: loader.state().epoch,
          numTrainImages: dataset.items.length,
          mixedPrecision: mixed,
          baseModelFingerprint: modelFp,
          trainingStartedAt: startedAt,
        },
        (m) => report.info(m),
      );
      loraFiles.push(...r.files);
    } else if (finished && cfg.train_mode === 'full' && dist.isMain && lastCheckpoint) {
      // Full training: the trained UNet as a diffusers component folder (OUT/unet), loadable with from_pretrained.
      const unetDir = writeUnetFolder(path.join(lastCheckpoint, 'model.safetensors'), path.join(modelDir, 'unet', 'config.json'), outputDir);
      loraFiles.push(path.join(unetDir, 'diffusion_pytorch_model.safetensors'));
      report.info(`trained UNet: ${unetDir} (diffusers layout: UNet2DConditionModel.from_pretrained("${unetDir}"))`);
      if (cfg.merge) report.warn('--merge applies to LoRA training; the full run\'s UNet is in OUT/unet');
    }
    return { outputDir, globalStep, finished, signal: stop.signal, lastCheckpoint, loraFiles, losses };
  } finally {
    await loader?.close();
    await dist.destroy().catch(() => undefined);
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
