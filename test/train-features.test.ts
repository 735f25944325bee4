/** Training features on the tiny model (CPU): learning, --cache-latents, --init-lora-weights, fp16 loss scaling. */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { makeDemoData } from '../src/data/demo-data';
import { native } from '../src/native';
import { relativeErrorOf } from '../src/tensors';
import { train, type StepMetrics } from '../src/train/train';
import { Quiet } from './helpers/quiet-reporter';
import { TINY_MODEL, tinyRunConfig } from './helpers/tiny-run';
import { tinyUnetOut } from './helpers/tiny-unet';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-feat-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
const model = TINY_MODEL;
const data = path.join(tmp, 'data');

const cfg = (out: string, over: Record<string, unknown> = {}) => tinyRunConfig(out, data, over);

beforeAll(async () => {
  await makeDemoData(data, { count: 24, size: 32, seed: 2 });
});

test('the loss goes down over 200 steps on the learnable synthetic shapes', async () => {
  const rep = new Quiet();
  await train(cfg(path.join(tmp, 'learn'), { max_train_steps: 200, checkpointing_steps: 100, lr_scheduler: 'cosine', lr_warmup_steps: 10, random_flip: true }), rep, { installSignalHandlers: false });
  const mean = (a: StepMetrics[]) => a.reduce((s, m) => s + m.loss, 0) / a.length;
  const first = mean(rep.steps.slice(0, 20));
  const last = mean(rep.steps.slice(-20));
  expect(last).toBeLessThan(first * 0.85);
}, 600000);

describe('--cache-latents', () => {
  test('needs center crop and no flips', async () => {
    await expect(train(cfg(path.join(tmp, 'cache-bad'), { cache_latents: true, random_flip: true }), new Quiet(), { installSignalHandlers: false })).rejects.toThrow(/--cache-latents .* needs --center-crop and no --random-flip/);
  });

  test('trains from cached posteriors and resumes exactly', async () => {
    const straight = path.join(tmp, 'cache-straight');
    const rep = new Quiet();
    await train(cfg(straight, { cache_latents: true, center_crop: true }), rep, { installSignalHandlers: false });
    expect(rep.messages.some((m) => /--cache-latents: encoded 24 images once/.test(m))).toBe(true);
    const resumed = path.join(tmp, 'cache-resumed');
    const a = new Quiet();
    await train(cfg(resumed, { cache_latents: true, center_crop: true }), a, { installSignalHandlers: false, stopAtStep: 1 });
    const b = new Quiet();
    await train(cfg(resumed, { cache_latents: true, center_crop: true, resume_from_checkpoint: 'latest' }), b, { installSignalHandlers: false });
    expect([...a.steps, ...b.steps].map((m) => m.loss)).toEqual(rep.steps.map((m) => m.loss));
    const file = (d: string) => fs.readFileSync(path.join(d, 'pytorch_lora_weights.safetensors'));
    expect(file(resumed).equals(file(straight))).toBe(true);
    // Different from decoding images every step (the noise of latent sampling is the same, the pixels are not flipped/cropped differently,
    // but the runs must at least both learn something finite).
    expect(rep.steps.every((m) => Number.isFinite(m.loss))).toBe(true);
  }, 300000);
});

test('--init-lora-weights starts from a LoRA file in any format (diffusers, PEFT, kohya)', async () => {
  const src = path.join(tmp, 'init-src');
  await train(cfg(src, { lora_alpha: 8, save_format: ['diffusers', 'peft', 'kohya'] }), new Quiet(), { installSignalHandlers: false });
  const want = await tinyUnetOut(path.join(src, 'pytorch_lora_weights.safetensors'));
  for (const f of ['pytorch_lora_weights.safetensors', 'lora_weights/adapter_model.safetensors', 'lora_kohya.safetensors']) {
    // lr 0 and one step: the adapters stay exactly what was loaded (alpha 16 here: B is rescaled to keep the function).
    const out = path.join(tmp, `init-${path.basename(f, '.safetensors')}`);
    const rep = new Quiet();
    await train(cfg(out, { init_lora_weights: path.join(src, f), lora_alpha: 16, learning_rate: 1e-12, max_train_steps: 1, adam_weight_decay: 0 }), rep, { installSignalHandlers: false });
    expect(rep.messages.some((m) => /initialized 48 LoRA modules/.test(m))).toBe(true);
    const got = await tinyUnetOut(path.join(out, 'pytorch_lora_weights.safetensors'));
    const a = new Float32Array(got.buffer, got.byteOffset, got.length / 4);
    const b = new Float32Array(want.buffer, want.byteOffset, want.length / 4);
    expect({ f, rel: relativeErrorOf(a, b) < 1e-5 }).toEqual({ f, rel: true });
  }
}, 300000);

test('fp16 mixed precision keeps LoRA in fp32 and records the loss scaler', async () => {
  const out = path.join(tmp, 'fp16');
  const rep = new Quiet();
  await train(cfg(out, { mixed_precision: 'fp16', max_train_steps: 2 }), rep, { installSignalHandlers: false });
  expect(rep.steps.every((m) => Number.isFinite(m.loss))).toBe(true);
  const scaler = JSON.parse(fs.readFileSync(path.join(out, 'checkpoints', 'checkpoint-2', 'scaler.json'), 'utf8'));
  expect(scaler.enabled).toBe(true);
  expect(scaler.scale).toBeGreaterThan(1);
  const h = await native().safetensorsHeader(path.join(out, 'checkpoints', 'checkpoint-2', 'model.safetensors'));
  expect(new Set(h.tensors.map((t) => t.dtype))).toEqual(new Set(['F32']));
}, 300000);

test('--train-mode full trains every UNet weight, checkpoints them all, and resumes exactly', async () => {
  const over = { train_mode: 'full', learning_rate: 1e-4, max_train_steps: 4 };
  const straight = path.join(tmp, 'full-straight');
  const rep = new Quiet();
  await train(cfg(straight, over), rep, { installSignalHandlers: false });
  const ck = path.join(straight, 'checkpoints', 'checkpoint-4');
  const h = await native().safetensorsHeader(path.join(ck, 'model.safetensors'));
  const shapesOf = async (file: string) => Object.fromEntries((await native().safetensorsHeader(file)).tensors.map((t) => [t.name, t.shape]));
  const unetShapes = await shapesOf(path.join(model, 'unet', 'diffusion_pytorch_model.safetensors'));
  const unetParams = Object.values(unetShapes).reduce((s, shape) => s + shape.reduce((a, b) => a * b, 1), 0);
  const line = rep.messages.find((m) => m.startsWith('trainable parameters:'))!;
  expect(Number(/trainable parameters: ([\d,]+) of/.exec(line)![1].replace(/,/g, ''))).toBe(unetParams);
  expect(new Set(h.tensors.map((t) => t.name))).toEqual(new Set(Object.keys(unetShapes)));
  for (const t of h.tensors) expect(t.shape).toEqual(unetShapes[t.name]);
  // The weights moved away from the base model.
  const base = await native().safetensorsRead(path.join(model, 'unet', 'diffusion_pytorch_model.safetensors'));
  const trained = await native().safetensorsRead(path.join(ck, 'model.safetensors'));
  const baseByName = new Map(base.tensors.map((t) => [t.name, Buffer.from(t.data)]));
  const changed = trained.tensors.filter((t) => !Buffer.from(t.data).equals(baseByName.get(t.name)!)).length;
  expect(changed).toBeGreaterThan(trained.tensors.length / 2);
  expect(fs.existsSync(path.join(straight, 'pytorch_lora_weights.safetensors'))).toBe(false);
  // The trained UNet as a diffusers component folder: the final weights + the base config, and it loads by name.
  expect(fs.readFileSync(path.join(straight, 'unet', 'diffusion_pytorch_model.safetensors')).equals(fs.readFileSync(path.join(ck, 'model.safetensors')))).toBe(true);
  expect(fs.readFileSync(path.join(straight, 'unet', 'config.json'), 'utf8')).toBe(fs.readFileSync(path.join(model, 'unet', 'config.json'), 'utf8'));
  const asModel = path.join(tmp, 'full-as-model');
  fs.cpSync(model, asModel, { recursive: true });
  fs.cpSync(path.join(straight, 'unet'), path.join(asModel, 'unet'), { recursive: true });
  native().dispose(await native().loadPipeline(asModel, { components: ['unet'] }));
  // Interrupted at step 2 and resumed: the same losses and bit-identical weights.
  const resumed = path.join(tmp, 'full-resumed');
  const a = new Quiet();
  await train(cfg(resumed, over), a, { installSignalHandlers: false, stopAtStep: 2 });
  const b = new Quiet();
  await train(cfg(resumed, { ...over, resume_from_checkpoint: 'latest' }), b, { installSignalHandlers: false });
  expect([...a.steps, ...b.steps].map((m) => m.loss)).toEqual(rep.steps.map((m) => m.loss));
  const file = (d: string) => fs.readFileSync(path.join(d, 'checkpoints', 'checkpoint-4', 'model.safetensors'));
  expect(file(resumed).equals(file(straight))).toBe(true);
}, 600000);
