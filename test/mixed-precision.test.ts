/**
 * Mixed precision on the CPU (the code path CUDA and MPS take: autocast around the UNet, fp32 master weights, fp16
 * dynamic loss scaling), device and precision defaults, TF32 and cross-device resume notes.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { makeDemoData } from '../src/data/demo-data';
import { planPrecision, resolveDevice } from '../src/device';
import { native, type DeviceInfo, type HostTensor, type TrainBatch } from '../src/native';
import { byName, relativeErrorOf, toNumbers } from '../src/tensors';
import { NoiseSchedule } from '../src/schedules/noise';
import { crossDeviceNotes, train } from '../src/train/train';
import { Quiet } from './helpers/quiet-reporter';
import { TINY_MODEL, tinyRunConfig } from './helpers/tiny-run';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-mixed-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
const data = path.join(tmp, 'data');
beforeAll(async () => {
  await makeDemoData(data, { count: 16, size: 32, seed: 3 });
});

const cpu: DeviceInfo = { type: 'cpu', index: 0, available: true, bf16: true };
const h200: DeviceInfo = { type: 'cuda', index: 0, available: true, name: 'NVIDIA H200', computeCapability: '9.0', bf16: true };
const t4: DeviceInfo = { type: 'cuda', index: 0, available: true, name: 'Tesla T4', computeCapability: '7.5', bf16: false };
const noCuda: DeviceInfo = { type: 'cuda', index: 0, available: false, reason: 'this libtorch build has no CUDA backend (a CPU build)' };
const noMps: DeviceInfo = { type: 'mps', index: 0, available: false, reason: 'MPS (Apple Metal) exists only on macOS' };
const mps: DeviceInfo = { type: 'mps', index: 0, available: true, name: 'Apple MPS', bf16: true };

describe('precision defaults by device', () => {
  test('CUDA: bf16 where the GPU has it, else fp16; MPS and CPU: fp32', () => {
    expect(planPrecision('auto', 'cuda', [cpu, h200, noMps], 'lora')).toMatchObject({ mixed: 'bf16', weightDtype: 'bf16' });
    expect(planPrecision('auto', 'cuda:0', [cpu, t4, noMps], 'lora')).toMatchObject({ mixed: 'fp16', weightDtype: 'fp16' });
    expect(planPrecision('auto', 'mps', [cpu, noCuda, mps], 'lora')).toMatchObject({ mixed: 'no', weightDtype: 'fp32' });
    expect(planPrecision('auto', 'cpu', [cpu, noCuda, noMps], 'lora')).toMatchObject({ mixed: 'no', weightDtype: 'fp32' });
    expect(planPrecision('auto', 'cuda', [cpu, h200], 'lora').description).toMatch(/bf16 autocast.*NVIDIA H200, compute capability 9\.0/);
  });
  test('full mode keeps fp32 master weights under autocast; fp16 says it scales the loss', () => {
    const p = planPrecision('fp16', 'cpu', [cpu], 'full');
    expect(p).toMatchObject({ mixed: 'fp16', weightDtype: 'fp32' });
    expect(p.description).toMatch(/fp16 autocast, frozen weights fp32, UNet weights fp32 \(master weights\), dynamic loss scaling/);
  });
  test('fp16 on MPS warns about NaN; bf16 on a GPU without bf16 warns it is slow', () => {
    expect(planPrecision('fp16', 'mps', [cpu, mps], 'lora').warnings.join()).toMatch(/known to produce NaN/);
    expect(planPrecision('bf16', 'cuda', [cpu, t4], 'lora').warnings.join()).toMatch(/no bf16 tensor cores/);
    expect(planPrecision('bf16', 'cpu', [cpu], 'lora').warnings).toEqual([]);
  });
});

describe('--device', () => {
  test('auto picks CUDA, then MPS, then the CPU', async () => {
    expect(await resolveDevice('auto', [cpu, h200, noMps])).toBe('cuda');
    expect(await resolveDevice('auto', [cpu, noCuda, mps])).toBe('mps');
    expect(await resolveDevice('auto', [cpu, noCuda, noMps])).toBe('cpu');
  });
  test('a missing device is a clear error saying why and what to do', async () => {
    await expect(resolveDevice('cuda', [cpu, noCuda, noMps])).rejects.toThrow(/--device cuda: this libtorch build has no CUDA backend.*Fix: use --device cpu, or rebuild/);
    await expect(resolveDevice('mps', [cpu, noCuda, noMps])).rejects.toThrow(/--device mps: MPS \(Apple Metal\) exists only on macOS.*Fix: use --device cpu/);
    await expect(resolveDevice('cuda:3', [cpu, h200])).rejects.toThrow(/--device cuda:3: this machine has 1 CUDA device\(s\) \(cuda:0\)/);
    await expect(resolveDevice('gpu', [cpu])).rejects.toThrow(/not a device name/);
  });
  test('this build tells the truth about itself', async () => {
    const devs = await native().devices();
    const c = devs.find((d) => d.type === 'cpu')!;
    expect(c).toMatchObject({ available: true, bf16: true });
    if (!devs.some((d) => d.type === 'cuda' && d.available)) await expect(resolveDevice('cuda')).rejects.toThrow(/--device cuda: .*(no CUDA backend|no CUDA device)/);
  });
});

test('--allow-tf32 sets both cuBLAS and cuDNN TF32 (off by default), and says it does nothing off CUDA', async () => {
  expect(await native().setAllowTf32(true)).toEqual({ cublas: true, cudnn: true });
  expect(await native().setAllowTf32(false)).toEqual({ cublas: false, cudnn: false });
  const rep = new Quiet();
  await train(tinyRunConfig(path.join(tmp, 'tf32'), data, { allow_tf32: true, max_train_steps: 1 }), rep, { installSignalHandlers: false });
  expect(rep.messages.join('\n')).toMatch(/--allow-tf32 has no effect on cpu/);
  expect(await native().setAllowTf32(false)).toEqual({ cublas: false, cudnn: false });
}, 300000);

describe('fp16 dynamic loss scaling (torch.amp.GradScaler semantics)', () => {
  const golden = path.join(__dirname, 'fixtures', 'golden', 'train');
  async function setup(lossScaling: { initScale: number; growthInterval: number }) {
    const inputs = byName((await native().safetensorsRead(path.join(golden, 'inputs.safetensors'))).tensors);
    const noise = NoiseSchedule.fromFile(path.join(TINY_MODEL, 'scheduler', 'scheduler_config.json'));
    const pipe = await native().loadPipeline(TINY_MODEL, { components: ['unet', 'text_encoder'], dtype: 'fp16' });
    const { trainer } = await native().createTrainer(pipe, { rank: 4, alphasCumprod: Array.from(noise.alphasCumprod), mixedPrecision: 'fp16', seed: 1, lossScaling });
    const batch = (i: number): TrainBatch => ({ latents: inputs.get(`latents.${i}`)!, noise: inputs.get(`noise.${i}`)!, timesteps: inputs.get(`timesteps.${i}`)!, inputIds: inputs.get(`input_ids.${i}`)! });
    return { pipe, trainer, batch };
  }
  const nanLike = (t: HostTensor): HostTensor => {
    const v = new Float32Array(new Uint8Array(t.data).buffer); // a copy (Buffer#slice would be a view)
    v[0] = NaN;
    v[1] = Infinity;
    return { ...t, dtype: 'F32', data: new Uint8Array(v.buffer) };
  };
  const weights = async (trainer: Parameters<ReturnType<typeof native>['trainerSaveState']>[0], dir: string) => {
    fs.mkdirSync(dir, { recursive: true });
    await native().trainerSaveState(trainer, dir);
    return (await native().safetensorsRead(path.join(dir, 'model.safetensors'))).tensors.map((t) => Array.from(toNumbers(t)));
  };

  test('non-finite gradients halve the scale and skip the update; the scale grows after the growth interval; the state round-trips', async () => {
    const { pipe, trainer, batch } = await setup({ initScale: 1024, growthInterval: 2 });
    await native().trainerMicroStep(trainer, batch(0));
    let r = await native().trainerOptimizerStep(trainer, 1e-3);
    expect(r).toMatchObject({ skipped: false, lossScale: 1024, optimizerSteps: 1 });
    const before = await weights(trainer, path.join(tmp, 'scaler-a'));
    // Injected inf/NaN (a NaN in the noise makes every gradient non-finite): no update, scale x0.5, the step count holds.
    const b = batch(1);
    expect(Number.isFinite(await native().trainerMicroStep(trainer, { ...b, noise: nanLike(b.noise!) }))).toBe(false);
    r = await native().trainerOptimizerStep(trainer, 1e-3);
    expect(r).toMatchObject({ skipped: true, lossScale: 512, optimizerSteps: 1 });
    expect(Number.isNaN(r.gradNorm)).toBe(true);
    expect(await weights(trainer, path.join(tmp, 'scaler-b'))).toEqual(before);
    // Two good steps in a row (the growth interval): x2.
    for (const i of [2, 3]) {
      await native().trainerMicroStep(trainer, batch(i));
      r = await native().trainerOptimizerStep(trainer, 1e-3);
      expect(r.skipped).toBe(false);
    }
    expect(r).toMatchObject({ lossScale: 1024, optimizerSteps: 3 });
    await native().trainerMicroStep(trainer, batch(4));
    r = await native().trainerOptimizerStep(trainer, 1e-3);
    expect(r.lossScale).toBe(1024); // growth tracker restarted at the doubling
    fs.mkdirSync(path.join(tmp, 'scaler-c'));
    const st = await native().trainerSaveState(trainer, path.join(tmp, 'scaler-c'));
    expect(st.scaler).toEqual({ enabled: true, scale: 1024, growthTracker: 1 });
    // Into a fresh trainer: the next good step doubles the scale there too (tracker 1 + 1 = the interval).
    const fresh = await setup({ initScale: 65536, growthInterval: 2 });
    await native().trainerLoadState(fresh.trainer, path.join(tmp, 'scaler-c'), { optimizerSteps: st.optimizerSteps, scaler: st.scaler, rng: st.rng });
    await native().trainerMicroStep(fresh.trainer, batch(5));
    expect(await native().trainerOptimizerStep(fresh.trainer, 1e-3)).toMatchObject({ skipped: false, lossScale: 2048, optimizerSteps: 5 });
    native().dispose(pipe);
    native().dispose(fresh.pipe);
  }, 300000);

  test('a skipped step does not advance the LR schedule, and the checkpoint records it', async () => {
    const out = path.join(tmp, 'fp16-skip');
    const rep = new Quiet();
    const cfg = tinyRunConfig(out, data, { mixed_precision: 'fp16', max_train_steps: 4, lr_scheduler: 'linear', lr_warmup_steps: 0, checkpointing_steps: 4 });
    await train(cfg, rep, { installSignalHandlers: false, batchHook: (step, b) => (step === 2 ? { ...b, pixelValues: nanLike(b.pixelValues!) } : b) });
    expect(rep.steps.map((m) => m.skipped)).toEqual([false, true, false, false]);
    const lrs = rep.steps.map((m) => m.lr);
    expect(lrs[2]).toBe(lrs[1]); // the schedule held at step 2's value
    expect(lrs[1]).toBeLessThan(lrs[0]);
    expect(rep.steps[1].lossScale).toBe(rep.steps[0].lossScale / 2);
    expect(rep.messages.join('\n')).toMatch(/step 2: .*update skipped.*the LR schedule held/);
    const sched = JSON.parse(fs.readFileSync(path.join(out, 'checkpoints', 'checkpoint-4', 'scheduler.json'), 'utf8'));
    expect(sched.scheduler_steps).toBe(3);
  }, 300000);
});

describe('mixed precision training follows fp32', () => {
  async function run(name: string, over: Record<string, unknown>) {
    const out = path.join(tmp, name);
    const rep = new Quiet();
    await train(tinyRunConfig(out, data, { max_train_steps: 3, checkpointing_steps: 3, center_crop: true, ...over }), rep, { installSignalHandlers: false });
    const model = (await native().safetensorsRead(path.join(out, 'checkpoints', 'checkpoint-3', 'model.safetensors'))).tensors;
    return { rep, weights: Float64Array.from(model.flatMap((t) => Array.from(toNumbers(t)))), dtypes: new Set(model.map((t) => t.dtype)) };
  }
  // Tolerance: 3 AdamW steps from the same start; bf16 rounds to 8 mantissa bits (2^-9 ≈ 2e-3 relative per op), fp16 to
  // 11. Relative error of all trained weights against the fp32 run, measured on torch 2.13 CPU: LoRA bf16 1.4e-3;
  // full bf16 5.1e-4, full fp16 3.0e-4. A run that silently stayed fp32 gives exactly 0.
  test('--mixed-precision bf16 (LoRA): the same trajectory within 1e-2, and not bit-equal (autocast really ran)', async () => {
    const a = await run('lora-fp32', { mixed_precision: 'no' });
    const b = await run('lora-bf16', { mixed_precision: 'bf16' });
    expect(b.rep.messages.join('\n')).toMatch(/precision: bf16 autocast, frozen weights bf16, LoRA weights fp32 \(--mixed-precision bf16\)/);
    expect(b.dtypes).toEqual(new Set(['F32']));
    const err = relativeErrorOf(b.weights, a.weights);
    expect(err).toBeGreaterThan(0);
    expect(err).toBeLessThan(1e-2);
    b.rep.steps.forEach((m, i) => expect(Math.abs(m.loss - a.rep.steps[i].loss)).toBeLessThan(0.05 * a.rep.steps[i].loss));
  }, 300000);

  test('--train-mode full with bf16 and fp16: autocast on fp32 master weights, never a silent fp32 run', async () => {
    const a = await run('full-fp32', { train_mode: 'full', learning_rate: 1e-4 });
    for (const mp of ['bf16', 'fp16'] as const) {
      const b = await run(`full-${mp}`, { train_mode: 'full', learning_rate: 1e-4, mixed_precision: mp });
      expect(b.rep.messages.join('\n')).toMatch(new RegExp(`precision: ${mp} autocast, frozen weights fp32, UNet weights fp32 \\(master weights\\)`));
      expect(b.dtypes).toEqual(new Set(['F32']));
      const err = relativeErrorOf(b.weights, a.weights);
      expect(err).toBeGreaterThan(0);
      expect(err).toBeLessThan(3e-3);
    }
  }, 600000);

  // Without the forward's autocast state in the recomputation, bf16 activations meet fp32 LoRA weights and the
  // backward throws (dtype mismatch). Measured: 3.1e-4 (bf16) against 4.8e-7 for fp32 with and without checkpointing
  // (a different order of accumulation in backward), i.e. bf16 rounding of the same computation.
  test('gradient checkpointing recomputes under the forward autocast: the same trajectory as without it', async () => {
    const a = await run('bf16-nockpt', { mixed_precision: 'bf16' });
    const b = await run('bf16-ckpt', { mixed_precision: 'bf16', gradient_checkpointing: true });
    expect(relativeErrorOf(b.weights, a.weights)).toBeLessThan(2e-3);
  }, 300000);
});

test('resuming on another device type says what cannot be bit-exact', () => {
  const cfg = tinyRunConfig('/x', '/y');
  expect(crossDeviceNotes({ device: 'cuda:0', config: cfg }, { cpu: 'a', 'cuda:0': 'b' }, 'cpu', { cpu: 'c' }).join()).toMatch(
    /trained on cuda:0 and resumes on cpu: weights, optimizer, LR schedule, loss scaler and data position continue exactly, but noise .* not be bit-identical/,
  );
  expect(crossDeviceNotes({ device: 'cuda:0', config: cfg }, { cpu: 'a', 'cuda:0': 'b', 'cuda:1': 'c' }, 'cuda:0', { cpu: 'c', 'cuda:0': 'd' }).join()).toMatch(/random streams cuda:1 .* not restored/);
  expect(crossDeviceNotes({ device: 'cpu', config: cfg }, { cpu: 'a' }, 'cpu', { cpu: 'b' })).toEqual([]);
});
