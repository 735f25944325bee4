/**
 * Everything before the first step of a run: the folder, the device, the data, the resume source, the trainer, the
 * data order, validation.
 */
import { randomUUID } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';

import { type CheckpointEntry, CheckpointError } from '../checkpoint/manager';
import { dirSize, formatBytes } from '../checkpoint/fsutil';
import { convAlpha, datasetOptions, loraAlpha, loraTargetModules, textEncoderTargets, type TrainConfig } from '../config';
import { loadTrainingState, readTrainerState, type TrainerStateFile } from '../checkpoint/state';
import { cleanStaleExports } from '../export/lora-export';
import { datasetFingerprint, describeDataset, loadDataset, type Dataset } from '../data/dataset';
import { initDistributed, pickBackend, type DistContext } from '../distributed/context';
import type { LoaderOptions } from '../data/loader';
import type { SampleOrderState } from '../data/sampler';
import { checkModel, modelSchedulerConfig, modelTokenizerDir } from '../model-folders/model-folder';
import { modelFingerprint } from '../model-folders/fingerprint';
import { applyThreadPolicy, native, type TrainerHandle } from '../native';
import { CLIPTokenizer } from '../tokenizer';
import { lrForOptimizerStep, lrScheduleFromJSON, trainingLrSchedule, type LrScheduleSpec } from '../schedules/lr';
import { NoiseSchedule } from '../schedules/noise';
import { planPrecision, resolveDevice, type PrecisionPlan } from '../device';
import { buildLatentCache, CachedLatentSource, ImageSource, type MicroBatchSource } from './sources';
import { batchesPerEpochOnRank, type DataPlan, loaderExtras, planData } from '../data/plan';
import { BucketOrder } from '../data/buckets';
import { Validator } from './validation';
import { makeImageRenderer } from './validation-images';
import { splitDataset } from '../data/split';
import { ValidationLoss } from './validation-loss';
import {
  checkpointRuns,
  crossDeviceNotes,
  compatibilityProblems,
  describeWork,
  type DiffusersCheckpoint,
  EARLIER_RUN_COMPANIONS,
  earlierRunWork,
  importProblems,
  moveAside,
  resolveResume,
  resumeChanges,
  sameSchedule,
} from './resume';
import type { RunSetup, RunState, TrainReporter } from './run-state';

/** Memory for decoded training images when the augmentation is deterministic (see LoaderOptions.imageCacheMb). */
const IMAGE_CACHE_MB = 1024;

/** Everything before the first step: the folder, the device, the data, the resume source, the trainer, the data order, validation. */
export async function prepare(s: RunSetup): Promise<RunState> {
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
  return run;
}

/** The LR schedule as diffusers' script builds it: warmup and length in optimizer steps, epochs from the data. */
function lrScheduleFor(cfg: TrainConfig, dataPlan: DataPlan, items: number, world: number): LrScheduleSpec {
  const batchSize = cfg.train_batch_size;
  const accum = cfg.gradient_accumulation_steps;
  const maxSteps = cfg.max_train_steps;
  const onRank = batchesPerEpochOnRank(dataPlan, items, batchSize, world);
  const batchesPerEpoch = dataPlan.table ? onRank * world : Math.ceil(items / batchSize);
  const updatesPerEpoch = Math.ceil(onRank / accum);
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
export async function createTrainer({ cfg, report, res }: RunSetup, modelDir: string, device: string, precision: PrecisionPlan, noise: NoiseSchedule): Promise<TrainerHandle> {
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
export const CUDA_GRAPH_REPORT_STEP = 4;

/** --cuda-graphs: one line on whether the micro-steps run from CUDA graphs, and why not (eager then). */
export async function reportCudaGraphs(report: { info(m: string): void; warn(m: string): void }, trainer: TrainerHandle): Promise<void> {
  const s = await native().trainerGraphStatus(trainer);
  if (s.graphs > 0 || (s.active && !s.reason)) report.info(`--cuda-graphs: ${s.graphs} shape(s) captured, ${s.replays} micro-steps replayed, ${s.eager} eager${s.reason ? `; ${s.reason}` : ''}`);
  else report.warn(`--cuda-graphs: not used: ${s.reason}`);
}

/** Where training starts: step 0, a checkpoint's state (loaded into the trainer), or a diffusers checkpoint's LoRA and step. */
export interface Progress {
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

