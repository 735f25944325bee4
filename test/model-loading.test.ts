/**
 * Loading model folders: variants, shards, old names, and every way a folder can be wrong (each must be a clear
 * error naming the file and what to do).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { makeTinyModel } from '../src/model-folders/model-folder';
import { native, type HostTensor } from '../src/native';
import { byName, relativeError } from '../src/tensors';

const fixtures = path.join(__dirname, 'fixtures');
const tiny = path.join(fixtures, 'models', 'tiny');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-load-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

function copyDir(src: string, dst: string): void {
  fs.cpSync(src, dst, { recursive: true });
}

async function unetInputs(): Promise<HostTensor[]> {
  const m = byName((await native().safetensorsRead(path.join(fixtures, 'golden', 'tiny', 'inputs.safetensors'))).tensors);
  return ['latents', 'timesteps', 'encoder_hidden_states'].map((k) => m.get(k)!);
}

async function noisePred(dir: string, opts: { variant?: string } = {}): Promise<HostTensor> {
  const p = await native().loadPipeline(dir, { components: ['unet'], ...opts });
  const out = byName(await native().forward(p, await unetInputs()));
  native().dispose(p);
  return out.get('noise_pred')!;
}

async function loadError(dir: string, components: Array<'unet' | 'vae' | 'text_encoder'> = ['unet'], opts: { variant?: string } = {}): Promise<string> {
  return native().loadPipeline(dir, { components, ...opts }).then(
    () => 'loaded',
    (e: Error) => e.message,
  );
}

const unetFile = (dir: string) => path.join(dir, 'unet', 'diffusion_pytorch_model.safetensors');

describe('loading variants', () => {
  let reference: HostTensor;
  beforeAll(async () => {
    reference = await noisePred(tiny);
  });

  test('an fp16 variant (--variant fp16) loads *.fp16.safetensors', async () => {
    const dir = path.join(tmp, 'fp16');
    copyDir(tiny, dir);
    const { tensors } = await native().safetensorsRead(unetFile(dir), { dtype: 'fp16' });
    fs.rmSync(unetFile(dir));
    await native().safetensorsWrite(path.join(dir, 'unet', 'diffusion_pytorch_model.fp16.safetensors'), tensors);
    const pred = await noisePred(dir, { variant: 'fp16' });
    expect(relativeError(pred, reference)).toBeLessThan(5e-3);
    expect(relativeError(pred, reference)).toBeGreaterThan(0); // it really used the fp16 weights
    expect(await loadError(dir)).toMatch(/diffusion_pytorch_model\.safetensors: not found/);
  });

  test('sharded weights with an index.json load to the same result', async () => {
    const dir = path.join(tmp, 'sharded');
    copyDir(tiny, dir);
    const { tensors } = await native().safetensorsRead(unetFile(dir));
    fs.rmSync(unetFile(dir));
    const half = Math.floor(tensors.length / 2);
    const shards = [tensors.slice(0, half), tensors.slice(half)];
    const weightMap: Record<string, string> = {};
    for (let i = 0; i < 2; i++) {
      const name = `diffusion_pytorch_model-0000${i + 1}-of-00002.safetensors`;
      await native().safetensorsWrite(path.join(dir, 'unet', name), shards[i]);
      for (const t of shards[i]) weightMap[t.name] = name;
    }
    fs.writeFileSync(path.join(dir, 'unet', 'diffusion_pytorch_model.safetensors.index.json'), JSON.stringify({ metadata: {}, weight_map: weightMap }));
    expect(relativeError(await noisePred(dir), reference)).toBe(0);
  });

  test("old VAE attention names (query/key/value/proj_attn) load as to_q/to_k/to_v/to_out.0", async () => {
    const dir = path.join(tmp, 'oldvae');
    copyDir(tiny, dir);
    const file = path.join(dir, 'vae', 'diffusion_pytorch_model.safetensors');
    const { tensors } = await native().safetensorsRead(file);
    const renamed = tensors.map((t) => ({
      ...t,
      name: t.name.replace('.to_q.', '.query.').replace('.to_k.', '.key.').replace('.to_v.', '.value.').replace('.to_out.0.', '.proj_attn.'),
    }));
    expect(renamed.some((t) => t.name.includes('.proj_attn.'))).toBe(true);
    await native().safetensorsWrite(file, renamed);
    const inputs = byName((await native().safetensorsRead(path.join(fixtures, 'golden', 'tiny', 'inputs.safetensors'))).tensors);
    const ref = byName((await native().safetensorsRead(path.join(fixtures, 'golden', 'tiny', 'outputs.safetensors'))).tensors);
    const p = await native().loadPipeline(dir, { components: ['vae'] });
    const out = byName(await native().forward(p, [inputs.get('image')!]));
    expect(relativeError(out.get('vae_mean')!, ref.get('vae_mean')!)).toBeLessThan(1e-4);
  });
});

describe('bad model folders give clear errors', () => {
  test('a missing folder', async () => {
    expect(await loadError(path.join(tmp, 'nope'))).toMatch(/nope: model folder not found/);
  });

  test('a missing component folder', async () => {
    const dir = path.join(tmp, 'novae');
    copyDir(tiny, dir);
    fs.rmSync(path.join(dir, 'vae'), { recursive: true });
    expect(await loadError(dir, ['vae'])).toMatch(/novae\/vae: missing/);
  });

  test('pickle weights are refused with a way to convert them', async () => {
    const dir = path.join(tmp, 'pickle');
    copyDir(tiny, dir);
    fs.renameSync(unetFile(dir), path.join(dir, 'unet', 'diffusion_pytorch_model.bin'));
    const msg = await loadError(dir);
    expect(msg).toMatch(/diffusion_pytorch_model\.bin: pickle checkpoints are never loaded/);
    expect(msg).toMatch(/safe_serialization=True/);
  });

  test('a missing tensor is named with its full key path', async () => {
    const dir = path.join(tmp, 'missing-key');
    copyDir(tiny, dir);
    const { tensors, metadata } = await native().safetensorsRead(unetFile(dir));
    const victim = 'down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight';
    await native().safetensorsWrite(unetFile(dir), tensors.filter((t) => t.name !== victim), metadata);
    const msg = await loadError(dir);
    expect(msg).toContain('missing keys (1)');
    expect(msg).toContain(victim);
    expect(msg).toContain(unetFile(dir));
  });

  test('an unexpected tensor is named', async () => {
    const dir = path.join(tmp, 'extra-key');
    copyDir(tiny, dir);
    const { tensors } = await native().safetensorsRead(unetFile(dir));
    await native().safetensorsWrite(unetFile(dir), [...tensors, { ...tensors[0], name: 'down_blocks.9.mystery.weight' }]);
    expect(await loadError(dir)).toMatch(/unexpected keys \(1\):\s+down_blocks\.9\.mystery\.weight/);
  });

  test('a config.json that does not match the weights lists the shape mismatches with both shapes', async () => {
    const dir = path.join(tmp, 'wrong-config');
    copyDir(tiny, dir);
    const cfgPath = path.join(dir, 'unet', 'config.json');
    const cfg = JSON.parse(fs.readFileSync(cfgPath, 'utf8'));
    cfg.cross_attention_dim = 48;
    fs.writeFileSync(cfgPath, JSON.stringify(cfg));
    const msg = await loadError(dir);
    expect(msg).toMatch(/shape mismatches \(\d+\)/);
    expect(msg).toMatch(/attn2\.to_k\.weight: checkpoint \[32, 32\] vs model \[32, 48\]/);
    expect(msg).toMatch(/config\.json belongs to these weights/);
  });

  test('an unsupported config value names the file, the key and the accepted values', async () => {
    const dir = path.join(tmp, 'bad-block');
    copyDir(tiny, dir);
    const cfgPath = path.join(dir, 'unet', 'config.json');
    const cfg = JSON.parse(fs.readFileSync(cfgPath, 'utf8'));
    cfg.down_block_types = ['CrossAttnDownBlock2D', 'SimpleCrossAttnDownBlock2D'];
    fs.writeFileSync(cfgPath, JSON.stringify(cfg));
    const msg = await loadError(dir);
    expect(msg).toContain(cfgPath);
    expect(msg).toMatch(/"down_block_types".*SimpleCrossAttnDownBlock2D.*supported: CrossAttnDownBlock2D, DownBlock2D/);
  });

  test('a malformed config.json names the file', async () => {
    const dir = path.join(tmp, 'bad-json');
    copyDir(tiny, dir);
    fs.writeFileSync(path.join(dir, 'vae', 'config.json'), '{"block_out_channels": [32, 64');
    expect(await loadError(dir, ['vae'])).toMatch(/vae\/config\.json: invalid JSON/);
  });

  test('a truncated weights file is reported, not a crash', async () => {
    const dir = path.join(tmp, 'truncated');
    copyDir(tiny, dir);
    const bytes = fs.readFileSync(unetFile(dir));
    fs.writeFileSync(unetFile(dir), bytes.subarray(0, bytes.length - 1000));
    expect(await loadError(dir)).toMatch(/past the end of the file/);
  });
});

describe('make-tiny-model', () => {
  test('writes a loadable diffusers folder, deterministically for a seed', async () => {
    const a = path.join(tmp, 'gen-a');
    const b = path.join(tmp, 'gen-b');
    await makeTinyModel(a, 'tiny', 3);
    await makeTinyModel(b, 'tiny', 3);
    for (const f of ['model_index.json', 'unet/config.json', 'unet/diffusion_pytorch_model.safetensors', 'vae/diffusion_pytorch_model.safetensors',
      'text_encoder/model.safetensors', 'tokenizer/vocab.json', 'tokenizer/merges.txt', 'scheduler/scheduler_config.json'])
      expect(fs.existsSync(path.join(a, f))).toBe(true);
    expect(fs.readFileSync(unetFile(a)).equals(fs.readFileSync(unetFile(b)))).toBe(true);
    const h = await native().safetensorsHeader(path.join(a, 'text_encoder', 'model.safetensors'));
    expect(h.tensors.every((t) => t.name.startsWith('text_model.'))).toBe(true);
    const p = await native().loadPipeline(a, {});
    const out = await native().forward(p, await unetInputs());
    expect(out[0].shape).toEqual([2, 4, 8, 8]);
    await makeTinyModel(b, 'tiny', 4);
    expect(fs.readFileSync(unetFile(a)).equals(fs.readFileSync(unetFile(b)))).toBe(false);
  });
});
