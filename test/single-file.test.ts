/**
 * Single-file SD 1.x checkpoints (original LDM layout) as --pretrained-model-name-or-path. The fixture
 * test/fixtures/models/tiny-single-file.safetensors is test/fixtures/models/tiny converted by diffusers' own reverse
 * converter (scripts/golden/make_single_file_fixture.py, float32, which also proves with diffusers' forward converters
 * that it holds exactly the folder's tensors). Loading the file must give bit-identical outputs to loading the
 * folder, and training from it must work end to end.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { runGenerateCommand } from '../src/commands/generate';
import { runForwardCommand } from '../src/commands/forward';
import { CheckpointManager } from '../src/checkpoint/manager';
import { makeDemoData } from '../src/data/demo-data';
import { exportCheckpoint } from '../src/export/lora-export';
import { modelFingerprint } from '../src/model-folders/fingerprint';
import { checkModel, CLIP_TOKENIZER, modelConfig, modelSchedulerConfig, modelTokenizerDir, TINY_TOKENIZER, SD15_SCHEDULER_CONFIG } from '../src/model-folders/model-folder';
import { native, type HostTensor } from '../src/native';
import { byName, fromFloat32 } from '../src/tensors';
import { train } from '../src/train/train';
import { Quiet } from './helpers/quiet-reporter';
import { TINY_MODEL, tinyRunConfig } from './helpers/tiny-run';
import { writeSparseSafetensors } from './helpers/sparse-safetensors';

const FILE = path.join(__dirname, 'fixtures', 'models', 'tiny-single-file.safetensors');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-single-file-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

async function outputs(model: string): Promise<Map<string, HostTensor>> {
  const inputs = (await native().safetensorsRead(path.join(__dirname, 'fixtures', 'golden', 'tiny', 'inputs.safetensors'))).tensors.filter((t) => t.name !== 'target');
  const p = await native().loadPipeline(model, { components: ['text_encoder', 'unet', 'vae'] });
  try {
    return byName(await native().forward(p, inputs));
  } finally {
    native().dispose(p);
  }
}

describe('loading a single-file checkpoint', () => {
  test('the configs inferred from the tensors are the folder\'s (where the tensors tell)', async () => {
    await checkModel(FILE, ['unet', 'vae', 'text_encoder']);
    const unet = modelConfig(FILE, 'unet');
    const folder = modelConfig(TINY_MODEL, 'unet');
    for (const k of ['in_channels', 'out_channels', 'block_out_channels', 'down_block_types', 'up_block_types', 'layers_per_block', 'cross_attention_dim', 'use_linear_projection', 'attention_head_dim'])
      expect([k, unet[k]]).toEqual([k, folder[k]]);
    const vae = modelConfig(FILE, 'vae');
    const fvae = modelConfig(TINY_MODEL, 'vae');
    for (const k of ['block_out_channels', 'layers_per_block', 'latent_channels', 'in_channels', 'out_channels', 'scaling_factor'])
      expect([k, vae[k]]).toEqual([k, fvae[k]]);
    const te = modelConfig(FILE, 'text_encoder');
    const fte = modelConfig(TINY_MODEL, 'text_encoder');
    for (const k of ['vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'max_position_embeddings', 'hidden_act'])
      expect([k, te[k]]).toEqual([k, fte[k]]);
    expect(modelTokenizerDir(FILE)).toBe(TINY_TOKENIZER);
    expect(modelSchedulerConfig(FILE)).toBe(SD15_SCHEDULER_CONFIG);
  });

  test('UNet, VAE and text encoder outputs are bit-identical to the diffusers folder\'s', async () => {
    const a = await outputs(FILE);
    const b = await outputs(TINY_MODEL);
    expect([...a.keys()].sort()).toEqual(['noise_pred', 'text_embeddings', 'vae_decoded', 'vae_mean', 'vae_std']);
    for (const [k, t] of b) expect([k, Buffer.from(a.get(k)!.data).equals(Buffer.from(t.data))]).toEqual([k, true]);
  });

  test('the fingerprint comes from the file', async () => {
    const fp = await modelFingerprint(FILE);
    expect(fp).toMatch(/^[0-9a-f]{16}$/);
    expect(fp).not.toBe(await modelFingerprint(TINY_MODEL));
    const copy = path.join(tmp, 'changed.safetensors');
    const bytes = fs.readFileSync(FILE);
    bytes[bytes.length - 1] ^= 1;
    fs.writeFileSync(copy, bytes);
    expect(await modelFingerprint(copy)).not.toBe(fp);
  });

  test('forward --prompt reads a single file with the tokenizer that fits it', async () => {
    const out = path.join(tmp, 'fwd.safetensors');
    const names = await runForwardCommand({ model: FILE, prompt: ['a red square'], output: out });
    expect(names).toEqual(['input_ids', 'text_embeddings']);
  });
});

describe('SD 1.5\'s real layout', () => {
  // The names and shapes of a real SD 1.5 single file (scripts/golden/make_sd15_ldm_shapes.py, from diffusers' reverse
  // converter), as a sparse file: the header is real, the 2 GB of fp16 data are holes (no disk, no reads).
  test('the inferred configs are SD 1.5\'s, and its tokenizer is CLIP\'s', async () => {
    const shapes = JSON.parse(fs.readFileSync(path.join(__dirname, 'fixtures', 'sd15', 'ldm_param_shapes.json'), 'utf8')) as Record<string, number[]>;
    const file = path.join(tmp, 'sd15-shapes.safetensors');
    writeSparseSafetensors(file, shapes, 'F16');
    await checkModel(file, ['unet', 'vae', 'text_encoder']);
    const sd15 = path.join(__dirname, '..', 'assets', 'sd15-model');
    const real = (c: 'unet' | 'vae' | 'text_encoder') => JSON.parse(fs.readFileSync(path.join(sd15, c, 'config.json'), 'utf8')) as Record<string, unknown>;
    const keys = {
      unet: ['in_channels', 'out_channels', 'block_out_channels', 'down_block_types', 'up_block_types', 'layers_per_block', 'cross_attention_dim', 'attention_head_dim', 'use_linear_projection', 'sample_size', 'mid_block_type'],
      vae: ['in_channels', 'out_channels', 'block_out_channels', 'down_block_types', 'up_block_types', 'layers_per_block', 'latent_channels', 'scaling_factor', 'sample_size', 'norm_num_groups'],
      text_encoder: ['vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads', 'max_position_embeddings', 'hidden_act'],
    } as const;
    for (const c of ['unet', 'vae', 'text_encoder'] as const) {
      const got = modelConfig(file, c);
      const want = real(c);
      for (const k of keys[c]) expect([c, k, got[k] ?? 'UNetMidBlock2DCrossAttn']).toEqual([c, k, want[k]]);
    }
    expect(modelTokenizerDir(file)).toBe(CLIP_TOKENIZER);
  });
});

describe('what a single file cannot be', () => {
  const write = async (name: string, keys: string[]): Promise<string> => {
    const f = path.join(tmp, name);
    await native().safetensorsWrite(f, keys.map((k) => fromFloat32(k, [2], [0, 0])));
    return f;
  };

  test.each([
    ['SDXL', ['conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias', 'model.diffusion_model.input_blocks.0.0.weight'], /an SDXL checkpoint/],
    ['SDXL (label_emb)', ['model.diffusion_model.label_emb.0.0.weight', 'model.diffusion_model.input_blocks.0.0.weight'], /an SDXL checkpoint/],
    ['SD3', ['model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight'], /a Stable Diffusion 3 checkpoint/],
    ['Flux', ['double_blocks.0.img_attn.qkv.weight', 'single_blocks.0.linear1.weight'], /a Flux checkpoint/],
    ['SD 2.x (OpenCLIP)', ['cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight', 'model.diffusion_model.input_blocks.0.0.weight'], /an SD 2\.x checkpoint \(OpenCLIP[\s\S]*from_single_file/],
    ['a UNet alone', ['model.diffusion_model.input_blocks.0.0.weight'], /no VAE \(first_stage_model\.\*\) text encoder/],
  ])('%s is refused by name', async (name, keys, msg) => {
    const f = await write(`${name.replace(/\W+/g, '_')}.safetensors`, keys as string[]);
    await expect(checkModel(f, ['unet', 'vae', 'text_encoder'])).rejects.toThrow(msg as RegExp);
    await expect(native().loadPipeline(f, { components: ['unet'] })).rejects.toThrow(msg as RegExp);
  });

  test('a .ckpt is refused with the command that converts it', async () => {
    const f = path.join(tmp, 'model.ckpt');
    fs.writeFileSync(f, 'PK');
    await expect(checkModel(f, ['unet'])).rejects.toThrow(/pickle checkpoint \(\.ckpt\)[\s\S]*torch\.load\([\s\S]*weights_only=True[\s\S]*model\.safetensors/);
  });

  test('a truncated file gives a clean error', async () => {
    const f = path.join(tmp, 'truncated.safetensors');
    fs.writeFileSync(f, fs.readFileSync(FILE).subarray(0, 1_000_000));
    await expect(checkModel(f, ['unet'])).rejects.toThrow(/truncated \(its tensors need \d+ bytes, the file has 1000000\)/);
    await expect(native().loadPipeline(f, { components: ['unet'] })).rejects.toThrow(/truncated|smaller|size|bytes/i);
  });
});

describe('training from a single file', () => {
  const data = path.join(tmp, 'data');
  beforeAll(async () => {
    await makeDemoData(data, { count: 8, size: 32, seed: 1 });
  });

  test('checkpoints, resume, export (--merge too) and generate; the same LoRA as from the folder', async () => {
    const noSignals = { installSignalHandlers: false } as const;
    const fromFile = path.join(tmp, 'from-file');
    const fromFolder = path.join(tmp, 'from-folder');
    let r = await train(tinyRunConfig(fromFile, data, { pretrained_model_name_or_path: FILE, max_train_steps: 2, checkpointing_steps: 1 }), new Quiet(), noSignals);
    expect(r.finished).toBe(true);
    r = await train(tinyRunConfig(fromFile, data, { pretrained_model_name_or_path: FILE, max_train_steps: 3, checkpointing_steps: 1, resume_from_checkpoint: 'latest' }), new Quiet(), noSignals);
    expect(r.finished).toBe(true);
    expect((await new CheckpointManager(fromFile).list('quick')).map((e) => e.step).sort()).toEqual([1, 2, 3]);
    r = await train(tinyRunConfig(fromFolder, data, { max_train_steps: 3, checkpointing_steps: 3 }), new Quiet(), noSignals);
    expect(r.finished).toBe(true);
    const lora = (dir: string) => fs.readFileSync(path.join(dir, 'pytorch_lora_weights.safetensors'));
    const tensors = async (dir: string) => (await native().safetensorsRead(path.join(dir, 'pytorch_lora_weights.safetensors'))).tensors;
    expect(lora(fromFile).length).toBeGreaterThan(0);
    const a = await tensors(fromFile);
    const b = byName(await tensors(fromFolder));
    // Same weights, same tokenizer, same noise schedule (SD 1.5's, equal to the tiny folder's): the same LoRA.
    for (const t of a) expect([t.name, Buffer.from(t.data).equals(Buffer.from(b.get(t.name)!.data))]).toEqual([t.name, true]);

    // A checkpoint of a single-file run exports (base model: the file), and loads at its strength as a LoRA.
    const [ckpt] = await new CheckpointManager(fromFile).list('quick');
    const kohya = path.join(tmp, 'exported-kohya.safetensors');
    await exportCheckpoint(ckpt.path, { formats: ['kohya'], out: kohya });
    expect(fs.existsSync(kohya)).toBe(true);
    // --merge from the file: a diffusers pipeline folder with the same tensors as --merge from the folder (same LoRA).
    const [ckptFolder] = await new CheckpointManager(fromFolder).list('quick');
    await exportCheckpoint(ckpt.path, { formats: ['diffusers'], out: path.join(tmp, 'merged-file'), merge: true });
    await exportCheckpoint(ckptFolder.path, { formats: ['diffusers'], out: path.join(tmp, 'merged-folder'), merge: true });
    const mf = path.join(tmp, 'merged-file', 'final_pipeline');
    const md = path.join(tmp, 'merged-folder', 'final_pipeline');
    expect(fs.readdirSync(mf).sort()).toEqual(['model_index.json', 'scheduler', 'text_encoder', 'tokenizer', 'unet', 'vae']);
    for (const f of ['unet/diffusion_pytorch_model.safetensors', 'vae/diffusion_pytorch_model.safetensors', 'text_encoder/model.safetensors']) {
      const x = (await native().safetensorsRead(path.join(mf, f))).tensors;
      const y = byName((await native().safetensorsRead(path.join(md, f))).tensors);
      expect([f, x.length]).toEqual([f, y.size]);
      for (const t of x) expect([f, t.name, t.shape, Buffer.from(t.data).equals(Buffer.from(y.get(t.name)!.data))]).toEqual([f, t.name, y.get(t.name)!.shape, true]);
    }
    const m1 = await outputs(mf);
    const m2 = await outputs(md);
    for (const [k, t] of m2) expect([k, Buffer.from(m1.get(k)!.data).equals(Buffer.from(t.data))]).toEqual([k, true]);

    const images = await runGenerateCommand({
      model: FILE, lora: path.join(fromFile, 'pytorch_lora_weights.safetensors'), prompt: ['a red square'], width: 32, height: 32,
      numInferenceSteps: 2, out: path.join(tmp, 'gen'),
    });
    expect(images).toEqual([path.join(tmp, 'gen', '0_0.png')]);
    expect(fs.statSync(images[0]).size).toBeGreaterThan(0);
    // A v-prediction file says nothing about it: --prediction-type v_prediction changes the sampling.
    const v = await runGenerateCommand({
      model: FILE, lora: path.join(fromFile, 'pytorch_lora_weights.safetensors'), prompt: ['a red square'], width: 32, height: 32,
      numInferenceSteps: 2, out: path.join(tmp, 'gen-v'), predictionType: 'v_prediction',
    });
    expect(fs.readFileSync(v[0]).equals(fs.readFileSync(images[0]))).toBe(false);
  });
});
