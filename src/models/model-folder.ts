/**
 * Stable Diffusion model folders in diffusers layout: checking them, and generating random-weight ones
 * (`train-lora make-tiny-model`) for tests, the demo and benchmarks.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import { native } from '../native';
import { craftDemoVae } from './demo-vae';

export const ASSETS = path.resolve(__dirname, '..', '..', 'assets');

/** tiny: random weights, a few MB; demo: tiny with a hand-set autoencoder VAE for 32 px (see demo-vae.ts); sd15: SD 1.5 shapes. */
/** The resolution the demo VAE is exact for (the demo trains at it). */
export const DEMO_RESOLUTION = 32;

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
 */
export async function makeTinyModel(outDir: string, preset: ModelPreset = 'tiny', seed = 0): Promise<void> {
  const configs = path.join(ASSETS, preset === 'sd15' ? 'sd15-model' : 'tiny-model');
  if (!fs.existsSync(configs)) throw new Error(`unknown preset ${preset}`);
  const tmp = `${outDir}.tmp-${process.pid}`;
  fs.rmSync(tmp, { recursive: true, force: true });
  fs.cpSync(configs, tmp, { recursive: true });
  fs.cpSync(path.join(ASSETS, 'tiny-clip-tokenizer'), path.join(tmp, 'tokenizer'), { recursive: true });
  let k = 0;
  for (const c of Object.keys(COMPONENTS) as Component[]) {
    await native().writeRandomWeights(path.join(tmp, c), c, seed * 1000 + k++);
  }
  if (preset === 'demo') await craftDemoVae(path.join(tmp, 'vae'), DEMO_RESOLUTION);
  fs.rmSync(outDir, { recursive: true, force: true });
  fs.renameSync(tmp, outDir);
}
