/**
 * Validation images during training: each validation prompt rendered with the trainer's live LoRA (same pipeline
 * handle), the same seed every time so that images are comparable across steps, written to
 * OUT/validation/step<NNNNNN>_prompt<P>_img<I>.png with one labelled grid per validation (also sent to TensorBoard).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import type { TrainConfig } from '../config';
import { modelSchedulerConfig } from '../models/model-folder';
import { gridUpscale, makeGrid, textToImage, upscaleNearest, writePng, type RgbImage } from '../inference/text-to-image';
import type { PipelineHandle } from '../native';
import type { CLIPTokenizer } from '../tokenizer';
import { validationDir, validationGridName, validationImageName, validationPrompts, type ImageRenderer } from './validation';


/** The renderer for a run, or undefined when there are no validation prompts or no images are asked for. */
export function makeImageRenderer(cfg: TrainConfig, pipe: PipelineHandle, tokenizer: CLIPTokenizer, modelDir: string, outputDir: string): ImageRenderer | undefined {
  const prompts = validationPrompts(cfg);
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
    for (let p = 0; p < prompts.length; p++) {
      const out = await textToImage(pipe, tokenizer, schedulerConfig, {
        prompts: [prompts[p]],
        negativePrompt: cfg.validation_negative_prompt || undefined,
        numImagesPerPrompt: cfg.num_validation_images,
        width: size,
        height: size,
        numInferenceSteps: cfg.validation_num_inference_steps,
        guidanceScale: cfg.validation_guidance_scale,
        seed,
        scheduler: cfg.validation_scheduler,
      });
      for (const im of out) {
        const file = path.join(dir, validationImageName(step, p, im.imageIndex));
        await writePng(file, im);
        images.push(file);
        all.push(im);
        labels.push(prompts[p]);
      }
    }
    const factor = gridUpscale(size);
    const png = await makeGrid(all.map((im) => upscaleNearest(im, factor)), labels, cfg.num_validation_images);
    const grid = path.join(dir, validationGridName(step));
    fs.writeFileSync(grid, png);
    const meta = await import('sharp').then((s) => s.default(png).metadata());
    return { images, grid, pngs: [{ tag: 'validation/grid', png, width: meta.width ?? 0, height: meta.height ?? 0 }] };
  };
}
