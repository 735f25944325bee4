/**
 * Stable Diffusion model folders in diffusers layout: checking them, and generating random-weight ones
 * (`train-lora make-tiny-model`) for tests, the demo and benchmarks.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { native } from '../native';
import { craftDemoVae } from './demo-vae';

export const ASSETS = path.resolve(__dirname, '..', '..', 'assets');
/** The demo model's pre-trained UNet and its text encoder (written by scripts/make-demo-base.js). */
export const DEMO_BASE = path.join(ASSETS, 'demo-base');

/** tiny: random weights, a few MB; demo: tiny with a hand-set autoencoder VAE for 32 px (see demo-vae.ts); sd15: SD 1.5 shapes. */
/** The resolution the demo VAE is exact for (the demo trains at it). */
export const DEMO_RESOLUTION = 32;
/** GroupNorm groups of the demo UNet (4 channels per group in its first block). */
const DEMO_UNET_GROUPS = 8;
/** Bumped whenever `--preset demo` changes, so that `--demo` remakes a cached demo model. 2: pre-trained base UNet. */
export const DEMO_MODEL_VERSION = 2;

export type ModelPreset = 'tiny' | 'demo' | 'sd15';

/** The components a training / forward run reads, with the file each needs. */
const COMPONENTS = {
  unet: 'diffusion_pytorch_model',
  vae: 'diffusion_pytorch_model',
  text_encoder: 'model',
} as const;
export type Component = keyof typeof COMPONENTS;

export class ModelFolderError extends Error {
  override name = 'ModelFolderError';
}

/**
 * Checks that `dir` is a local diffusers folder with the named components and a tokenizer, before any
 * native work starts, so the message can say exactly what is missing and how to get it.
 */
export function checkModelFolder(dir: string, components: Component[], needTokenizer = true): void {
  if (isSingleFile(dir))
    throw new ModelFolderError(`${dir}: a single file; load it with checkModel() (single-file checkpoints are read by the native loader)`);
  if (!fs.existsSync(dir)) {
    const looksLikeHubId = /^[\w.-]+\/[\w.-]+$/.test(dir) && !dir.startsWith('.');
    throw new ModelFolderError(
      looksLikeHubId
        ? `${dir}: not a local folder. train-lora does not download models: download it first, e.g.\n` +
            `  huggingface-cli download ${dir} --local-dir ./models/${dir.split('/')[1]} --include "*.json" "*.txt" "*.safetensors"\n` +
            `then pass --pretrained-model-name-or-path ./models/${dir.split('/')[1]}`
        : `${dir}: model folder not found (give a local Stable Diffusion folder in diffusers layout; see "Model folders" in the README)`,
    );
  }
  const problems: string[] = [];
  for (const c of components) {
    const cdir = path.join(dir, c);
    if (!fs.existsSync(path.join(cdir, 'config.json'))) problems.push(`${cdir}/config.json is missing`);
  }
  if (needTokenizer) {
    // vocab.json + merges.txt, or tokenizer.json alone (what transformers 5's save_pretrained writes).
    const tdir = path.join(dir, 'tokenizer');
    if (!fs.existsSync(path.join(tdir, 'tokenizer.json')) || fs.existsSync(path.join(tdir, 'vocab.json')) || fs.existsSync(path.join(tdir, 'merges.txt')))
      for (const f of ['vocab.json', 'merges.txt'])
        if (!fs.existsSync(path.join(tdir, f))) problems.push(`${path.join(tdir, f)} is missing`);
  }
  if (problems.length)
    throw new ModelFolderError(
      `${dir} is not a complete Stable Diffusion folder in diffusers layout:\n  - ${problems.join('\n  - ')}\n` +
        'Expected model_index.json, unet/, vae/, text_encoder/ (config.json + *.safetensors) and tokenizer/ (vocab.json and merges.txt, or tokenizer.json).',
    );
}

// ---------------- single-file checkpoints ----------------

/** The CLIP ViT-L/14 tokenizer of SD 1.x (49408 tokens), for single files, which carry none (scripts/make-clip-tokenizer.py). */
export const CLIP_TOKENIZER = path.join(ASSETS, 'clip-tokenizer');
/** The project's small test vocabulary (the tiny models' text encoders have 1000 tokens). */
export const TINY_TOKENIZER = path.join(ASSETS, 'tiny-clip-tokenizer');
/** SD 1.5's scheduler_config.json, for single files. */
export const SD15_SCHEDULER_CONFIG = path.join(ASSETS, 'sd15-model', 'scheduler', 'scheduler_config.json');

const PICKLE_EXTENSIONS = ['.ckpt', '.pt', '.pth', '.bin', '.pkl'];

/** A model path that is a file: a single-file checkpoint (a folder is a diffusers model folder). */
export function isSingleFile(model: string): boolean {
  try {
    return fs.statSync(model).isFile();
  } catch {
    return false;
  }
}

/** The configs inferred from a single file's tensors by the native loader, by resolved path (see checkModel). */
const singleFileConfigs = new Map<string, Record<Component, Record<string, unknown>>>();

/**
 * Checks a single-file checkpoint before any weights are read: safetensors only (a pickle is refused with the command
 * that converts it), a complete header (a truncated file is named), and its header's tensors read as an SD 1.x
 * checkpoint in the original layout (other families are refused by name, by the native loader).
 */
async function checkSingleFile(file: string): Promise<void> {
  const ext = path.extname(file).toLowerCase();
  if (PICKLE_EXTENSIONS.includes(ext))
    throw new ModelFolderError(
      `${file}: a pickle checkpoint (${ext}), which train-lora never loads (unpickling can run arbitrary code). Convert it to ` +
        'safetensors once, in Python with torch and safetensors:\n' +
        `  python3 -c "import torch, safetensors.torch as st; sd = torch.load('${file}', map_location='cpu', weights_only=True); ` +
        `sd = sd.get('state_dict', sd); st.save_file({k: v.contiguous().clone() for k, v in sd.items() if isinstance(v, torch.Tensor)}, ` +
        `'${file.slice(0, file.length - ext.length)}.safetensors')"\n` +
        `then pass ${file.slice(0, file.length - ext.length)}.safetensors`,
    );
  const size = fs.statSync(file).size;
  const fd = fs.openSync(file, 'r');
  let header: Record<string, { data_offsets?: [number, number] }>;
  try {
    const len = Buffer.alloc(8);
    if (size < 8 || fs.readSync(fd, len, 0, 8, 0) !== 8) throw new ModelFolderError(`${file}: not a safetensors file (${size} bytes, too short)`);
    const n = Number(len.readBigUInt64LE());
    if (n > size - 8 || n > 512 * 1024 * 1024)
      throw new ModelFolderError(`${file}: not a safetensors file, or truncated (its header says ${n} bytes of header, the file has ${size} bytes)`);
    const buf = Buffer.alloc(n);
    fs.readSync(fd, buf, 0, n, 8);
    try {
      header = JSON.parse(buf.toString('utf8')) as typeof header;
    } catch {
      throw new ModelFolderError(`${file}: not a safetensors file (its header is not JSON)`);
    }
    let end = 0;
    for (const [k, v] of Object.entries(header)) if (k !== '__metadata__' && v.data_offsets) end = Math.max(end, v.data_offsets[1]);
    if (8 + n + end > size)
      throw new ModelFolderError(`${file}: truncated (its tensors need ${8 + n + end} bytes, the file has ${size}); download or copy it again`);
  } finally {
    fs.closeSync(fd);
  }
  const configs = JSON.parse(await native().singleFileConfigs(file)) as Record<Component, Record<string, unknown>>;
  singleFileConfigs.set(path.resolve(file), configs);
}

function configsOf(file: string): Record<Component, Record<string, unknown>> {
  const c = singleFileConfigs.get(path.resolve(file));
  if (!c) throw new Error(`${file}: call checkModel() before reading a single file's configs`);
  return c;
}

/**
 * checkModelFolder for what --pretrained-model-name-or-path may be: a diffusers folder, or a single-file SD 1.x
 * checkpoint (`.safetensors` in the original layout; its configs are inferred from the tensors).
 */
export async function checkModel(model: string, components: Component[], needTokenizer = true): Promise<void> {
  if (isSingleFile(model)) await checkSingleFile(model);
  else checkModelFolder(model, components, needTokenizer);
}

/** A component's config.json object: the folder's file, or what the native loader inferred from a single file. */
export function modelConfig(model: string, component: Component): Record<string, unknown> {
  if (isSingleFile(model)) return configsOf(model)[component];
  return JSON.parse(fs.readFileSync(path.join(model, component, 'config.json'), 'utf8')) as Record<string, unknown>;
}

/** A component's config.json file: the folder's, or (single file) the inferred config written to a temporary file. */
export function modelConfigFile(model: string, component: Component): string {
  if (!isSingleFile(model)) return path.join(model, component, 'config.json');
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'train-lora-config-')), 'config.json');
  fs.writeFileSync(file, `${JSON.stringify(configsOf(model)[component], null, 2)}\n`);
  return file;
}

/** The tokenizer folder: the model folder's tokenizer/, or for a single file the shipped one that fits its text encoder. */
export function modelTokenizerDir(model: string): string {
  if (!isSingleFile(model)) return path.join(model, 'tokenizer');
  const vocab = Number(configsOf(model).text_encoder.vocab_size);
  if (vocab === 49408) return CLIP_TOKENIZER;
  if (vocab === 1000) return TINY_TOKENIZER;
  throw new ModelFolderError(`${model}: its text encoder has ${vocab} tokens; train-lora ships tokenizers for CLIP's 49408 (and the test models' 1000) only`);
}

/** scheduler_config.json: the model folder's, or SD 1.5's for a single file (v-prediction models: --prediction-type v_prediction). */
export function modelSchedulerConfig(model: string): string {
  return isSingleFile(model) ? SD15_SCHEDULER_CONFIG : path.join(model, 'scheduler', 'scheduler_config.json');
}

/**
 * Writes a complete diffusers-layout folder with seeded random weights: `tiny` (a few MB) or `sd15` (the real
 * SD 1.5 shapes: 860M-parameter UNet, ~4 GB in fp32). The tokenizer is the project's small CLIP BPE vocabulary.
 * `demo` is `tiny` with the hand-set autoencoder VAE and, unless `pretrainedBase` is false, the UNet and text
 * encoder of assets/demo-base (pre-trained on the demo shapes on random, unnamed backgrounds; see scripts/make-demo-base.js).
 */
export async function makeTinyModel(outDir: string, preset: ModelPreset = 'tiny', seed = 0, options: { pretrainedBase?: boolean } = {}): Promise<void> {
  const configs = path.join(ASSETS, preset === 'sd15' ? 'sd15-model' : 'tiny-model');
  if (!fs.existsSync(configs)) throw new Error(`unknown preset ${preset}`);
  const tmp = `${outDir}.tmp-${process.pid}`;
  fs.rmSync(tmp, { recursive: true, force: true });
  fs.cpSync(configs, tmp, { recursive: true });
  fs.cpSync(path.join(ASSETS, 'tiny-clip-tokenizer'), path.join(tmp, 'tokenizer'), { recursive: true });
  if (preset === 'demo') {
    // One channel per GroupNorm group (tiny's 32 groups over 32 channels) normalizes away every feature's spatial
    // mean, so such a UNet cannot predict the noise's per-channel mean: its samples keep a random colour cast.
    const unetCfg = path.join(tmp, 'unet', 'config.json');
    const cfg = JSON.parse(fs.readFileSync(unetCfg, 'utf8')) as Record<string, unknown>;
    cfg.norm_num_groups = DEMO_UNET_GROUPS;
    fs.writeFileSync(unetCfg, `${JSON.stringify(cfg, null, 2)}\n`);
  }
  let k = 0;
  for (const c of Object.keys(COMPONENTS) as Component[]) {
    await native().writeRandomWeights(path.join(tmp, c), c, seed * 1000 + k++);
  }
  if (preset === 'demo') {
    await craftDemoVae(path.join(tmp, 'vae'), DEMO_RESOLUTION);
    if (options.pretrainedBase ?? true) {
      for (const [c, file] of [['unet', 'diffusion_pytorch_model'], ['text_encoder', 'model']]) {
        const src = path.join(DEMO_BASE, c, `${file}.safetensors`);
        if (!fs.existsSync(src)) throw new Error(`${src} is missing: the demo model's pre-trained weights ship with train-lora (rebuild them with node scripts/make-demo-base.js)`);
        fs.copyFileSync(src, path.join(tmp, c, `${file}.safetensors`));
      }
    }
  }
  fs.rmSync(outDir, { recursive: true, force: true });
  fs.renameSync(tmp, outDir);
}
