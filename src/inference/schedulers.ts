/**
 * Inference schedulers of diffusers, as op programs for the native sampler session (native/pipeline/sampling.h).
 *
 * Each scheduler is built from a scheduler_config.json the way `<Class>.from_config(config)` builds it (keys
 * the class knows are taken from the file, the class's own defaults fill the rest), then `set_timesteps(n)`:
 *
 *   pndm      PNDMScheduler (PLMS, skip_prk_steps: n + 1 model calls, as diffusers runs it)
 *   ddim      DDIMScheduler, eta 0
 *   euler     EulerDiscreteScheduler
 *   euler_a   EulerAncestralDiscreteScheduler (noise from the session's generator)
 *   dpmpp_2m  DPMSolverMultistepScheduler (dpmsolver++, solver_order 2)
 *
 * Every scheduler update is a linear combination of tensor slots: "x" (the latents), "eps" (this step's guided
 * model output) and slots the program saved before (PLMS history, DPM-Solver's previous data prediction), plus
 * optionally N(0, 1) noise. The coefficients are computed here in float64 from the float32 values diffusers
 * keeps (alphas_cumprod, sigmas), so the native side only runs `target = Σ coef · slot` per op.
 */
import { NoiseSchedule, parseSchedulerConfig, roundHalfEven, type NoiseScheduleConfig } from '../schedules/noise';

export const SCHEDULER_NAMES = ['pndm', 'ddim', 'euler', 'euler_a', 'dpmpp_2m'] as const;
export type SchedulerName = (typeof SCHEDULER_NAMES)[number];

/** One op of a step program: `target = Σ coef · slot (+ noise · N(0, 1))`, then optionally clamped. */
export interface SamplerOp {
  target: string;
  terms: Array<[string, number]>;
  noise?: number;
  clamp?: [number, number];
}

/** One denoising step: run the model on x · modelInputScale at `timestep`, then the ops in order. */
export interface SchedulerStep {
  timestep: number;
  modelInputScale: number;
  ops: SamplerOp[];
}

export interface SamplingSchedule {
  scheduler: SchedulerName;
  /** The timesteps the model sees (PNDM repeats one: n + 1 entries). */
  timesteps: number[];
  /** Multiplies the initial latents (prepare_latents). */
  initNoiseSigma: number;
  steps: SchedulerStep[];
  predictionType: 'epsilon' | 'v_prediction';
}

/** Config keys of scheduler_config.json that override a class's defaults (what the test goldens vary). */
export interface SchedulerOverrides {
  prediction_type?: 'epsilon' | 'v_prediction';
  timestep_spacing?: 'leading' | 'trailing' | 'linspace';
  steps_offset?: number;
  set_alpha_to_one?: boolean;
  clip_sample?: boolean;
  [key: string]: unknown;
}

const f32 = Math.fround;

/** numpy's round (half to even). */
const npRound = roundHalfEven;

/** np.linspace(start, stop, num) in float64. */
function npLinspace(start: number, stop: number, num: number): number[] {
  if (num === 1) return [start];
  const step = (stop - start) / (num - 1);
  const out: number[] = [];
  for (let i = 0; i < num; i++) out.push(i * step + start);
  out[num - 1] = stop;
  return out;
}

/** np.arange(start, stop, step) for a float step. */
function npArange(start: number, stop: number, step: number): number[] {
  const n = Math.max(0, Math.ceil((stop - start) / step));
  const out: number[] = [];
  for (let i = 0; i < n; i++) out.push(start + i * step);
  return out;
}

/** np.interp(x, arange(len(fp)), fp) in float64. */
function interp(x: number, fp: ArrayLike<number>): number {
  if (x <= 0) return fp[0];
  const last = fp.length - 1;
  if (x >= last) return fp[last];
  const j = Math.floor(x);
  if (j === x) return fp[j];
  const slope = (fp[j + 1] - fp[j]) / 1;
  return slope * (x - j) + fp[j];
}

type Spacing = 'leading' | 'trailing' | 'linspace';

interface ClassDefaults {
  timestep_spacing: Spacing;
  set_alpha_to_one: boolean;
  clip_sample: boolean;
}

const CLASS_DEFAULTS: Record<SchedulerName, ClassDefaults> = {
  pndm: { timestep_spacing: 'leading', set_alpha_to_one: false, clip_sample: false },
  ddim: { timestep_spacing: 'leading', set_alpha_to_one: true, clip_sample: true },
  euler: { timestep_spacing: 'linspace', set_alpha_to_one: false, clip_sample: false },
  euler_a: { timestep_spacing: 'linspace', set_alpha_to_one: false, clip_sample: false },
  dpmpp_2m: { timestep_spacing: 'linspace', set_alpha_to_one: false, clip_sample: false },
};

/** A parsed config for one scheduler class. */
interface ResolvedConfig {
  noise: NoiseScheduleConfig;
  predictionType: 'epsilon' | 'v_prediction';
  spacing: Spacing;
  stepsOffset: number;
  setAlphaToOne: boolean;
  clipSample: boolean;
  clipSampleRange: number;
  finalSigmasType: 'zero' | 'sigma_min';
  lowerOrderFinal: boolean;
  eulerAtFinal: boolean;
  solverType: 'midpoint' | 'heun';
}

function resolveConfig(name: SchedulerName, json: Record<string, unknown>): ResolvedConfig {
  const where = `scheduler config (${name})`;
  const get = <T>(key: string, def: T, check: (v: unknown) => boolean, expect: string): T => {
    const v = json[key];
    if (v === undefined || v === null) return def;
    if (!check(v)) throw new Error(`${where}: '${key}' must be ${expect}, got ${JSON.stringify(v)}`);
    return v as T;
  };
  const isBool = (v: unknown): boolean => typeof v === 'boolean';
  const oneOf = (list: string[]) => (v: unknown) => typeof v === 'string' && list.includes(v);
  const d = CLASS_DEFAULTS[name];
  const noise = parseSchedulerConfig(json);
  if (noise.predictionType === 'sample') throw new Error(`${where}: prediction_type "sample" is not supported for sampling (epsilon or v_prediction)`);
  if (name === 'pndm') noise.rescaleBetasZeroSnr = false; // PNDMScheduler has no such option
  if (name === 'euler_a' || name === 'pndm' || name === 'ddim') {
    // these classes have no karras sigmas; the key is ignored by from_config
  } else if (get('use_karras_sigmas', false, isBool, 'a boolean')) {
    throw new Error(`${where}: use_karras_sigmas is not supported; set it to false`);
  }
  for (const key of ['use_exponential_sigmas', 'use_beta_sigmas', 'use_lu_lambdas', 'use_flow_sigmas', 'thresholding']) {
    if (name !== 'pndm' && name !== 'euler_a' && json[key] === true) throw new Error(`${where}: ${key} is not supported; set it to false`);
  }
  if (name === 'euler') {
    const it = get('interpolation_type', 'linear', oneOf(['linear']), '"linear" (log_linear is not supported)');
    void it;
    get('timestep_type', 'discrete', oneOf(['discrete']), '"discrete"');
  }
  if (name === 'dpmpp_2m') {
    get('algorithm_type', 'dpmsolver++', oneOf(['dpmsolver++']), '"dpmsolver++" for dpmpp_2m');
    if (json.lambda_min_clipped !== undefined && json.lambda_min_clipped !== null && json.lambda_min_clipped !== -Infinity) {
      throw new Error(`${where}: lambda_min_clipped is not supported`);
    }
    const vt = json.variance_type;
    if (vt !== undefined && vt !== null) throw new Error(`${where}: variance_type ${JSON.stringify(vt)} is not supported`);
  }
  return {
    noise,
    predictionType: noise.predictionType as 'epsilon' | 'v_prediction',
    spacing: get('timestep_spacing', d.timestep_spacing, oneOf(['leading', 'trailing', 'linspace']), 'leading, trailing or linspace'),
    stepsOffset: get('steps_offset', 0, (v) => Number.isSafeInteger(v), 'an integer'),
    setAlphaToOne: get('set_alpha_to_one', d.set_alpha_to_one, isBool, 'a boolean'),
    clipSample: name === 'ddim' ? get('clip_sample', d.clip_sample, isBool, 'a boolean') : false,
    clipSampleRange: get('clip_sample_range', 1.0, (v) => typeof v === 'number' && v > 0, 'a positive number'),
    finalSigmasType: get('final_sigmas_type', 'zero', oneOf(['zero', 'sigma_min']), '"zero" or "sigma_min"'),
    lowerOrderFinal: get('lower_order_final', true, isBool, 'a boolean'),
    eulerAtFinal: get('euler_at_final', false, isBool, 'a boolean'),
    solverType: get('solver_type', 'midpoint', oneOf(['midpoint', 'heun']), '"midpoint" or "heun"'),
  };
}

/** Linear combinations of slots, built symbolically. */
type Lin = Map<string, number>;
const lin = (...pairs: Array<[string, number]>): Lin => {
  const m: Lin = new Map();
  for (const [k, v] of pairs) m.set(k, (m.get(k) ?? 0) + v);
  return m;
};
const scale = (a: Lin, c: number): Lin => new Map([...a].map(([k, v]) => [k, v * c]));
const add = (...xs: Lin[]): Lin => {
  const m: Lin = new Map();
  for (const x of xs) for (const [k, v] of x) m.set(k, (m.get(k) ?? 0) + v);
  return m;
};
const op = (target: string, l: Lin, extra: Partial<SamplerOp> = {}): SamplerOp => ({ target, terms: [...l], ...extra });
const copy = (target: string, from: string): SamplerOp => ({ target, terms: [[from, 1]] });

/** Integer DDPM-style timesteps of PNDM / DDIM (before PNDM's PLMS reordering), descending. */
function discreteTimesteps(cfg: ResolvedConfig, n: number, T: number): number[] {
  let ts: number[];
  if (cfg.spacing === 'linspace') {
    ts = npLinspace(0, T - 1, n).map(npRound);
  } else if (cfg.spacing === 'leading') {
    const ratio = Math.floor(T / n);
    ts = Array.from({ length: n }, (_, i) => npRound(i * ratio) + cfg.stepsOffset);
  } else {
    ts = npArange(T, 0, -T / n)
      .map(npRound)
      .reverse()
      .map((t) => t - 1);
  }
  return ts; // ascending
}

/** Float timesteps of the Euler schedulers (float32 values), descending. */
function eulerTimesteps(cfg: ResolvedConfig, n: number, T: number): number[] {
  if (cfg.spacing === 'linspace') return npLinspace(0, T - 1, n).map(f32).reverse();
  if (cfg.spacing === 'leading') {
    const ratio = Math.floor(T / n);
    return Array.from({ length: n }, (_, i) => f32(npRound(i * ratio)) + cfg.stepsOffset).reverse();
  }
  return npArange(T, 0, -T / n).map((t) => f32(npRound(t)) - 1);
}

/** ((1 - a) / a) ** 0.5 per training timestep, in float32 (torch's tensor ops). */
function sigmaTable(ac: Float32Array): Float32Array {
  return ac.map((a) => Math.sqrt(f32(f32(1 - a) / a)));
}

function checkSteps(n: number, T: number): void {
  if (!Number.isSafeInteger(n) || n < 1) throw new RangeError(`the number of inference steps must be a positive integer, got ${n}`);
  if (n > T) throw new RangeError(`the number of inference steps (${n}) cannot exceed num_train_timesteps (${T})`);
}

function pndm(cfg: ResolvedConfig, ac: Float32Array, n: number, T: number): SamplingSchedule {
  const base = discreteTimesteps(cfg, n, T);
  // skip_prk_steps: concat(ts[:-1], ts[-2:-1], ts[-1:])[::-1]
  const plms = [...base.slice(0, -1), ...base.slice(-2, -1), ...base.slice(-1)].reverse();
  const ratio = Math.floor(T / n);
  const finalAlpha = cfg.setAlphaToOne ? 1 : ac[0];
  const steps: SchedulerStep[] = [];
  let nEts = 0;
  plms.forEach((t0, counter) => {
    let timestep = t0;
    let prev = t0 - ratio;
    if (counter === 1) {
      prev = t0;
      timestep = t0 + ratio;
    } else {
      nEts = Math.min(nEts + 1, 4);
    }
    const ops: SamplerOp[] = [];
    let sample = 'x';
    let mo: Lin;
    if (nEts === 1 && counter === 0) {
      mo = lin(['eps', 1]);
      ops.push(copy('cur', 'x'));
    } else if (nEts === 1 && counter === 1) {
      mo = lin(['eps', 0.5], ['ets1', 0.5]);
      sample = 'cur';
    } else if (nEts === 2) {
      mo = lin(['eps', 3 / 2], ['ets1', -1 / 2]);
    } else if (nEts === 3) {
      mo = lin(['eps', 23 / 12], ['ets1', -16 / 12], ['ets2', 5 / 12]);
    } else {
      mo = lin(['eps', 55 / 24], ['ets1', -59 / 24], ['ets2', 37 / 24], ['ets3', -9 / 24]);
    }
    const at = ac[timestep];
    const ap = prev >= 0 ? ac[prev] : finalAlpha;
    const bt = f32(1 - at);
    const bp = f32(1 - ap);
    if (cfg.predictionType === 'v_prediction') mo = add(scale(mo, f32(Math.sqrt(at))), lin([sample, f32(Math.sqrt(bt))]));
    const sampleCoeff = f32(Math.sqrt(f32(ap / at)));
    const denom = f32(f32(at * f32(Math.sqrt(bp))) + f32(Math.sqrt(f32(f32(at * bt) * ap))));
    const moCoeff = f32(ap - at) / denom;
    ops.push(op('x', add(lin([sample, sampleCoeff]), scale(mo, -moCoeff))));
    if (counter !== 1) ops.push(copy('ets3', 'ets2'), copy('ets2', 'ets1'), copy('ets1', 'eps'));
    steps.push({ timestep: t0, modelInputScale: 1, ops });
  });
  // The copies of slots that do not exist yet are skipped by giving them only once their source exists.
  pruneMissingCopies(steps);
  return { scheduler: 'pndm', timesteps: plms, initNoiseSigma: 1, steps, predictionType: cfg.predictionType };
}

/** Drops copy ops whose source slot has not been written yet (PLMS history before it fills up). */
function pruneMissingCopies(steps: SchedulerStep[]): void {
  const have = new Set(['x']);
  for (const s of steps) {
    have.add('eps');
    s.ops = s.ops.filter((o) => {
      const ok = o.terms.every(([slot]) => have.has(slot));
      if (ok) have.add(o.target);
      return ok;
    });
  }
}

function ddim(cfg: ResolvedConfig, ac: Float32Array, n: number, T: number): SamplingSchedule {
  const ts = discreteTimesteps(cfg, n, T).reverse();
  const ratio = Math.floor(T / n);
  const finalAlpha = cfg.setAlphaToOne ? 1 : ac[0];
  const steps = ts.map((t): SchedulerStep => {
    const prev = t - ratio;
    const at = ac[t];
    const ap = prev >= 0 ? ac[prev] : finalAlpha;
    const bt = f32(1 - at);
    const sa = f32(Math.sqrt(at));
    const sb = f32(Math.sqrt(bt));
    let x0: Lin;
    let pe: Lin;
    if (cfg.predictionType === 'epsilon') {
      x0 = lin(['x', 1 / sa], ['eps', -sb / sa]);
      pe = lin(['eps', 1]);
    } else {
      x0 = lin(['x', sa], ['eps', -sb]);
      pe = lin(['eps', sa], ['x', sb]);
    }
    const cx0 = f32(Math.sqrt(ap));
    const cdir = f32(Math.sqrt(f32(1 - ap)));
    const ops: SamplerOp[] = [];
    if (cfg.clipSample) {
      const r = cfg.clipSampleRange;
      ops.push(op('x0', x0, { clamp: [-r, r] }));
      ops.push(op('x', add(lin(['x0', cx0]), scale(pe, cdir))));
    } else {
      ops.push(op('x', add(scale(x0, cx0), scale(pe, cdir))));
    }
    return { timestep: t, modelInputScale: 1, ops };
  });
  return { scheduler: 'ddim', timesteps: ts, initNoiseSigma: 1, steps, predictionType: cfg.predictionType };
}

function euler(cfg: ResolvedConfig, ac: Float32Array, n: number, T: number, ancestral: boolean): SamplingSchedule {
  const ts = eulerTimesteps(cfg, n, T);
  const table = sigmaTable(ac);
  const sig = ts.map((t) => f32(interp(t, table)));
  const last = !ancestral && cfg.finalSigmasType === 'sigma_min' ? f32(Math.sqrt(f32(f32(1 - ac[0]) / ac[0]))) : 0;
  sig.push(last);
  const maxSigma = Math.max(...sig);
  const initNoiseSigma = cfg.spacing === 'leading' ? f32(Math.sqrt(f32(f32(maxSigma * maxSigma) + 1))) : maxSigma;
  const steps = ts.map((t, i): SchedulerStep => {
    const s = sig[i];
    const sNext = sig[i + 1];
    const root = f32(Math.sqrt(f32(s * s + 1)));
    // pred_x0 as a combination of x and eps
    const x0 = cfg.predictionType === 'epsilon' ? lin(['x', 1], ['eps', -s]) : lin(['eps', -s / root], ['x', 1 / f32(s * s + 1)]);
    const derivative = scale(add(lin(['x', 1]), scale(x0, -1)), 1 / s);
    if (!ancestral) {
      return { timestep: t, modelInputScale: 1 / root, ops: [op('x', add(lin(['x', 1]), scale(derivative, sNext - s)))] };
    }
    const up = Math.sqrt((sNext * sNext * (s * s - sNext * sNext)) / (s * s));
    const down = Math.sqrt(sNext * sNext - up * up);
    return { timestep: t, modelInputScale: 1 / root, ops: [op('x', add(lin(['x', 1]), scale(derivative, down - s)), { noise: up })] };
  });
  return { scheduler: ancestral ? 'euler_a' : 'euler', timesteps: ts, initNoiseSigma, steps, predictionType: cfg.predictionType };
}

function dpmpp2m(cfg: ResolvedConfig, ac: Float32Array, n: number, T: number): SamplingSchedule {
  const last = T; // lambda_min_clipped = -inf: nothing clipped
  let ts: number[];
  if (cfg.spacing === 'linspace') ts = npLinspace(0, last - 1, n + 1).map(npRound).reverse().slice(0, -1);
  else if (cfg.spacing === 'leading') {
    const ratio = Math.floor(last / (n + 1));
    ts = Array.from({ length: n + 1 }, (_, i) => npRound(i * ratio))
      .reverse()
      .slice(0, -1)
      .map((t) => t + cfg.stepsOffset);
  } else ts = npArange(last, 0, -T / n).map((t) => npRound(t) - 1);
  const table = sigmaTable(ac);
  const sig = ts.map((t) => f32(interp(t, table)));
  sig.push(cfg.finalSigmasType === 'sigma_min' ? f32(Math.sqrt(f32(f32(1 - ac[0]) / ac[0]))) : 0);
  const alphaSigma = (s: number): [number, number] => {
    const a = 1 / Math.sqrt(s * s + 1);
    return [a, s * a];
  };
  const lambda = (s: number): number => {
    const [a, st] = alphaSigma(s);
    return Math.log(a) - Math.log(st);
  };
  const N = ts.length;
  const steps = ts.map((t, i): SchedulerStep => {
    const [as0, ss0] = alphaSigma(sig[i]);
    const d0 = cfg.predictionType === 'epsilon' ? lin(['x', 1 / as0], ['eps', -ss0 / as0]) : lin(['x', as0], ['eps', -ss0]);
    const lowerOrderFinal = i === N - 1 && (cfg.eulerAtFinal || (cfg.lowerOrderFinal && N < 15) || cfg.finalSigmasType === 'zero');
    const [at, st] = alphaSigma(sig[i + 1]);
    const h = lambda(sig[i + 1]) - lambda(sig[i]);
    const A = at * (Math.exp(-h) - 1);
    const ratioX = st / ss0;
    let x: Lin;
    if (i === 0 || lowerOrderFinal) {
      x = add(lin(['x', ratioX]), lin(['d0', -A]));
    } else {
      const h0 = lambda(sig[i]) - lambda(sig[i - 1]);
      const r0 = h0 / h;
      const D1 = lin(['d0', 1 / r0], ['d1', -1 / r0]);
      const c1 = cfg.solverType === 'midpoint' ? -0.5 * A : at * ((Math.exp(-h) - 1) / h + 1);
      x = add(lin(['x', ratioX], ['d0', -A]), scale(D1, c1));
    }
    return { timestep: t, modelInputScale: 1, ops: [op('d0', d0), op('x', x), copy('d1', 'd0')] };
  });
  return { scheduler: 'dpmpp_2m', timesteps: ts, initNoiseSigma: 1, steps, predictionType: cfg.predictionType };
}

/**
 * The sampling schedule of `name` for `numInferenceSteps`, from a scheduler_config.json object (any class's:
 * like diffusers' from_config, only the keys a class knows are used). `overrides` replace config keys.
 */
export function makeSchedule(name: SchedulerName, config: unknown, numInferenceSteps: number, overrides: SchedulerOverrides = {}): SamplingSchedule {
  if (!(SCHEDULER_NAMES as readonly string[]).includes(name)) {
    throw new Error(`unknown scheduler "${String(name)}"; choose one of ${SCHEDULER_NAMES.join(', ')}`);
  }
  if (typeof config !== 'object' || config === null || Array.isArray(config)) throw new TypeError('scheduler config: expected a JSON object');
  const json = { ...(config as Record<string, unknown>), ...overrides };
  const cfg = resolveConfig(name, json);
  const schedule = new NoiseSchedule(cfg.noise);
  let ac = schedule.alphasCumprod;
  const T = schedule.numTrainTimesteps;
  checkSteps(numInferenceSteps, T);
  if (cfg.noise.rescaleBetasZeroSnr && (name === 'euler' || name === 'euler_a' || name === 'dpmpp_2m')) {
    ac = ac.slice();
    ac[T - 1] = 2 ** -24; // "close to 0 without being 0 so first sigma is not inf"
  }
  switch (name) {
    case 'pndm':
      return pndm(cfg, ac, numInferenceSteps, T);
    case 'ddim':
      return ddim(cfg, ac, numInferenceSteps, T);
    case 'euler':
      return euler(cfg, ac, numInferenceSteps, T, false);
    case 'euler_a':
      return euler(cfg, ac, numInferenceSteps, T, true);
    case 'dpmpp_2m':
      return dpmpp2m(cfg, ac, numInferenceSteps, T);
  }
}
