/**
 * The addon under bad or unusual input: config values that used to crash the process, config keys that used to be
 * parsed and ignored, work submitted after shutdown, non-finite gradients in fp32, and the checkpoint hashes the
 * addon computes while it writes.
 */
import { spawnSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { native, type HostTensor, type Precision } from '../src/native';
import { byName, fromFloat32, fromInt64, relativeError, toNumbers } from '../src/tensors';
import { NoiseSchedule } from '../src/schedules/noise';
import { TINY_MODEL } from './helpers/tiny-run';

const fixtures = path.join(__dirname, 'fixtures');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-robust-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** A copy of the tiny model with `edit` applied to one component's config.json. */
function variant(name: string, component: 'unet' | 'vae', edit: (cfg: Record<string, unknown>) => void): string {
  const dir = path.join(tmp, name);
  fs.cpSync(TINY_MODEL, dir, { recursive: true });
  const file = path.join(dir, component, 'config.json');
  const cfg = JSON.parse(fs.readFileSync(file, 'utf8')) as Record<string, unknown>;
  edit(cfg);
  fs.writeFileSync(file, JSON.stringify(cfg));
  return dir;
}

async function unetInputs(): Promise<HostTensor[]> {
  const m = byName((await native().safetensorsRead(path.join(fixtures, 'golden', 'tiny', 'inputs.safetensors'))).tensors);
  return ['latents', 'timesteps', 'encoder_hidden_states'].map((k) => m.get(k)!);
}

async function noisePred(dir: string, dtype: Precision = 'fp32'): Promise<HostTensor> {
  const p = await native().loadPipeline(dir, { components: ['unet'], dtype });
  try {
    return byName(await native().forward(p, await unetInputs())).get('noise_pred')!;
  } finally {
    native().dispose(p);
  }
}

describe('UNet config values that divide others', () => {
  test.each([
    ['norm_num_groups', 0, /"norm_num_groups": must be at least 1, got 0/],
    ['attention_head_dim', 0, /"attention_head_dim": must be at least 1, got 0/],
    ['layers_per_block', 0, /"layers_per_block": must be at least 1, got 0/],
  ])('%s = %s is a clear error naming the file, not a crash (SIGFPE)', async (key, value, pattern) => {
    const dir = variant(`zero-${key}`, 'unet', (c) => {
      c[key] = value;
    });
    const msg = await native().loadPipeline(dir, { components: ['unet'] }).then(() => 'loaded', (e: Error) => e.message);
    expect(msg).toContain(path.join(dir, 'unet', 'config.json'));
    expect(msg).toMatch(pattern);
  });
});

describe('one config reader for the UNet, the VAE and the text encoder (native/models/config.h)', () => {
  // Each row: a component, the raw JSON text of one value (so NaN, which JSON.stringify cannot write, reaches the
  // parser as Python's json.dump writes it), and the error. The same reader gives every model the same checks.
  test.each([
    ['unet', 'freq_shift', 'NaN', /"freq_shift": must be a number, got NaN/],
    ['unet', 'norm_eps', '0', /"norm_eps": must be positive, got 0/],
    ['unet', 'sample_size', '2.5', /"sample_size": must be an integer, got 2.5/],
    ['unet', 'down_block_types', '["CrossAttnDownBlock2D", "SimpleDownBlock"]', /"down_block_types": "SimpleDownBlock" is not supported \(supported: CrossAttnDownBlock2D, DownBlock2D\)/],
    ['unet', 'cross_attention_dim', '0', /"cross_attention_dim": must be at least 1, got 0/],
    ['vae', 'scaling_factor', 'Infinity', /"scaling_factor": must be a number, got Infinity/],
    ['vae', 'act_fn', '"tanh"', /"act_fn": "tanh" is not supported \(supported: silu, swish, mish, gelu, relu\)/],
    ['vae', 'block_out_channels', '[32, 0]', /"block_out_channels": must be at least 1, got 0/],
    ['vae', '_class_name', '"VQModel"', /"_class_name": "VQModel" is not supported \(supported: AutoencoderKL\)/],
    ['text_encoder', 'hidden_act', '"gelu_10"', /"hidden_act": "gelu_10" is not supported \(supported: quick_gelu, gelu, /],
    ['text_encoder', 'layer_norm_eps', '-1', /"layer_norm_eps": must be positive, got -1/],
    ['text_encoder', 'num_hidden_layers', '"2"', /"num_hidden_layers": must be an integer, got "2"/],
  ] as const)('%s %s = %s is refused naming the file and the key', async (component, key, raw, pattern) => {
    const dir = path.join(tmp, `reader-${component}-${key}`);
    fs.cpSync(TINY_MODEL, dir, { recursive: true });
    const file = path.join(dir, component, 'config.json');
    const cfg = JSON.parse(fs.readFileSync(file, 'utf8')) as Record<string, unknown>;
    cfg[key] = '@VALUE@';
    fs.writeFileSync(file, JSON.stringify(cfg).replace('"@VALUE@"', raw));
    const msg = await native().loadPipeline(dir, { components: [component] }).then(() => 'loaded', (e: Error) => e.message);
    expect(msg).toContain(file);
    expect(msg).toMatch(pattern);
  });

  test('activation names: the VAE reads diffusers\' names in any case, the text encoder transformers\' names', async () => {
    // act_fn "SiLU" is diffusers' default spelled as older configs spell it; gelu_pytorch_tanh differs from quick_gelu,
    // so the encoder's output must change when only hidden_act changes (the name reaches the computation).
    const vae = path.join(tmp, 'reader-vae-case');
    fs.cpSync(TINY_MODEL, vae, { recursive: true });
    const vf = path.join(vae, 'vae', 'config.json');
    fs.writeFileSync(vf, JSON.stringify({ ...JSON.parse(fs.readFileSync(vf, 'utf8')), act_fn: 'SiLU' }));
    native().dispose(await native().loadPipeline(vae, { components: ['vae'] }));
    const encode = async (dir: string): Promise<HostTensor> => {
      const p = await native().loadPipeline(dir, { components: ['text_encoder'] });
      try {
        const ids = fromInt64('input_ids', [1, 8], [998, 5, 17, 300, 2, 999, 999, 999]);
        return byName(await native().forward(p, [ids])).get('text_embeddings')!;
      } finally {
        native().dispose(p);
      }
    };
    const te = path.join(tmp, 'reader-te-act');
    fs.cpSync(TINY_MODEL, te, { recursive: true });
    const tf = path.join(te, 'text_encoder', 'config.json');
    fs.writeFileSync(tf, JSON.stringify({ ...JSON.parse(fs.readFileSync(tf, 'utf8')), hidden_act: 'gelu_pytorch_tanh' }));
    expect(relativeError(await encode(te), await encode(TINY_MODEL))).toBeGreaterThan(1e-4);
  });
});

test('mid_block_type null builds a UNet without a mid block (as diffusers does); a missing key keeps the default', async () => {
  const dir = variant('no-mid', 'unet', (c) => {
    c.mid_block_type = null;
  });
  await native().writeRandomWeights(path.join(dir, 'unet'), 'unet', 3);
  const h = await native().safetensorsHeader(path.join(dir, 'unet', 'diffusion_pytorch_model.safetensors'));
  expect(h.tensors.some((t) => t.name.startsWith('mid_block.'))).toBe(false);
  expect(h.tensors.some((t) => t.name.startsWith('up_blocks.'))).toBe(true);
  const pred = await noisePred(dir);
  expect(toNumbers(pred).every(Number.isFinite)).toBe(true);
  const full = await native().safetensorsHeader(path.join(TINY_MODEL, 'unet', 'diffusion_pytorch_model.safetensors'));
  expect(full.tensors.some((t) => t.name.startsWith('mid_block.'))).toBe(true);
});

test('upcast_attention: attention in fp32 when it runs in bf16; a no-op in fp32', async () => {
  const up = variant('upcast', 'unet', (c) => {
    c.upcast_attention = true;
  });
  const plain = variant('no-upcast', 'unet', (c) => {
    c.upcast_attention = false;
  });
  const [a32, b32] = [await noisePred(up), await noisePred(plain)];
  expect(Buffer.from(a32.data).equals(Buffer.from(b32.data))).toBe(true);
  const [a16, b16] = [await noisePred(up, 'bf16'), await noisePred(plain, 'bf16')];
  expect(relativeError(a16, b16)).toBeGreaterThan(0); // the attention really ran in another precision
  expect(relativeError(a16, a32)).toBeLessThan(5e-2);
});

test('VAE force_upcast keeps the VAE in fp32 when the pipeline is fp16 (it overflows in fp16); false keeps fp16', async () => {
  const pixels = fromFloat32('pixels', [1, 3, 32, 32], Array.from({ length: 3 * 32 * 32 }, (_, i) => Math.sin(i) * 0.9));
  const encode = async (dir: string) => {
    const p = await native().loadPipeline(dir, { components: ['vae'], dtype: 'fp16' });
    try {
      return await native().vaeEncode(p, pixels);
    } finally {
      native().dispose(p);
    }
  };
  const upcast = variant('vae-upcast', 'vae', (c) => {
    c.force_upcast = true;
  });
  const noUpcast = variant('vae-no-upcast', 'vae', (c) => {
    c.force_upcast = false;
  });
  const [mean32] = await encode(upcast);
  const [mean16] = await encode(noUpcast);
  const p = await native().loadPipeline(upcast, { components: ['vae'] });
  const [ref] = await native().vaeEncode(p, pixels);
  native().dispose(p);
  expect(Buffer.from(mean32.data).equals(Buffer.from(ref.data))).toBe(true); // exactly the fp32 VAE
  expect(relativeError(mean16, ref)).toBeGreaterThan(0); // really fp16 without it
});

test('after shutdown every call rejects with ESHUTDOWN instead of leaving its Promise pending', () => {
  const addon = path.join(__dirname, '..', 'build', 'Release', 'train_lora.node');
  const script = `
    const n = require(${JSON.stringify(process.env.TRAIN_LORA_ADDON ?? addon)});
    n.devices().then(async (d) => {
      n.shutdown();
      const timer = setTimeout(() => { console.log('PENDING'); process.exit(3); }, 10000);
      try { await n.devices(); console.log('RESOLVED'); } catch (e) { console.log('REJECTED ' + e.code + ' ' + e.message); }
      clearTimeout(timer);
    });`;
  const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8', timeout: 60000 });
  expect(r.stdout).toMatch(/REJECTED ESHUTDOWN .*native engine has shut down/);
});

describe('the trainer', () => {
  async function setup() {
    const inputs = byName((await native().safetensorsRead(path.join(fixtures, 'golden', 'train', 'inputs.safetensors'))).tensors);
    const noise = NoiseSchedule.fromFile(path.join(TINY_MODEL, 'scheduler', 'scheduler_config.json'));
    const pipe = await native().loadPipeline(TINY_MODEL, { components: ['unet', 'text_encoder'] });
    const { trainer } = await native().createTrainer(pipe, { rank: 4, alphasCumprod: Array.from(noise.alphasCumprod), seed: 1 });
    const batch = { latents: inputs.get('latents.0')!, noise: inputs.get('noise.0')!, timesteps: inputs.get('timesteps.0')!, inputIds: inputs.get('input_ids.0')! };
    return { pipe, trainer, batch };
  }

  test.each([
    ['mode', 'lorra', /mode must be one of lora, full, got "lorra"/],
    ['mixedPrecision', 'fp8', /mixedPrecision must be one of no, fp16, bf16, got "fp8"/],
    ['predictionType', 'sample', /predictionType must be one of epsilon, v_prediction, got "sample"/],
  ])('createTrainer refuses %s "%s", naming the accepted values (C++ enums behind them)', async (key, value, pattern) => {
    const noise = NoiseSchedule.fromFile(path.join(TINY_MODEL, 'scheduler', 'scheduler_config.json'));
    const pipe = await native().loadPipeline(TINY_MODEL, { components: ['unet'] });
    try {
      const opts = { rank: 4, alphasCumprod: Array.from(noise.alphasCumprod), [key]: value } as unknown as Parameters<ReturnType<typeof native>['createTrainer']>[1];
      await expect(Promise.resolve().then(() => native().createTrainer(pipe, opts))).rejects.toThrow(pattern);
    } finally {
      native().dispose(pipe);
    }
  });

  test('v_prediction reaches the loss: the same batch gives another loss than epsilon', async () => {
    const { pipe, trainer, batch } = await setup();
    const noise = NoiseSchedule.fromFile(path.join(TINY_MODEL, 'scheduler', 'scheduler_config.json'));
    const pipe2 = await native().loadPipeline(TINY_MODEL, { components: ['unet', 'text_encoder'] });
    const { trainer: v } = await native().createTrainer(pipe2, { rank: 4, alphasCumprod: Array.from(noise.alphasCumprod), seed: 1, predictionType: 'v_prediction' });
    const eps = await native().trainerMicroStep(trainer, batch);
    const vel = await native().trainerMicroStep(v, batch);
    expect(Math.abs(vel - eps) / eps).toBeGreaterThan(1e-3);
    for (const h of [v, trainer, pipe2, pipe]) native().dispose(h);
  });

  test('fp32: non-finite gradients are skipped (never applied), reported as nonFinite', async () => {
    const { pipe, trainer, batch } = await setup();
    const dir = (n: string) => {
      const d = path.join(tmp, n);
      fs.mkdirSync(d, { recursive: true });
      return d;
    };
    await native().trainerSaveState(trainer, dir('nf-before'));
    const v = new Float32Array(new Uint8Array(batch.noise.data).buffer); // a copy (Buffer#slice would be a view)
    v[3] = NaN;
    await native().trainerMicroStep(trainer, { ...batch, noise: { ...batch.noise, data: new Uint8Array(v.buffer) } });
    const r = await native().trainerOptimizerStep(trainer, 1e-2);
    expect(r).toMatchObject({ skipped: true, nonFinite: true, optimizerSteps: 0, lossScale: 1 });
    await native().trainerSaveState(trainer, dir('nf-after'));
    const read = (d: string) => fs.readFileSync(path.join(tmp, d, 'model.safetensors'));
    expect(read('nf-after').equals(read('nf-before'))).toBe(true);
    // and a finite step afterwards trains normally
    await native().trainerMicroStep(trainer, batch);
    expect(await native().trainerOptimizerStep(trainer, 1e-2)).toMatchObject({ skipped: false, nonFinite: false, optimizerSteps: 1 });
    native().dispose(trainer);
    native().dispose(pipe);
  }, 120000);

  test('trainerSaveState reports the size and SHA-256 of the bytes it wrote', async () => {
    const { pipe, trainer } = await setup();
    const d = path.join(tmp, 'hash');
    fs.mkdirSync(d);
    const st = await native().trainerSaveState(trainer, d);
    for (const name of ['model.safetensors', 'optimizer.safetensors']) {
      const bytes = fs.readFileSync(path.join(d, name));
      expect(st.files![name]).toEqual({ size: bytes.length, sha256: crypto.createHash('sha256').update(bytes).digest('hex') });
    }
    native().dispose(trainer);
    native().dispose(pipe);
  }, 120000);
});

describe('native objects are released when the work is done, not when the GC gets to them', () => {
  const data = path.join(tmp, 'leak-data');
  beforeAll(async () => {
    const { makeDemoData } = await import('../src/data/demo-data');
    await makeDemoData(data, { count: 4, size: 32, seed: 1 });
  });
  const live = () => native().liveHandles();
  // The counts are per process (earlier test files in this jest worker leave handles that the GC may collect at any
  // moment): an operation must not add any, i.e. no kind may end above where it started.
  const expectNoneAdded = (before: Record<string, number>) => {
    const after = live();
    for (const kind of new Set([...Object.keys(before), ...Object.keys(after)])) expect([kind, after[kind] ?? 0]).toEqual([kind, Math.min(after[kind] ?? 0, before[kind] ?? 0)]);
  };

  test('train() releases its trainer and pipeline', async () => {
    const { train } = await import('../src/train/train');
    const { Quiet } = await import('./helpers/quiet-reporter');
    const { tinyRunConfig } = await import('./helpers/tiny-run');
    const before = live();
    await train(tinyRunConfig(path.join(tmp, 'leak-train'), data, { max_train_steps: 1 }), new Quiet(), { installSignalHandlers: false });
    expectNoneAdded(before);
  }, 120000);

  test('forward releases its pipeline when it fails', async () => {
    const { runForwardCommand } = await import('../src/commands/forward');
    const before = live();
    const inputs = path.join(fixtures, 'golden', 'tiny', 'inputs.safetensors');
    await expect(runForwardCommand({ model: TINY_MODEL, inputs, output: path.join(tmp, 'fw-out.safetensors'), lora: path.join(tmp, 'no-such-lora.safetensors') })).rejects.toThrow(/no-such-lora/);
    expectNoneAdded(before);
  });

  test('test-setup releases its trainer and pipeline', async () => {
    const { testSetup } = await import('../src/commands/test-setup');
    const { tinyRunConfig } = await import('./helpers/tiny-run');
    const before = live();
    await testSetup(tinyRunConfig(path.join(tmp, 'leak-setup'), data), () => undefined);
    expectNoneAdded(before);
  }, 120000);
});

describe('--lora-target-modules', () => {
  async function targetError(targets: string[]): Promise<string> {
    const noise = NoiseSchedule.fromFile(path.join(TINY_MODEL, 'scheduler', 'scheduler_config.json'));
    const pipe = await native().loadPipeline(TINY_MODEL, { components: ['unet'] });
    try {
      const r = await native().createTrainer(pipe, { rank: 2, targets, alphasCumprod: Array.from(noise.alphasCumprod) });
      native().dispose(r.trainer);
      return 'created';
    } catch (e) {
      return (e as Error).message;
    } finally {
      native().dispose(pipe);
    }
  }
  test('a target that matches nothing, or only modules that are not Linear/Conv2d, is an error naming it, never a silent skip', async () => {
    // SD 1.x proj_in/proj_out are 1x1 convolutions: adapted (LoCon shapes) since conv LoRA exists (test/lora-targets.test.ts).
    expect(await targetError(['to_q', 'proj_in'])).toBe('created');
    expect(await targetError(['to_q', 'norm1'])).toMatch(/"norm1" matches only .* modules \(e\.g\. [a-z_.0-9]+norm1\); LoRA adapts Linear and Conv2d layers only/);
    expect(await targetError(['to_q', 'to_qq'])).toMatch(/"to_qq" matches no module of this model/);
    expect(await targetError(['to_q', 'ff.net.2'])).toBe('created');
  });
});
