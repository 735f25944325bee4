/**
 * The inference schedulers (src/inference/schedulers.ts) driving the native sampler session with a fake model,
 * against diffusers' own schedulers (test/fixtures/sampling/scheduler_golden.json, made by
 * scripts/golden/make_scheduler_goldens.py): identical timesteps and init_noise_sigma, latents within 1e-5
 * relative error after every step.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import { makeSchedule, SCHEDULER_NAMES, type SchedulerName, type SchedulerOverrides } from '../src/inference/schedulers';
import { native, type HostTensor } from '../src/native';
import { fromFloat32, relativeErrorOf } from '../src/tensors';

const root = path.join(__dirname, '..');
interface Case {
  scheduler: SchedulerName;
  overrides: SchedulerOverrides;
  numInferenceSteps: number;
  timesteps: number[];
  initNoiseSigma: number;
  latents: string;
}
const golden = JSON.parse(fs.readFileSync(path.join(__dirname, 'fixtures', 'sampling', 'scheduler_golden.json'), 'utf8')) as {
  shape: number[];
  inputScale: number;
  seed: number;
  init: string;
  base: string;
  cases: Case[];
};
const sd15 = JSON.parse(fs.readFileSync(path.join(root, 'assets', 'sd15-model', 'scheduler', 'scheduler_config.json'), 'utf8')) as unknown;
const f32 = (b64: string): Float32Array => {
  const b = Buffer.from(b64, 'base64');
  return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
};
const values = (t: HostTensor): Float32Array => new Float32Array(t.data.buffer.slice(t.data.byteOffset, t.data.byteOffset + t.data.byteLength));

const relErr = relativeErrorOf;

const label = (c: Case): string => `${c.scheduler} ${JSON.stringify(c.overrides)}`;

describe('schedulers vs diffusers', () => {
  it('covers every scheduler with epsilon and v_prediction', () => {
    for (const name of SCHEDULER_NAMES)
      for (const pt of [undefined, 'v_prediction'])
        expect(golden.cases.some((c) => c.scheduler === name && c.overrides.prediction_type === pt && !c.overrides.timestep_spacing)).toBe(true);
  });

  it.each(golden.cases.map((c) => [label(c), c] as const))('%s', async (_, c) => {
    const s = makeSchedule(c.scheduler, sd15, c.numInferenceSteps, c.overrides);
    expect(s.timesteps).toEqual(c.timesteps);
    expect(Math.abs(s.initNoiseSigma - c.initNoiseSigma)).toBeLessThanOrEqual(1e-6 * c.initNoiseSigma);
    const n = native();
    const { sampler } = await n.samplerCreate(null, {
      latents: fromFloat32('latents', golden.shape, f32(golden.init)),
      initNoiseSigma: s.initNoiseSigma,
      seed: golden.seed,
      fakeModel: { base: fromFloat32('base', golden.shape, f32(golden.base)), inputScale: golden.inputScale },
    });
    const ref = f32(c.latents);
    const per = ref.length / s.steps.length;
    const errs: number[] = [];
    for (let i = 0; i < s.steps.length; i++) {
      await n.samplerStep(sampler, s.steps[i]);
      const x = values(await n.samplerLatents(sampler));
      errs.push(relErr(x, ref.subarray(i * per, (i + 1) * per)));
    }
    n.dispose(sampler);
    expect(errs).toHaveLength(c.timesteps.length);
    expect(Math.max(...errs)).toBeLessThan(1e-5);
  });

  it('the fake model is not trivial: a wrong coefficient is caught', async () => {
    const c = golden.cases.find((k) => k.scheduler === 'dpmpp_2m' && !k.overrides.prediction_type)!;
    const s = makeSchedule('dpmpp_2m', sd15, c.numInferenceSteps, {});
    const n = native();
    const { sampler } = await n.samplerCreate(null, {
      latents: fromFloat32('latents', golden.shape, f32(golden.init)),
      fakeModel: { base: fromFloat32('base', golden.shape, f32(golden.base)), inputScale: golden.inputScale },
    });
    const bad = s.steps.map((st) => ({ ...st, ops: st.ops.map((o) => (o.target === 'x' ? { ...o, terms: o.terms.map(([k, v]) => [k, v * 1.0001] as [string, number]) } : o)) }));
    for (const st of bad) await n.samplerStep(sampler, st);
    const x = values(await n.samplerLatents(sampler));
    n.dispose(sampler);
    const ref = f32(c.latents);
    const per = ref.length / s.steps.length;
    expect(relErr(x, ref.subarray(ref.length - per))).toBeGreaterThan(1e-5);
  });

  it('rejects unknown schedulers, unsupported options and bad step counts with clear errors', () => {
    expect(() => makeSchedule('heun' as SchedulerName, sd15, 10)).toThrow(/unknown scheduler "heun".*pndm, ddim, euler, euler_a, dpmpp_2m/);
    expect(() => makeSchedule('euler', sd15, 10, { use_karras_sigmas: true })).toThrow(/use_karras_sigmas is not supported/);
    expect(() => makeSchedule('ddim', sd15, 0)).toThrow(/positive integer/);
    expect(() => makeSchedule('ddim', sd15, 2000)).toThrow(/cannot exceed num_train_timesteps/);
    expect(() => makeSchedule('euler', sd15, 10, { timestep_spacing: 'weird' as 'leading' })).toThrow(/timestep_spacing/);
  });

  it('a sampler op reading a missing slot fails with the slot name', async () => {
    const n = native();
    const { sampler } = await n.samplerCreate(null, {
      latents: fromFloat32('latents', [1, 1, 2, 2], [1, 2, 3, 4]),
      fakeModel: { base: fromFloat32('base', [1, 1, 2, 2], [0, 0, 0, 0]), inputScale: 1 },
    });
    await expect(n.samplerStep(sampler, { timestep: 1, modelInputScale: 1, ops: [{ target: 'x', terms: [['nope', 1]] }] })).rejects.toThrow(/slot "nope"/);
    n.dispose(sampler);
  });
});
