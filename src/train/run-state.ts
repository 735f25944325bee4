/**
 * What a training run knows: the reporter it talks to and what it returns (the public types), the options tests
 * inject, and the run's state (RunSetup before prepare(), RunState from prepare() to finish()) that the parts of the
 * run — prepare.ts, train.ts (the loop and finish), save.ts — pass to each other.
 */
import type { CheckpointEntry, CheckpointManager } from '../checkpoint/manager';
import type { TrainerStateFile } from '../checkpoint/state';
import type { TrainConfig } from '../config';
import type { DataPlan } from '../data/plan';
import type { Dataset } from '../data/dataset';
import type { SampleOrderState } from '../data/sampler';
import type { PrecisionPlan } from '../device';
import type { DistContext } from '../distributed/context';
import type { distEnvFromProcess } from '../distributed/env';
import type { PipelineHandle, TrainBatch, TrainerHandle } from '../native';
import type { LrScheduleSpec } from '../schedules/lr';
import type { CLIPTokenizer } from '../tokenizer';
import type { DiffusersCheckpoint } from './resume';
import type { MicroBatchSource } from './sources';
import type { Validator, ValidationResult } from './validation';
import type { ValidationLoss } from './validation-loss';

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

export interface Stop {
  signal?: NodeJS.Signals;
}

/** What a checkpoint of the last completed step needs once the next step has begun (its micro-batches moved these on). */
export interface StepStartState {
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
export function rankReporter(report: TrainReporter, rank: number): TrainReporter {
  return {
    info: () => undefined,
    warn: (m, d) => report.warn(`[rank ${rank}] ${m}`, d),
    error: (m, d) => report.error(`[rank ${rank}] ${m}`, d),
    step: () => undefined,
  };
}

/** What train() releases when it returns or throws, however far preparing got. */
export interface Resources {
  dist: DistContext;
  loader?: MicroBatchSource;
  /** The held-out images' native latents (val_loss). */
  valLoss?: ValidationLoss;
  pipe?: PipelineHandle;
  trainer?: TrainerHandle;
}

/** What train() knows before preparing the run: the folder, the lock, the stop flag, this process's place. */
export interface RunSetup {
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
export interface RunState extends Omit<RunSetup, 'distEnv' | 'isMain'> {
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

