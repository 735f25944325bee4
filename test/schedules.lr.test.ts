import * as fs from 'node:fs';
import * as path from 'node:path';

import {
  createLrSchedule,
  isLrScheduleKind,
  lrAt,
  lrForOptimizerStep,
  lrScheduleFromJSON,
  LrScheduleKind,
  resolveLrSchedule,
  scaleLearningRate,
  trainingLrSchedule,
} from '../src/schedules/lr';

// Golden lrs from diffusers' get_scheduler: scripts/golden/make_schedule_goldens.py.
interface GoldenCase {
  name: string;
  kind: string;
  lr: number;
  warmup: number | null;
  total: number | null;
  num_cycles: number | null;
  power: number | null;
  step_rules: string | null;
  lrs: number[];
}
const GOLDEN: { cases: GoldenCase[] } = JSON.parse(
  fs.readFileSync(path.join(__dirname, 'fixtures', 'schedules', 'lr_golden.json'), 'utf8'),
);

function relErr(a: number, b: number): number {
  if (a === b) return 0;
  return Math.abs(a - b) / Math.max(Math.abs(a), Math.abs(b));
}

describe('lr schedules vs diffusers get_scheduler', () => {
  test('fixture covers every kind and the edge cases', () => {
    const kinds = new Set(GOLDEN.cases.map((c) => c.kind));
    for (const k of ['constant', 'constant_with_warmup', 'linear', 'cosine', 'cosine_with_restarts', 'polynomial', 'piecewise_constant']) {
      expect(kinds.has(k)).toBe(true);
    }
    expect(GOLDEN.cases.some((c) => c.warmup === 0)).toBe(true);
    expect(GOLDEN.cases.some((c) => c.warmup !== null && c.warmup === c.total)).toBe(true);
    expect(GOLDEN.cases.some((c) => c.total !== null && c.lrs.length > c.total + 10)).toBe(true);
  });

  test.each(GOLDEN.cases.map((c) => [c.name, c] as const))('%s', (_name, c) => {
    if (!isLrScheduleKind(c.kind)) throw new Error(`bad kind ${c.kind}`);
    const spec = resolveLrSchedule({
      kind: c.kind,
      baseLr: c.lr,
      warmupSteps: c.warmup ?? undefined,
      totalSteps: c.total ?? undefined,
      numCycles: c.num_cycles ?? undefined,
      power: c.power ?? undefined,
      stepRules: c.step_rules,
    });
    let worst = 0;
    let worstAt = -1;
    c.lrs.forEach((want, step) => {
      const e = relErr(lrAt(spec, step), want);
      if (e > worst) [worst, worstAt] = [e, step];
    });
    if (worst > 1e-12) throw new Error(`${c.name}: relative error ${worst} at step ${worstAt}: ${lrAt(spec, worstAt)} vs ${c.lrs[worstAt]}`);
  });
});

describe('lr schedule semantics', () => {
  const base = { baseLr: 1e-4, warmupSteps: 7, totalSteps: 50 };

  test('warmup starts at 0 and reaches base lr at warmupSteps', () => {
    for (const kind of ['constant_with_warmup', 'linear', 'cosine', 'cosine_with_restarts', 'polynomial'] as LrScheduleKind[]) {
      const s = createLrSchedule({ kind, ...base });
      expect(s.lrAt(0)).toBe(0);
      expect(s.lrAt(3)).toBeCloseTo((1e-4 * 3) / 7, 18);
      expect(s.lrAt(7)).toBeCloseTo(1e-4, 15);
    }
  });

  test('warmup 0 starts at base lr', () => {
    for (const kind of ['constant_with_warmup', 'linear', 'cosine', 'cosine_with_restarts'] as LrScheduleKind[]) {
      expect(createLrSchedule({ kind, baseLr: 2e-4, warmupSteps: 0, totalSteps: 10 }).lrAt(0)).toBe(2e-4);
    }
  });

  test('behaviour past the total', () => {
    expect(createLrSchedule({ kind: 'linear', ...base }).lrAt(80)).toBe(0);
    expect(createLrSchedule({ kind: 'cosine_with_restarts', ...base }).lrAt(50)).toBe(0);
    expect(createLrSchedule({ kind: 'polynomial', ...base }).lrAt(51)).toBeCloseTo(1e-7, 20);
    // diffusers' half-cosine keeps going: past the end the lr rises again.
    const cos = createLrSchedule({ kind: 'cosine', ...base });
    expect(cos.lrAt(50)).toBeLessThan(1e-20);
    expect(cos.lrAt(60)).toBeGreaterThan(1e-6);
  });

  test('cosine ignores numCycles like get_scheduler; restarts use it', () => {
    expect(createLrSchedule({ kind: 'cosine', ...base, numCycles: 3 }).spec.numCycles).toBe(0.5);
    expect(createLrSchedule({ kind: 'cosine_with_restarts', ...base }).spec.numCycles).toBe(1);
    const r = createLrSchedule({ kind: 'cosine_with_restarts', baseLr: 1, warmupSteps: 0, totalSteps: 30, numCycles: 3 });
    expect(r.lrAt(10)).toBe(1); // restart
    expect(r.lrAt(20)).toBe(1);
    expect(r.lrAt(5)).toBeCloseTo(0.5, 12);
  });

  test('piecewise constant uses absolute thresholds', () => {
    const s = createLrSchedule({ kind: 'piecewise_constant', baseLr: 1, stepRules: '1:10,0.1:20,0.01:30,0.005' });
    expect([0, 9, 10, 19, 20, 29, 30, 1000].map((k) => s.lrAt(k))).toEqual([1, 1, 0.1, 0.1, 0.01, 0.01, 0.005, 0.005]);
    expect(() => createLrSchedule({ kind: 'piecewise_constant', baseLr: 1 })).toThrow(/stepRules/);
    expect(() => createLrSchedule({ kind: 'piecewise_constant', baseLr: 1, stepRules: '1:x,0.1' })).toThrow(/step count/);
    expect(() => createLrSchedule({ kind: 'piecewise_constant', baseLr: 1, stepRules: '1:10,' })).toThrow(/final/);
  });

  test('refuses what diffusers refuses', () => {
    expect(() => resolveLrSchedule({ kind: 'linear', baseLr: 1e-4, warmupSteps: 3 })).toThrow(/totalSteps/);
    expect(() => resolveLrSchedule({ kind: 'cosine', baseLr: 1e-4, totalSteps: 3 })).toThrow(/warmupSteps/);
    expect(() => resolveLrSchedule({ kind: 'polynomial', baseLr: 1e-7, warmupSteps: 0, totalSteps: 5 })).toThrow(/lr_end/);
    expect(() => resolveLrSchedule({ kind: 'polynomial', baseLr: 1e-4, warmupSteps: 5, totalSteps: 5 })).toThrow(/divides by zero/);
    expect(() => resolveLrSchedule({ kind: 'bogus' as LrScheduleKind, baseLr: 1 })).toThrow(/unknown lr scheduler/);
    expect(() => resolveLrSchedule({ kind: 'linear', baseLr: 1, warmupSteps: -1, totalSteps: 5 })).toThrow(/non-negative/);
    expect(() => resolveLrSchedule({ kind: 'linear', baseLr: 1, warmupSteps: 1.5, totalSteps: 5 })).toThrow(/integer/);
    expect(() => lrAt(resolveLrSchedule({ kind: 'constant', baseLr: 1 }), -1)).toThrow(RangeError);
    expect(() => lrAt(resolveLrSchedule({ kind: 'constant', baseLr: 1 }), 0.5)).toThrow(RangeError);
  });

  test('spec survives a JSON round trip and bad JSON is refused', () => {
    const s = createLrSchedule({ kind: 'polynomial', baseLr: 3e-4, warmupSteps: 4, totalSteps: 40, power: 2 });
    const back = lrScheduleFromJSON(JSON.parse(JSON.stringify(s.spec)));
    expect(back.spec).toEqual(s.spec);
    for (let k = 0; k < 45; k++) expect(back.lrAt(k)).toBe(s.lrAt(k));
    expect(() => lrScheduleFromJSON({ ...s.spec, kind: 'nope' })).toThrow(/kind/);
    expect(() => lrScheduleFromJSON({ ...s.spec, baseLr: '1' })).toThrow(/baseLr/);
    expect(() => lrScheduleFromJSON(null)).toThrow(TypeError);
  });
});

describe('training-script step accounting', () => {
  test('--scale-lr multiplies in the script order', () => {
    expect(scaleLearningRate(1e-4, 4, 2, 3)).toBe(1e-4 * 4 * 2 * 3);
    const spec = trainingLrSchedule({
      kind: 'constant', learningRate: 1e-4, scaleLr: true, lrWarmupSteps: 0, maxTrainSteps: 10,
      numTrainEpochs: 1, batchesPerEpoch: 1, gradientAccumulationSteps: 4, trainBatchSize: 2, numProcesses: 3,
    });
    expect(spec.baseLr).toBe(1e-4 * 4 * 2 * 3);
  });

  test('warmup and total are multiplied by num_processes', () => {
    const spec = trainingLrSchedule({
      kind: 'linear', learningRate: 1e-4, scaleLr: false, lrWarmupSteps: 7, maxTrainSteps: 50,
      numTrainEpochs: 100, batchesPerEpoch: 999, gradientAccumulationSteps: 2, trainBatchSize: 1, numProcesses: 2,
    });
    expect(spec).toMatchObject({ baseLr: 1e-4, warmupSteps: 14, totalSteps: 100 });
    // One optimizer step = two scheduler steps; the schedule in optimizer steps is the 1-process one.
    const one = resolveLrSchedule({ kind: 'linear', baseLr: 1e-4, warmupSteps: 7, totalSteps: 50 });
    for (const k of [0, 3, 7, 20, 49, 50, 60]) expect(lrForOptimizerStep(spec, k, 2)).toBeCloseTo(lrAt(one, k), 18);
  });

  test('without max_train_steps the total comes from epochs and sharded batches', () => {
    // ceil(ceil(101 / 2) / 4) = ceil(51 / 4) = 13 updates per epoch, × 3 epochs × 2 processes
    const spec = trainingLrSchedule({
      kind: 'cosine', learningRate: 1e-4, scaleLr: false, lrWarmupSteps: 5, maxTrainSteps: null,
      numTrainEpochs: 3, batchesPerEpoch: 101, gradientAccumulationSteps: 4, trainBatchSize: 1, numProcesses: 2,
    });
    expect(spec.totalSteps).toBe(78);
    expect(spec.warmupSteps).toBe(10);
  });

  test('bad process / accumulation counts are refused', () => {
    const a = {
      kind: 'constant' as const, learningRate: 1e-4, scaleLr: false, lrWarmupSteps: 0, maxTrainSteps: 1,
      numTrainEpochs: 1, batchesPerEpoch: 1, gradientAccumulationSteps: 1, trainBatchSize: 1, numProcesses: 1,
    };
    expect(() => trainingLrSchedule({ ...a, numProcesses: 0 })).toThrow(/numProcesses/);
    expect(() => trainingLrSchedule({ ...a, gradientAccumulationSteps: 1.5 })).toThrow(/gradientAccumulationSteps/);
  });
});
