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
import * as fs from 'node:fs';
import * as path from 'node:path';

import { CheckpointManager, RunLock } from '../checkpoint/manager';
import { fsyncPath, renameDirReplacing } from '../checkpoint/fsutil';
import type { TrainConfig } from '../config';
import { MODEL_FILE } from '../checkpoint/state';
import { exportLora } from '../export/lora-export';
import { singleProcess } from '../distributed/context';
import { distEnvFromProcess } from '../distributed/env';
import { modelConfigFile } from '../model-folders/model-folder';
import { native, type OptimizerStepResult, type TrainBatch } from '../native';
import { fromInt64 } from '../tensors';
import { lrForOptimizerStep, lrLambda, type LrScheduleSpec } from '../schedules/lr';
import { bucketInfo } from '../data/buckets';
import { checkOutputDir, foreignLoraFiles, nextRunDir } from './resume';
import {
  DivergedError,
  rankReporter,
  type Resources,
  type RunState,
  type StepStartState,
  type Stop,
  type TrainOptions,
  type TrainReporter,
  type TrainResult,
} from './run-state';
import { CUDA_GRAPH_REPORT_STEP, prepare, reportCudaGraphs } from './prepare';
import { dataError, saveCheckpoint, spaceForSave, syncRanksForSave } from './save';

// The public types of a run, and the checkpoint's state files (src/checkpoint/state.ts), stay importable from here.
export { DivergedError, type StepMetrics, type TrainOptions, type TrainReporter, type TrainResult } from './run-state';
export { crossDeviceNotes } from './resume';
export { assertFiniteWeights, TRAINER_STATE_VERSION, type TrainerStateFile } from '../checkpoint/state';

/** One training run, start to end (or to a stop request): prepare, the loop, finish; its native objects released. */
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
    if (cfg.validation_before_training && run.validator.enabled && run.globalStep < run.maxSteps) await validate(run, run.globalStep);
    run.lastSaveAt = now();
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
