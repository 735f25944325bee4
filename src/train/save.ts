/**
 * Checkpoint saves of a run: what a checkpoint of this step records (captured before anything awaits), the ranks'
 * agreement before a save, the free-space check, and the save of the last completed step when the data fails.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import { CheckpointManager } from '../checkpoint/manager';
import { dirSize } from '../checkpoint/fsutil';
import {
  randomStates,
  removeRankParts,
  saveTrainingState,
  TRAINER_STATE_VERSION,
  type TrainerStateFile,
  type TrainingSnapshot,
  writeRankPart,
} from '../checkpoint/state';
import { native } from '../native';
import { checkpointRuns } from './resume';
import type { RunState, StepStartState } from './run-state';

/**
 * Starts a checkpoint save. Everything it records is captured now (the native snapshot is queued on the torch
 * thread right behind the optimizer step), and the files are written in the background while training goes on.
 * Must not await before mgr.save() has queued the native snapshot: it captures the state of this step.
 * `at`: the state at the start of the step in progress (a data error mid-step saves the last completed step).
 */
export async function saveCheckpoint(run: RunState, reason: string, at?: StepStartState): Promise<void> {
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
export async function syncRanksForSave(run: RunState): Promise<void> {
  if (run.world === 1) return;
  if (!run.dist.isMain) writeRankPart(run.mgr.dir, run.globalStep, run.dist.rank, randomStates(await native().trainerRngState(run.trainer), run.loader.state(), run.cfg.seed));
  await run.dist.barrier(`checkpoint-${run.globalStep}: waiting for every rank's random state`);
}

/**
 * The free-space pre-check of a background save, run synchronously before it starts and before the next step
 * trains, so a refused save stops the run at this step (no step trained after the last save is lost twice).
 * False: skipped by --on-save-error continue.
 */
export function spaceForSave(run: RunState): boolean {
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
export async function dataError(run: RunState, e: Error, at: StepStartState): Promise<never> {
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

function lastCheckpointSize(mgr: CheckpointManager): number | undefined {
  if (!fs.existsSync(mgr.dir)) return undefined;
  const steps = fs.readdirSync(mgr.dir).map((n) => /^checkpoint-(\d+)$/.exec(n)?.[1]).filter((x): x is string => x !== undefined).map(Number);
  return steps.length ? dirSize(CheckpointManager.pathFor(mgr.dir, Math.max(...steps))) : undefined;
}
