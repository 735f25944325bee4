/**
 * Learning-rate schedules, formula for formula the same as diffusers' `get_scheduler`
 * (diffusers/optimization.py) wrapped in torch's `LambdaLR`.
 *
 * Step semantics: `lrAt(spec, s)` is `get_last_lr()[0]` after `s` calls of `scheduler.step()`,
 * i.e. `base_lr * lr_lambda(s)` (LambdaLR's `last_epoch == s`). The optimizer step that runs
 * after `s` scheduler steps uses exactly this lr, so with warmup the very first optimizer step
 * runs with lr 0 — as in diffusers.
 *
 * Multi-process (accelerate): the prepared scheduler is stepped `num_processes` times per
 * optimizer step (accelerate's AcceleratedScheduler with split_batches=False), and the training
 * script therefore passes `lr_warmup_steps * num_processes` and `max_train_steps * num_processes`
 * to get_scheduler. See `trainingLrSchedule` below; `lrForOptimizerStep` maps optimizer steps onto
 * scheduler steps. Gradient-accumulation micro-steps do not move the schedule, and neither does an
 * optimizer step that the fp16 GradScaler skipped (inf/NaN grads): accelerate returns early when
 * `optimizer.step_was_skipped`, so the scheduler-step count can lag behind global_step.
 */

export const LR_SCHEDULE_KINDS = [
  'constant',
  'constant_with_warmup',
  'linear',
  'cosine',
  'cosine_with_restarts',
  'polynomial',
  'piecewise_constant',
] as const;
export type LrScheduleKind = (typeof LR_SCHEDULE_KINDS)[number];

/**
 * Serializable, fully resolved description of a schedule (store it in checkpoints).
 * `warmupSteps` / `totalSteps` are in scheduler steps (already multiplied by num_processes).
 */
export interface LrScheduleSpec {
  kind: LrScheduleKind;
  /** The optimizer's lr (`optimizer.defaults["lr"]`, after --scale-lr). */
  baseLr: number;
  warmupSteps: number;
  totalSteps: number;
  /**
   * cosine_with_restarts: number of hard restarts (get_scheduler default 1).
   * cosine: always 0.5 — get_scheduler does not forward num_cycles to the cosine schedule.
   */
  numCycles: number;
  /** polynomial only (default 1.0). */
  power: number;
  /** polynomial only: get_scheduler cannot change it, so it is always 1e-7 there. */
  lrEnd: number;
  /** piecewise_constant only, diffusers' syntax "1:10,0.1:20,0.01" (thresholds are absolute steps). */
  stepRules: string | null;
}

export interface LrScheduleOptions {
  kind: LrScheduleKind;
  baseLr: number;
  warmupSteps?: number;
  totalSteps?: number;
  numCycles?: number;
  power?: number;
  lrEnd?: number;
  stepRules?: string | null;
}

export function isLrScheduleKind(s: string): s is LrScheduleKind {
  return (LR_SCHEDULE_KINDS as readonly string[]).includes(s);
}

function checkStepCount(name: string, v: number): void {
  if (!Number.isSafeInteger(v) || v < 0) throw new RangeError(`${name} must be a non-negative integer, got ${v}`);
}

/** Fills in diffusers' defaults and validates; throws where diffusers would throw (now or later). */
export function resolveLrSchedule(o: LrScheduleOptions): LrScheduleSpec {
  if (!isLrScheduleKind(o.kind)) {
    throw new RangeError(`unknown lr scheduler '${String(o.kind)}' (one of ${LR_SCHEDULE_KINDS.join(', ')})`);
  }
  if (!Number.isFinite(o.baseLr) || o.baseLr < 0) throw new RangeError(`learning rate must be finite and >= 0, got ${o.baseLr}`);
  const needsWarmup = o.kind !== 'constant' && o.kind !== 'piecewise_constant';
  const needsTotal = needsWarmup && o.kind !== 'constant_with_warmup';
  if (needsWarmup && o.warmupSteps === undefined) throw new RangeError(`${o.kind} requires warmupSteps`);
  if (needsTotal && o.totalSteps === undefined) throw new RangeError(`${o.kind} requires totalSteps`);
  const warmupSteps = o.warmupSteps ?? 0;
  const totalSteps = o.totalSteps ?? 0;
  checkStepCount('warmupSteps', warmupSteps);
  checkStepCount('totalSteps', totalSteps);
  const spec: LrScheduleSpec = {
    kind: o.kind,
    baseLr: o.baseLr,
    warmupSteps,
    totalSteps,
    numCycles: o.kind === 'cosine' ? 0.5 : (o.numCycles ?? 1),
    power: o.power ?? 1.0,
    lrEnd: o.lrEnd ?? 1e-7,
    stepRules: o.kind === 'piecewise_constant' ? (o.stepRules ?? null) : null,
  };
  if (!Number.isFinite(spec.numCycles)) throw new RangeError(`numCycles must be finite, got ${spec.numCycles}`);
  if (!Number.isFinite(spec.power)) throw new RangeError(`power must be finite, got ${spec.power}`);
  if (spec.kind === 'polynomial') {
    if (!(spec.baseLr > spec.lrEnd)) {
      throw new RangeError(`lr_end (${spec.lrEnd}) must be smaller than initial lr (${spec.baseLr})`);
    }
    // diffusers divides by (total - warmup) at step == total: ZeroDivisionError there. Refuse up front.
    if (spec.totalSteps === spec.warmupSteps) {
      throw new RangeError('polynomial schedule needs totalSteps != warmupSteps (diffusers divides by zero at step == total)');
    }
  }
  if (spec.kind === 'piecewise_constant') {
    if (spec.stepRules === null) throw new RangeError('piecewise_constant requires stepRules, e.g. "1:10,0.1:20,0.01"');
    parseStepRules(spec.stepRules);
  }
  return spec;
}

interface StepRules {
  thresholds: number[]; // ascending
  multiples: number[];
  last: number;
}

const stepRulesCache = new Map<string, StepRules>();

/** diffusers' get_piecewise_constant_schedule: "m1:s1,m2:s2,...,mLast"; lr multiple m_i while step < s_i. */
function parseStepRules(rules: string): StepRules {
  const hit = stepRulesCache.get(rules);
  if (hit) return hit;
  const parts = rules.split(',');
  const dict = new Map<number, number>();
  for (const rule of parts.slice(0, -1)) {
    const kv = rule.split(':');
    if (kv.length !== 2) throw new RangeError(`bad step rule '${rule}' in '${rules}'`);
    const value = Number(kv[0]);
    const steps = Number(kv[1]);
    if (!Number.isFinite(value) || kv[0].trim() === '') throw new RangeError(`bad lr multiple in '${rule}'`);
    if (!Number.isInteger(steps) || kv[1].trim() === '') throw new RangeError(`bad step count in '${rule}'`);
    dict.set(steps, value); // a repeated threshold keeps the later value, like the Python dict
  }
  const last = Number(parts[parts.length - 1]);
  if (!Number.isFinite(last) || parts[parts.length - 1].trim() === '') throw new RangeError(`bad final lr multiple in '${rules}'`);
  const thresholds = [...dict.keys()].sort((a, b) => a - b);
  const parsed = { thresholds, multiples: thresholds.map((t) => dict.get(t) as number), last };
  stepRulesCache.set(rules, parsed);
  return parsed;
}

/** Python's float `%` (result has the sign of the divisor). */
function pyMod(a: number, b: number): number {
  const r = a % b;
  return r !== 0 && r < 0 !== b < 0 ? r + b : r;
}

/** The LambdaLR multiplier `lr_lambda(step)`; same operation order as diffusers for bitwise-equal doubles. */
export function lrLambda(spec: LrScheduleSpec, step: number): number {
  const s = step;
  const w = spec.warmupSteps;
  const t = spec.totalSteps;
  switch (spec.kind) {
    case 'constant':
      return 1;
    case 'constant_with_warmup':
      return s < w ? s / Math.max(1.0, w) : 1.0;
    case 'linear': {
      // f_min = 0, f_max = 1: f_max * s / w and f_min + (f_max - f_min) * p are exact identities.
      if (s < w) return s / Math.max(1, w);
      const progress = (t - s) / Math.max(1, t - w);
      return Math.max(0.0, progress);
    }
    case 'cosine': {
      if (s < w) return s / Math.max(1, w);
      const progress = (s - w) / Math.max(1, t - w);
      // Past the end the half-cosine turns back up; diffusers does the same.
      return Math.max(0.0, 0.5 * (1.0 + Math.cos(Math.PI * spec.numCycles * 2.0 * progress)));
    }
    case 'cosine_with_restarts': {
      if (s < w) return s / Math.max(1, w);
      const progress = (s - w) / Math.max(1, t - w);
      if (progress >= 1.0) return 0.0;
      return Math.max(0.0, 0.5 * (1.0 + Math.cos(Math.PI * pyMod(spec.numCycles * progress, 1.0))));
    }
    case 'polynomial': {
      if (s < w) return s / Math.max(1, w);
      const lrInit = spec.baseLr;
      if (s > t) return spec.lrEnd / lrInit;
      const lrRange = lrInit - spec.lrEnd;
      const decaySteps = t - w;
      const pctRemaining = 1 - (s - w) / decaySteps;
      const decay = lrRange * pctRemaining ** spec.power + spec.lrEnd;
      return decay / lrInit;
    }
    case 'piecewise_constant': {
      const r = parseStepRules(spec.stepRules ?? '');
      for (let i = 0; i < r.thresholds.length; i++) if (s < r.thresholds[i]) return r.multiples[i];
      return r.last;
    }
  }
}

/** lr after `schedulerStep` scheduler.step() calls: `baseLr * lr_lambda(schedulerStep)` (LambdaLR). */
export function lrAt(spec: LrScheduleSpec, schedulerStep: number): number {
  if (!Number.isSafeInteger(schedulerStep) || schedulerStep < 0) {
    throw new RangeError(`scheduler step must be a non-negative integer, got ${schedulerStep}`);
  }
  return spec.baseLr * lrLambda(spec, schedulerStep);
}

/**
 * lr used by the optimizer step that follows `optimizerStepsDone` completed optimizer steps,
 * with `numProcesses` scheduler steps per optimizer step (accelerate). The value the diffusers
 * script logs as "lr" after global_step k is `lrForOptimizerStep(spec, k, n)`.
 */
export function lrForOptimizerStep(spec: LrScheduleSpec, optimizerStepsDone: number, numProcesses = 1): number {
  return lrAt(spec, optimizerStepsDone * numProcesses);
}

/** `--scale-lr`: lr * gradient_accumulation_steps * train_batch_size * num_processes (same order). */
export function scaleLearningRate(lr: number, gradientAccumulationSteps: number, trainBatchSize: number, numProcesses: number): number {
  return lr * gradientAccumulationSteps * trainBatchSize * numProcesses;
}

export interface TrainingLrArgs {
  kind: LrScheduleKind;
  learningRate: number;
  scaleLr: boolean;
  lrWarmupSteps: number;
  /** --max-train-steps; when null/undefined the total comes from epochs × batches. */
  maxTrainSteps?: number | null;
  numTrainEpochs: number;
  /** len(train_dataloader) before sharding: ceil(num_examples / train_batch_size) (drop_last=False). */
  batchesPerEpoch: number;
  gradientAccumulationSteps: number;
  trainBatchSize: number;
  numProcesses: number;
  numCycles?: number;
  power?: number;
  stepRules?: string | null;
}

/**
 * The schedule train_text_to_image_lora.py builds (after diffusers PR #8312):
 *   warmup = lr_warmup_steps * num_processes
 *   total  = max_train_steps * num_processes, or, without --max_train_steps,
 *            num_train_epochs * ceil(ceil(len(dataloader) / num_processes) / grad_accum) * num_processes
 * and, with --scale_lr, lr = lr * grad_accum * batch_size * num_processes.
 */
export function trainingLrSchedule(a: TrainingLrArgs): LrScheduleSpec {
  for (const [k, v] of [
    ['numProcesses', a.numProcesses],
    ['gradientAccumulationSteps', a.gradientAccumulationSteps],
    ['trainBatchSize', a.trainBatchSize],
  ] as const) {
    if (!Number.isSafeInteger(v) || v < 1) throw new RangeError(`${k} must be a positive integer, got ${v}`);
  }
  const n = a.numProcesses;
  const baseLr = a.scaleLr ? scaleLearningRate(a.learningRate, a.gradientAccumulationSteps, a.trainBatchSize, n) : a.learningRate;
  let total: number;
  if (a.maxTrainSteps === null || a.maxTrainSteps === undefined) {
    const perProcess = Math.ceil(a.batchesPerEpoch / n);
    total = a.numTrainEpochs * Math.ceil(perProcess / a.gradientAccumulationSteps) * n;
  } else {
    total = a.maxTrainSteps * n;
  }
  return resolveLrSchedule({
    kind: a.kind,
    baseLr,
    warmupSteps: a.lrWarmupSteps * n,
    totalSteps: total,
    numCycles: a.numCycles,
    power: a.power,
    stepRules: a.stepRules,
  });
}

/** A resolved schedule bound to its spec. */
export interface LrSchedule {
  readonly spec: LrScheduleSpec;
  /** lr after `schedulerStep` scheduler steps (see the file comment). */
  lrAt(schedulerStep: number): number;
}

export function createLrSchedule(options: LrScheduleOptions): LrSchedule {
  const spec = Object.freeze(resolveLrSchedule(options));
  return { spec, lrAt: (step: number) => lrAt(spec, step) };
}

/** Re-validates a spec read back from a checkpoint (JSON); throws on anything malformed. */
export function lrScheduleFromJSON(value: unknown): LrSchedule {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new TypeError('lr schedule: expected an object');
  const v = value as Record<string, unknown>;
  const num = (k: string): number => {
    const x = v[k];
    if (typeof x !== 'number') throw new TypeError(`lr schedule: '${k}' must be a number`);
    return x;
  };
  const kind = v.kind;
  if (typeof kind !== 'string' || !isLrScheduleKind(kind)) throw new TypeError(`lr schedule: bad kind ${JSON.stringify(kind)}`);
  const rules = v.stepRules;
  if (rules !== null && rules !== undefined && typeof rules !== 'string') throw new TypeError("lr schedule: 'stepRules' must be a string or null");
  return createLrSchedule({
    kind,
    baseLr: num('baseLr'),
    warmupSteps: num('warmupSteps'),
    totalSteps: num('totalSteps'),
    numCycles: num('numCycles'),
    power: num('power'),
    lrEnd: num('lrEnd'),
    stepRules: rules ?? null,
  });
}
