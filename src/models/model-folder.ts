/**
 * Stable Diffusion model folders in diffusers layout: checking them, and generating random-weight ones
 * (`train-lora make-tiny-model`) for tests, the demo and benchmarks.
 */
import * as fs from 'node:fs';
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
    for (const f of ['vocab.json', 'merges.txt'])
      if (!fs.existsSync(path.join(dir, 'tokenizer', f))) problems.push(`${path.join(dir, 'tokenizer', f)} is missing`);
  }
  if (problems.length)
    throw new ModelFolderError(
      `${dir} is not a complete Stable Diffusion folder in diffusers layout:\n  - ${problems.join('\n  - ')}\n` +
        'Expected model_index.json, unet/, vae/, text_encoder/ (config.json + *.safetensors) and tokenizer/ (vocab.json, merges.txt).',
    );
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
