/**
 * Validation images during training: each validation prompt rendered with the trainer's live LoRA (same pipeline
 * handle), the same seed every time so that images are comparable across steps, written to
 * OUT/validation/step<NNNNNN>_prompt<P>_img<I>.png with one labelled grid per validation (also sent to TensorBoard).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import type { TrainConfig } from '../config';
import { modelSchedulerConfig } from '../model-folders/model-folder';
import { gridUpscale, makeGrid, textToImage, toRgbBytes, upscaleNearest, writePng, type RgbImage } from '../inference/text-to-image';
import type { PipelineHandle } from '../native';
import type { CLIPTokenizer } from '../tokenizer';
import { validationDir, validationGridName, validationImageName, validationPromptSpecs, type ImageRenderer } from './validation';


/** The renderer for a run, or undefined when there are no validation prompts or no images are asked for. */
export function makeImageRenderer(cfg: TrainConfig, pipe: PipelineHandle, tokenizer: CLIPTokenizer, modelDir: string, outputDir: string): ImageRenderer | undefined {
  const prompts = validationPromptSpecs(cfg);
  if (!prompts.length || cfg.num_validation_images === 0) return undefined;
  // --prediction-type overrides the scheduler config's (a v-prediction model, e.g. a single file, whose config says epsilon).
  const schedulerConfig: unknown = {
    ...(JSON.parse(fs.readFileSync(modelSchedulerConfig(modelDir), 'utf8')) as Record<string, unknown>),
    ...(cfg.prediction_type ? { prediction_type: cfg.prediction_type } : {}),
  };
  const size = cfg.validation_resolution ?? cfg.resolution;
  const seed = cfg.validation_seed ?? cfg.seed;
  const dir = validationDir(outputDir);
  return async (step) => {
    fs.mkdirSync(dir, { recursive: true });
    const images: string[] = [];
    const all: RgbImage[] = [];
    const labels: string[] = [];
    // One prompt at a time (batch = images per prompt, x2 for guidance), each from the same seed.
    // A prompts-file line may set its own size, seed, steps, guidance and negative prompt (kohya's --w --h --d --s --l --n).
    for (let p = 0; p < prompts.length; p++) {
      const pr = prompts[p];
      const out = await textToImage(pipe, tokenizer, schedulerConfig, {
        prompts: [pr.prompt],
        negativePrompt: (pr.negative ?? cfg.validation_negative_prompt) || undefined,
        numImagesPerPrompt: cfg.num_validation_images,
        width: pr.width ?? size,
        height: pr.height ?? size,
        numInferenceSteps: pr.steps ?? cfg.validation_num_inference_steps,
        guidanceScale: pr.guidance ?? cfg.validation_guidance_scale,
        seed: pr.seed ?? seed,
        scheduler: cfg.validation_scheduler,
      });
      for (const im of out) {
        const file = path.join(dir, validationImageName(step, p, im.imageIndex));
        await writePng(file, im);
        images.push(file);
        all.push(im);
        labels.push(pr.prompt);
      }
    }
    // One row per prompt; prompts of other sizes are centred in cells of the largest size (white around them).
    const factor = gridUpscale(Math.min(size, ...prompts.map((pr) => Math.min(pr.width ?? size, pr.height ?? size))));
    const cells = all.map((im) => upscaleNearest(im, factor));
    const png = await makeGrid(padToSameSize(cells), labels, cfg.num_validation_images);
    const grid = path.join(dir, validationGridName(step));
    fs.writeFileSync(grid, png);
    const meta = await import('sharp').then((s) => s.default(png).metadata());
    return { images, grid, pngs: [{ tag: 'validation/grid', png, width: meta.width ?? 0, height: meta.height ?? 0 }] };
  };
}

/** Images centred on white cells of the largest width and height among them (unchanged when all have one size). */
export function padToSameSize(images: RgbImage[]): RgbImage[] {
  const w = Math.max(...images.map((im) => im.width));
  const h = Math.max(...images.map((im) => im.height));
  return images.map((im) => {
    if (im.width === w && im.height === h) return im;
    const src = toRgbBytes(im);
    const data = new Uint8Array(w * h * 3).fill(255);
    const left = Math.floor((w - im.width) / 2);
    const top = Math.floor((h - im.height) / 2);
    for (let y = 0; y < im.height; y++) data.set(src.subarray(y * im.width * 3, (y + 1) * im.width * 3), ((top + y) * w + left) * 3);
    return { data, width: w, height: h };
  });
}
