/**
 * The DDPM training noise schedule, as train_text_to_image_lora.py gets it from
 * `DDPMScheduler.from_pretrained(model, subfolder="scheduler")` — whatever the config's _class_name —
 * reproduced bit for bit in float32 (Math.fround), including torch's own arithmetic:
 *
 *  - torch.linspace(start, end, n, dtype=float32) on CPU computes, in float32,
 *      i <  n/2:  start + step * i          step = (end - start) / (n - 1)
 *      i >= n/2:  end - step * (n - 1 - i)
 *    and torch's AVX2/AVX512 kernels (what practically every x86 and arm64 build runs) contract
 *    that into a fused multiply-add; the "default" (no-SIMD) kernel does not. `linspace: 'fma'`
 *    (default) or `'separate'` picks which; both are checked against torch in the tests.
 *  - torch.cumprod on a CPU float32 tensor accumulates in double and rounds each output to float32.
 *  - x ** 0.5 is sqrt, x ** 2 is x * x (both exact-rounded in float32).
 */

import * as fs from 'node:fs';

export const BETA_SCHEDULES = ['linear', 'scaled_linear', 'squaredcos_cap_v2', 'laplace'] as const;
export type BetaSchedule = (typeof BETA_SCHEDULES)[number];
export const PREDICTION_TYPES = ['epsilon', 'v_prediction', 'sample'] as const;
export type PredictionType = (typeof PREDICTION_TYPES)[number];
/** dtype of the latents given to add_noise / get_velocity: the coefficients are cast to it. */
export type NoiseDtype = 'float32' | 'float16' | 'bfloat16';
export type LinspaceMode = 'fma' | 'separate';

/** The DDPMScheduler init arguments that shape the training schedule (diffusers defaults fill gaps). */
export interface NoiseScheduleConfig {
  numTrainTimesteps: number;
  betaStart: number;
  betaEnd: number;
  betaSchedule: BetaSchedule;
  trainedBetas: number[] | null;
  predictionType: PredictionType;
  rescaleBetasZeroSnr: boolean;
}

export interface NoiseScheduleOptions {
  /** --prediction-type: overrides the config's (the script's register_to_config). */
  predictionType?: PredictionType;
  linspace?: LinspaceMode;
}

// ------------------------------------------------------------------ float helpers
const f32 = Math.fround;
const f32buf = new Float32Array(1);
const u32buf = new Uint32Array(f32buf.buffer);
const f64buf = new Float64Array(1);
const u64view = new DataView(f64buf.buffer);

/** Adjacent float32 toward +inf (dir 1) or -inf (dir -1); x must be a finite float32. */
function nextFloat32(x: number, dir: 1 | -1): number {
  if (x === 0) return dir * 2 ** -149;
  f32buf[0] = x;
  // For positive x, +1 on the bit pattern goes up; for negative x it goes down.
  u32buf[0] += (x > 0) === (dir > 0) ? 1 : -1;
  return f32buf[0];
}

/** float32 fused multiply-add, correctly rounded: fround(a * b + c) without double rounding. */
export function fmaF32(a: number, b: number, c: number): number {
  const p = a * b; // exact: two 24-bit significands fit in 53 bits
  const s = p + c;
  // TwoSum: the rounding error of s, exactly.
  const bb = s - p;
  const err = p - (s - bb) + (c - bb);
  const r = f32(s);
  if (err === 0 || r === s || !Number.isFinite(s)) return r;
  const other = nextFloat32(r, s > r ? 1 : -1);
  if ((r + other) / 2 !== s) return r; // s is not a tie: the single rounding was already right
  // s sits exactly between two floats; the true value is on err's side of it.
  return err > 0 ? Math.max(r, other) : Math.min(r, other);
}

function exponentOf(a: number): number {
  f64buf[0] = a;
  return ((u64view.getUint32(4, true) >>> 20) & 0x7ff) - 1023;
}

/** numpy's round: half to even. */
export function roundHalfEven(q: number): number {
  const fl = Math.floor(q);
  const d = q - fl;
  if (d > 0.5) return fl + 1;
  if (d < 0.5) return fl;
  return fl % 2 === 0 ? fl : fl + 1;
}

/** Rounds a finite double to a binary format with `mant` stored bits, min normal exponent `emin`. */
function roundToFormat(x: number, mant: number, emin: number, maxFinite: number): number {
  if (!Number.isFinite(x) || x === 0) return x;
  const a = Math.abs(x);
  const ulp = 2 ** (Math.max(exponentOf(a), emin) - mant);
  const r = roundHalfEven(a / ulp) * ulp;
  return Math.sign(x) * (r > maxFinite ? Infinity : r);
}

/** IEEE binary16, round to nearest even (torch's float -> half). */
export const roundToFloat16 = (x: number): number => roundToFormat(x, 10, -14, 65504);
/** bfloat16, round to nearest even (torch's float -> bfloat16). */
export const roundToBfloat16 = (x: number): number => roundToFormat(x, 7, -126, 3.3895313892515355e38);

const ROUND: Record<NoiseDtype, (x: number) => number> = {
  float32: f32,
  float16: (x) => roundToFloat16(f32(x)),
  bfloat16: (x) => roundToBfloat16(f32(x)),
};

// ------------------------------------------------------------------ torch ops
/** torch.linspace(start, end, steps, dtype=torch.float32) on CPU. */
export function linspaceF32(start: number, end: number, steps: number, mode: LinspaceMode = 'fma'): Float32Array {
  const out = new Float32Array(steps);
  if (steps === 0) return out;
  const s = f32(start);
  const e = f32(end);
  if (steps === 1) {
    out[0] = s;
    return out;
  }
  const step = f32(f32(e - s) / f32(steps - 1));
  const halfway = Math.floor(steps / 2);
  for (let i = 0; i < steps; i++) {
    if (i < halfway) out[i] = mode === 'fma' ? fmaF32(step, i, s) : f32(s + f32(step * i));
    else {
      const k = steps - i - 1;
      out[i] = mode === 'fma' ? fmaF32(-step, k, e) : f32(e - f32(step * k));
    }
  }
  return out;
}

/** torch.cumprod(x, 0) for a CPU float32 tensor: double accumulator, float32 outputs. */
export function cumprodF32(x: Float32Array): Float32Array {
  const out = new Float32Array(x.length);
  let acc = 1;
  for (let i = 0; i < x.length; i++) {
    acc *= x[i];
    out[i] = acc;
  }
  return out;
}

// ------------------------------------------------------------------ betas
function betasForAlphaBar(n: number, kind: 'cosine' | 'laplace', maxBeta = 0.999): Float32Array {
  // Python double arithmetic, same operation order as diffusers' betas_for_alpha_bar.
  const alphaBar =
    kind === 'cosine'
      ? (t: number): number => {
          const c = Math.cos((((t + 0.008) / 1.008) * Math.PI) / 2);
          return c * c;
        }
      : (t: number): number => {
          const d = 0.5 - t;
          const sign = d < 0 || Object.is(d, -0) ? -1 : 1;
          const lmb = -0.5 * sign * Math.log(1 - 2 * Math.abs(d) + 1e-6);
          const snr = Math.exp(lmb);
          return Math.sqrt(snr / (1 + snr));
        };
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const t1 = i / n;
    const t2 = (i + 1) / n;
    out[i] = Math.min(1 - alphaBar(t2) / alphaBar(t1), maxBeta);
  }
  return out;
}

/** diffusers' rescale_zero_terminal_snr, in torch's float32 ops. */
function rescaleZeroTerminalSnr(betas: Float32Array): Float32Array {
  const n = betas.length;
  const alphas = betas.map((b) => f32(1 - b));
  const sqrtBar = cumprodF32(alphas).map((a) => Math.sqrt(a)); // Float32Array.map rounds to float32
  const a0 = sqrtBar[0];
  const aT = sqrtBar[n - 1];
  const scale = f32(a0 / f32(a0 - aT)); // 0-d float32 tensor ops
  const bar = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    const v = f32(f32(sqrtBar[i] - aT) * scale);
    bar[i] = v * v;
  }
  const out = new Float32Array(n);
  out[0] = f32(1 - bar[0]);
  for (let i = 1; i < n; i++) out[i] = f32(1 - f32(bar[i] / bar[i - 1]));
  return out;
}

// ------------------------------------------------------------------ config
const DEFAULTS: NoiseScheduleConfig = {
  numTrainTimesteps: 1000,
  betaStart: 0.0001,
  betaEnd: 0.02,
  betaSchedule: 'linear',
  trainedBetas: null,
  predictionType: 'epsilon',
  rescaleBetasZeroSnr: false,
};

function isOneOf<T extends string>(list: readonly T[], v: unknown): v is T {
  return typeof v === 'string' && (list as readonly string[]).includes(v);
}

/**
 * Reads a scheduler_config.json object the way DDPMScheduler.from_config does: known keys are
 * taken (type-checked), unknown keys (PNDM's skip_prk_steps, ...) ignored, missing keys defaulted.
 */
export function parseSchedulerConfig(json: unknown): NoiseScheduleConfig {
  if (typeof json !== 'object' || json === null || Array.isArray(json)) throw new TypeError('scheduler config: expected a JSON object');
  const j = json as Record<string, unknown>;
  const c: NoiseScheduleConfig = { ...DEFAULTS };
  const has = (k: string): boolean => j[k] !== undefined;
  const num = (k: string): number => {
    const v = j[k];
    if (typeof v !== 'number' || !Number.isFinite(v)) throw new TypeError(`scheduler config: '${k}' must be a finite number`);
    return v;
  };
  if (has('num_train_timesteps')) {
    c.numTrainTimesteps = num('num_train_timesteps');
    if (!Number.isSafeInteger(c.numTrainTimesteps) || c.numTrainTimesteps < 1) {
      throw new RangeError(`scheduler config: num_train_timesteps must be a positive integer, got ${c.numTrainTimesteps}`);
    }
  }
  if (has('beta_start')) c.betaStart = num('beta_start');
  if (has('beta_end')) c.betaEnd = num('beta_end');
  if (has('beta_schedule')) {
    const v = j.beta_schedule;
    if (!isOneOf(BETA_SCHEDULES, v)) {
      throw new RangeError(`scheduler config: beta_schedule ${JSON.stringify(v)} is not supported (${BETA_SCHEDULES.join(', ')})`);
    }
    c.betaSchedule = v;
  }
  if (has('prediction_type')) {
    const v = j.prediction_type;
    if (!isOneOf(PREDICTION_TYPES, v)) throw new RangeError(`scheduler config: unknown prediction_type ${JSON.stringify(v)}`);
    c.predictionType = v;
  }
  if (has('rescale_betas_zero_snr')) {
    if (typeof j.rescale_betas_zero_snr !== 'boolean') throw new TypeError("scheduler config: 'rescale_betas_zero_snr' must be a boolean");
    c.rescaleBetasZeroSnr = j.rescale_betas_zero_snr;
  }
  if (j.trained_betas !== undefined && j.trained_betas !== null) {
    const tb = j.trained_betas;
    if (!Array.isArray(tb) || tb.length === 0 || !tb.every((x): x is number => typeof x === 'number' && Number.isFinite(x))) {
      throw new TypeError("scheduler config: 'trained_betas' must be null or a non-empty array of numbers");
    }
    c.trainedBetas = tb;
  }
  return c;
}

// ------------------------------------------------------------------ schedule
export interface AddNoiseCoefficients {
  /** alphas_cumprod[t] ** 0.5, in the latents' dtype (values stored exactly in float32). */
  sqrtAlphaProd: Float32Array;
  /** (1 - alphas_cumprod[t]) ** 0.5, same. */
  sqrtOneMinusAlphaProd: Float32Array;
}

export class NoiseSchedule {
  readonly config: Readonly<NoiseScheduleConfig>;
  readonly numTrainTimesteps: number;
  readonly predictionType: PredictionType;
  readonly betas: Float32Array;
  readonly alphas: Float32Array;
  readonly alphasCumprod: Float32Array;
  private readonly snrTable: Float32Array;
  private readonly coefCache = new Map<NoiseDtype, AddNoiseCoefficients>();

  constructor(config: NoiseScheduleConfig, options: NoiseScheduleOptions = {}) {
    const linspace = options.linspace ?? 'fma';
    const cfg: NoiseScheduleConfig = { ...config, predictionType: options.predictionType ?? config.predictionType };
    if (!isOneOf(PREDICTION_TYPES, cfg.predictionType)) throw new RangeError(`unknown prediction type ${String(cfg.predictionType)}`);
    const n = cfg.numTrainTimesteps;
    let betas: Float32Array;
    if (cfg.trainedBetas !== null) {
      if (cfg.trainedBetas.length !== n) {
        throw new RangeError(`trained_betas has ${cfg.trainedBetas.length} values but num_train_timesteps is ${n}`);
      }
      betas = Float32Array.from(cfg.trainedBetas);
    } else {
      switch (cfg.betaSchedule) {
        case 'linear':
          betas = linspaceF32(cfg.betaStart, cfg.betaEnd, n, linspace);
          break;
        case 'scaled_linear':
          // Python's beta ** 0.5 is the correctly rounded sqrt.
          betas = linspaceF32(Math.sqrt(cfg.betaStart), Math.sqrt(cfg.betaEnd), n, linspace).map((x) => x * x);
          break;
        case 'squaredcos_cap_v2':
          betas = betasForAlphaBar(n, 'cosine');
          break;
        case 'laplace':
          betas = betasForAlphaBar(n, 'laplace');
          break;
        default:
          throw new RangeError(`unsupported beta_schedule ${String(cfg.betaSchedule)}`);
      }
    }
    if (cfg.rescaleBetasZeroSnr) betas = rescaleZeroTerminalSnr(betas);
    this.config = Object.freeze({ ...cfg, trainedBetas: cfg.trainedBetas && [...cfg.trainedBetas] });
    this.numTrainTimesteps = n;
    this.predictionType = cfg.predictionType;
    this.betas = betas;
    this.alphas = betas.map((b) => 1 - b);
    this.alphasCumprod = cumprodF32(this.alphas);
    // diffusers.training_utils.compute_snr: ((a ** 0.5) / ((1.0 - a) ** 0.5)) ** 2, all float32.
    this.snrTable = this.alphasCumprod.map((a) => {
      const q = f32(f32(Math.sqrt(a)) / f32(Math.sqrt(f32(1 - a))));
      return q * q;
    });
  }

  /** `DDPMScheduler.from_pretrained(..., subfolder="scheduler")` from the parsed scheduler_config.json. */
  static fromConfig(json: unknown, options: NoiseScheduleOptions = {}): NoiseSchedule {
    return new NoiseSchedule(parseSchedulerConfig(json), options);
  }

  static fromFile(configPath: string, options: NoiseScheduleOptions = {}): NoiseSchedule {
    let json: unknown;
    try {
      json = JSON.parse(fs.readFileSync(configPath, 'utf8'));
    } catch (e) {
      throw new Error(`cannot read scheduler config ${configPath}: ${(e as Error).message}`);
    }
    return NoiseSchedule.fromConfig(json, options);
  }

  /**
   * The per-timestep factors of add_noise / get_velocity: alphas_cumprod is cast to the latents'
   * dtype first (so fp16 latents get fp16 coefficients), then `** 0.5` and `(1 - a) ** 0.5` run in
   * that dtype (torch computes half/bfloat16 ops in float32 and rounds the result).
   */
  addNoiseCoefficients(dtype: NoiseDtype = 'float32'): AddNoiseCoefficients {
    const hit = this.coefCache.get(dtype);
    if (hit) return hit;
    const round = ROUND[dtype];
    if (!round) throw new RangeError(`unknown dtype ${String(dtype)}`);
    const n = this.numTrainTimesteps;
    const sqrtAlphaProd = new Float32Array(n);
    const sqrtOneMinusAlphaProd = new Float32Array(n);
    for (let t = 0; t < n; t++) {
      const a = round(this.alphasCumprod[t]);
      sqrtAlphaProd[t] = round(Math.sqrt(a));
      sqrtOneMinusAlphaProd[t] = round(Math.sqrt(round(1 - a)));
    }
    const res = { sqrtAlphaProd, sqrtOneMinusAlphaProd };
    this.coefCache.set(dtype, res);
    return res;
  }

  /** compute_snr(noise_scheduler, t) (float32). At a zero-terminal-SNR final step this is 0. */
  snr(t: number): number {
    return this.snrTable[this.checkT(t)];
  }

  /** compute_snr for every timestep 0..T-1 (a copy). */
  snrAll(): Float32Array {
    return this.snrTable.slice();
  }

  /**
   * Min-SNR-gamma loss weights as train_text_to_image_lora.py computes them (float32):
   *   w = min(snr, gamma);  epsilon: w / snr;  v_prediction: w / (snr + 1);  sample: w.
   * gamma is rounded to float32 first (gamma * ones_like(timesteps) is a float32 tensor).
   * epsilon at snr 0 (zero-terminal-SNR last step) gives NaN, exactly as in diffusers.
   */
  minSnrWeights(timesteps: ArrayLike<number>, snrGamma: number): Float32Array {
    if (!Number.isFinite(snrGamma)) throw new RangeError(`snr gamma must be finite, got ${snrGamma}`);
    const g = f32(snrGamma);
    const out = new Float32Array(timesteps.length);
    for (let i = 0; i < timesteps.length; i++) {
      const snr = this.snrTable[this.checkT(timesteps[i])];
      const w = Math.min(snr, g); // NaN-propagating, like torch.min
      if (this.predictionType === 'epsilon') out[i] = w / snr;
      else if (this.predictionType === 'v_prediction') out[i] = w / f32(snr + 1);
      else out[i] = w;
    }
    return out;
  }

  private checkT(t: number): number {
    if (!Number.isInteger(t) || t < 0 || t >= this.numTrainTimesteps) {
      throw new RangeError(`timestep ${t} out of range [0, ${this.numTrainTimesteps})`);
    }
    return t;
  }
}
