import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import {
  fmaF32,
  linspaceF32,
  NoiseDtype,
  NoiseSchedule,
  parseSchedulerConfig,
  PredictionType,
  roundToBfloat16,
  roundToFloat16,
} from '../src/schedules/noise';

// Goldens from diffusers' DDPMScheduler / compute_snr / the LoRA script's min-SNR lines:
// scripts/golden/make_schedule_goldens.py (see there for the "ieee" vs "cpu_sqrt" runs).
interface Sparse {
  idx: number[];
  val: string;
}
interface GoldenConfig {
  config: Record<string, unknown>;
  prediction_type: PredictionType;
  betas: string;
  alphas_cumprod: string;
  snr: string;
  min_snr_weights: Record<string, string>;
  [key: string]: unknown;
}
interface Golden {
  capability: string;
  configs: Record<string, GoldenConfig>;
  cpu_sqrt: { configs: Record<string, Record<string, Sparse | Record<string, Sparse>>> };
  default_capability: { capability: string; configs: Record<string, { betas: string; alphas_cumprod: string }> };
}
const G: Golden = JSON.parse(fs.readFileSync(path.join(__dirname, 'fixtures', 'schedules', 'noise_golden.json'), 'utf8'));

function f32(b64: string): Float32Array {
  const u = Buffer.from(b64, 'base64');
  return new Float32Array(u.buffer.slice(u.byteOffset, u.byteOffset + u.length));
}

/** Index of the first entry whose float32 bits differ (NaN == NaN), or -1. */
function firstBitDiff(a: Float32Array, b: Float32Array): number {
  if (a.length !== b.length) return Math.min(a.length, b.length);
  const ua = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const ub = new Uint32Array(b.buffer, b.byteOffset, b.length);
  for (let i = 0; i < a.length; i++) if (ua[i] !== ub[i] && !(Number.isNaN(a[i]) && Number.isNaN(b[i]))) return i;
  return -1;
}

function expectBitEqual(got: Float32Array, want: Float32Array, what: string): void {
  const i = firstBitDiff(got, want);
  if (i >= 0) throw new Error(`${what}: differs at [${i}]: ${got[i]} vs ${want[i]} (lengths ${got.length}/${want.length})`);
}

/** Largest |a - b| in units of b's float32 ulp. */
function maxUlps(a: Float32Array, b: Float32Array): number {
  let worst = 0;
  for (let i = 0; i < a.length; i++) {
    if (Object.is(a[i], b[i]) || (Number.isNaN(a[i]) && Number.isNaN(b[i]))) continue;
    const ulp = 2 ** (Math.floor(Math.log2(Math.abs(b[i]))) - 23);
    worst = Math.max(worst, Math.abs(a[i] - b[i]) / ulp);
  }
  return worst;
}

function applySparse(base: Float32Array, d: Sparse | undefined): Float32Array {
  const out = base.slice();
  if (d) {
    const v = f32(d.val);
    d.idx.forEach((i, k) => (out[i] = v[k]));
  }
  return out;
}

const timesteps = (n: number): number[] => Array.from({ length: n }, (_, i) => i);
const DTYPES: NoiseDtype[] = ['float32', 'float16', 'bfloat16'];

describe('noise schedule vs diffusers DDPMScheduler (correctly rounded sqrt, as on CUDA)', () => {
  test('fixture has SD 1.5, a linear config and the odd ones', () => {
    expect(Object.keys(G.configs)).toEqual(
      expect.arrayContaining(['sd15', 'ddpm_linear', 'cosine_v', 'zero_snr_v', 'trained', 'laplace', 'scaled_linear_odd']),
    );
    expect(G.configs.sd15.config._class_name).toBe('PNDMScheduler');
  });

  describe.each(Object.entries(G.configs))('%s', (_name, c) => {
    const s = NoiseSchedule.fromConfig(c.config);

    test('betas and alphas_cumprod are bit-identical', () => {
      expect(s.predictionType).toBe(c.prediction_type);
      expectBitEqual(s.betas, f32(c.betas), 'betas');
      expectBitEqual(s.alphasCumprod, f32(c.alphas_cumprod), 'alphas_cumprod');
    });

    test('add_noise coefficients are bit-identical per latent dtype', () => {
      let checked = 0;
      for (const dt of DTYPES) {
        const a = c[`sqrt_alpha_prod/${dt}`];
        if (typeof a !== 'string') continue;
        const k = s.addNoiseCoefficients(dt);
        expectBitEqual(k.sqrtAlphaProd, f32(a), `sqrt_alpha_prod/${dt}`);
        expectBitEqual(k.sqrtOneMinusAlphaProd, f32(c[`sqrt_one_minus_alpha_prod/${dt}`] as string), `sqrt_one_minus_alpha_prod/${dt}`);
        checked++;
      }
      expect(checked).toBeGreaterThanOrEqual(1);
    });

    test('compute_snr and min-SNR weights are bit-identical', () => {
      expectBitEqual(s.snrAll(), f32(c.snr), 'snr');
      const ts = timesteps(s.numTrainTimesteps);
      for (const [key, w] of Object.entries(c.min_snr_weights)) {
        const [pred, gamma] = key.split('/');
        const sp = NoiseSchedule.fromConfig(c.config, { predictionType: pred as PredictionType });
        expectBitEqual(sp.minSnrWeights(ts, Number(gamma)), f32(w), `weights ${key}`);
      }
    });
  });
});

describe("noise schedule vs torch's own CPU sqrt (MKL, not correctly rounded)", () => {
  // rescale_betas_zero_snr runs sqrt inside the schedule itself, so its errors compound a little.
  test.each(Object.keys(G.configs))('%s: within 1 ulp (sqrt) / 4 ulp (snr, weights); betas exact; looser when rescaled', (name) => {
    const c = G.configs[name];
    const cpu = G.cpu_sqrt.configs[name] ?? {};
    const s = NoiseSchedule.fromConfig(c.config);
    const sparse = (k: string): Sparse | undefined => cpu[k] as Sparse | undefined;
    const rescaled = c.config.rescale_betas_zero_snr === true;
    if (!rescaled) {
      expect(sparse('betas')).toBeUndefined();
      expect(sparse('alphas_cumprod')).toBeUndefined();
    }
    const tol = rescaled ? 4 : 1;
    expect(maxUlps(s.alphasCumprod, applySparse(f32(c.alphas_cumprod), sparse('alphas_cumprod')))).toBeLessThanOrEqual(tol);
    const k = s.addNoiseCoefficients('float32');
    expect(maxUlps(k.sqrtAlphaProd, applySparse(f32(c['sqrt_alpha_prod/float32'] as string), sparse('sqrt_alpha_prod/float32')))).toBeLessThanOrEqual(tol);
    expect(
      maxUlps(k.sqrtOneMinusAlphaProd, applySparse(f32(c['sqrt_one_minus_alpha_prod/float32'] as string), sparse('sqrt_one_minus_alpha_prod/float32'))),
    ).toBeLessThanOrEqual(tol);
    const snrTol = rescaled ? 16 : 4;
    expect(maxUlps(s.snrAll(), applySparse(f32(c.snr), sparse('snr')))).toBeLessThanOrEqual(snrTol);
    const cw = (cpu.min_snr_weights ?? {}) as Record<string, Sparse>;
    for (const [key, w] of Object.entries(c.min_snr_weights)) {
      const [pred, gamma] = key.split('/');
      const got = NoiseSchedule.fromConfig(c.config, { predictionType: pred as PredictionType }).minSnrWeights(timesteps(s.numTrainTimesteps), Number(gamma));
      expect(maxUlps(got, applySparse(f32(w), cw[key]))).toBeLessThanOrEqual(snrTol);
    }
  });
});

describe('torch.linspace kernels', () => {
  test('golden was made with a SIMD (FMA) kernel and the no-SIMD one differs', () => {
    expect(G.capability).toMatch(/AVX2|AVX512/);
    expect(G.default_capability.capability).toBe('DEFAULT');
    const fma = NoiseSchedule.fromConfig(G.configs.sd15.config, { linspace: 'fma' });
    const sep = NoiseSchedule.fromConfig(G.configs.sd15.config, { linspace: 'separate' });
    expect(firstBitDiff(fma.betas, sep.betas)).toBeGreaterThanOrEqual(0);
  });

  test.each(Object.keys(G.default_capability.configs))("'separate' matches ATEN_CPU_CAPABILITY=default for %s", (name) => {
    const d = G.default_capability.configs[name];
    const s = NoiseSchedule.fromConfig(G.configs[name].config, { linspace: 'separate' });
    const rescaled = G.configs[name].config.rescale_betas_zero_snr === true;
    if (rescaled) {
      // the rescale also runs torch's CPU sqrt (see above): only a few-ulp bound is possible
      expect(maxUlps(s.alphasCumprod, f32(d.alphas_cumprod))).toBeLessThanOrEqual(4);
    } else {
      expectBitEqual(s.betas, f32(d.betas), `${name} betas`);
      expectBitEqual(s.alphasCumprod, f32(d.alphas_cumprod), `${name} alphas_cumprod`);
    }
  });

  test('edge sizes', () => {
    expect(Array.from(linspaceF32(0.1, 0.2, 1))).toEqual([Math.fround(0.1)]);
    expect(linspaceF32(0.1, 0.2, 0).length).toBe(0);
    const two = linspaceF32(0.1, 0.2, 2);
    expect(Array.from(two)).toEqual([Math.fround(0.1), Math.fround(0.2)]);
    const l = linspaceF32(0, 1, 5);
    expect(Array.from(l)).toEqual([0, 0.25, 0.5, 0.75, 1]);
  });
});

describe('float helpers', () => {
  test('fmaF32 avoids double rounding', () => {
    const a = 1 + 2 ** -23;
    const b = 2 ** -24 * (1 - 2 ** -23);
    const c = 1 + 2 ** -23;
    // exact a*b + c = 1 + 2^-23 + 2^-24 - 2^-70: just below the tie, so it rounds down...
    expect(fmaF32(a, b, c)).toBe(1 + 2 ** -23);
    // ...while rounding the double sum (exactly the tie) goes to even.
    expect(Math.fround(a * b + c)).toBe(1 + 2 ** -22);
    expect(fmaF32(2, 3, 1)).toBe(7);
    expect(fmaF32(-0.5, 2, 1)).toBe(0);
  });

  test('float16 / bfloat16 rounding is round-to-nearest-even', () => {
    expect(roundToFloat16(1 + 2 ** -11)).toBe(1);
    expect(roundToFloat16(1 + 3 * 2 ** -11)).toBe(1 + 2 ** -9);
    expect(roundToFloat16(65519)).toBe(65504);
    expect(roundToFloat16(65520)).toBe(Infinity);
    expect(roundToFloat16(-(2 ** -25))).toBe(-0);
    expect(roundToFloat16(3 * 2 ** -25)).toBe(2 ** -23);
    expect(roundToFloat16(0.1)).toBe(0.0999755859375);
    expect(roundToBfloat16(1 + 2 ** -8)).toBe(1);
    expect(roundToBfloat16(1 + 3 * 2 ** -8)).toBe(1 + 2 ** -6);
    expect(roundToBfloat16(0.1)).toBe(0.10009765625);
  });
});

describe('config handling and min-SNR semantics', () => {
  test('DDPMScheduler defaults for missing keys; PNDM-only keys are ignored', () => {
    // The reference: the golden's ddpm_linear config spells out DDPMScheduler's defaults, and diffusers gave an empty
    // config (linear_defaults) the very same schedule.
    const ddpm = G.configs.ddpm_linear;
    expect([G.configs.linear_defaults.betas, G.configs.linear_defaults.prediction_type]).toEqual([ddpm.betas, ddpm.prediction_type]);
    expect(parseSchedulerConfig({ skip_prk_steps: true, _class_name: 'PNDMScheduler' })).toEqual({
      ...parseSchedulerConfig(ddpm.config),
      trainedBetas: null,
      rescaleBetasZeroSnr: false,
    });
  });

  test('bad configs are refused with the key in the message', () => {
    expect(() => parseSchedulerConfig({ beta_schedule: 'sigmoid' })).toThrow(/beta_schedule "sigmoid"/);
    expect(() => parseSchedulerConfig({ prediction_type: 'x0' })).toThrow(/prediction_type/);
    expect(() => parseSchedulerConfig({ num_train_timesteps: 0 })).toThrow(/num_train_timesteps/);
    expect(() => parseSchedulerConfig({ beta_start: '0.1' })).toThrow(/beta_start/);
    expect(() => parseSchedulerConfig({ trained_betas: [0.1, 'x'] })).toThrow(/trained_betas/);
    expect(() => parseSchedulerConfig([])).toThrow(/object/);
    expect(() => NoiseSchedule.fromConfig({ trained_betas: [0.1, 0.2], num_train_timesteps: 3 })).toThrow(/trained_betas has 2/);
  });

  test('fromFile reads scheduler_config.json; --prediction-type overrides', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'sched-'));
    const file = path.join(dir, 'scheduler_config.json');
    fs.writeFileSync(file, JSON.stringify(G.configs.sd15.config));
    const s = NoiseSchedule.fromFile(file, { predictionType: 'v_prediction' });
    expect(s.predictionType).toBe('v_prediction');
    expectBitEqual(s.alphasCumprod, f32(G.configs.sd15.alphas_cumprod), 'alphas_cumprod');
    expect(() => NoiseSchedule.fromFile(path.join(dir, 'missing.json'))).toThrow(/cannot read scheduler config/);
  });

  test('min-SNR weights: epsilon = min(snr, g)/snr, v = min(snr, g)/(snr+1); NaN at zero terminal SNR', () => {
    const eps = NoiseSchedule.fromConfig(G.configs.sd15.config);
    const t = [0, 100, 500, 999];
    const w = eps.minSnrWeights(t, 5);
    t.forEach((ti, i) => {
      const snr = eps.snr(ti);
      expect(w[i]).toBe(Math.fround(Math.min(snr, 5) / snr));
    });
    expect(w[0]).toBeLessThan(1); // low noise: snr > 5
    expect(w[3]).toBe(1); // high noise: snr < 5
    const z = NoiseSchedule.fromConfig(G.configs.zero_snr_v.config);
    expect(z.snr(999)).toBe(0);
    expect(z.minSnrWeights([999], 5)[0]).toBe(0);
    const zEps = NoiseSchedule.fromConfig(G.configs.zero_snr_v.config, { predictionType: 'epsilon' });
    expect(Number.isNaN(zEps.minSnrWeights([999], 5)[0])).toBe(true);
    expect(() => eps.minSnrWeights([1000], 5)).toThrow(/out of range/);
    expect(() => eps.minSnrWeights([1.5], 5)).toThrow(/out of range/);
    expect(() => eps.minSnrWeights([1], NaN)).toThrow(/gamma/);
  });
});
