/**
 * `train-lora generate`: text-to-image with a base model and optionally a LoRA (a .safetensors file in diffusers,
 * peft or kohya keys, a PEFT adapter folder or a training checkpoint folder, each at its own alpha). Writes OUT/<prompt-index>_<image-index>.png (both 0-based,
 * e.g. 0_0.png, 0_1.png, 1_0.png) and, with --grid, OUT/grid.png with the prompts as labels.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import type { Argv } from 'yargs';

import { checkModel, modelConfig, modelSchedulerConfig, modelTokenizerDir } from '../model-folders/model-folder';
import { native, type Precision } from '../native';
import { resolveDevice } from '../device';
import { LORA_ALPHA, MODEL_FOLDER, RUN_DEVICE, RUN_DTYPE } from './model-options';
import { ProgressBar } from '../logging/progress';
import { CLIPTokenizer } from '../tokenizer';
import { SCHEDULER_NAMES, type SchedulerName } from '../inference/schedulers';
import { gridUpscale, makeGrid, textToImage, upscaleNearest, writePng } from '../inference/text-to-image';

export interface GenerateArgs {
  model: string;
  lora?: string;
  loraScale?: number;
  /** --lora-alpha: the alpha of a LoRA file that does not carry it. */
  loraAlpha?: number;
  /** Overrides the scheduler config's prediction_type (a v-prediction single file: its config is SD 1.5's, epsilon). */
  predictionType?: 'epsilon' | 'v_prediction';
  prompt: string[];
  negativePrompt?: string;
  numImages?: number;
  seed?: number;
  numInferenceSteps?: number;
  guidanceScale?: number;
  width?: number;
  height?: number;
  scheduler?: SchedulerName;
  device?: string;
  dtype?: Precision;
  out: string;
  grid?: boolean;
  /** Progress output (default process.stderr; the bar draws only on a TTY). */
  stream?: NodeJS.WriteStream;
}

function readJson(file: string): Record<string, unknown> {
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8')) as Record<string, unknown>;
  } catch (e) {
    throw new Error(`${file}: cannot read (${(e as Error).message})`);
  }
}

/** diffusers' default size: unet sample_size * vae_scale_factor (2 ** (len(vae block_out_channels) - 1)). */
export function defaultImageSize(model: string): { size: number; vaeScale: number } {
  const unet = modelConfig(model, 'unet');
  const vae = modelConfig(model, 'vae');
  const blocks = Array.isArray(vae.block_out_channels) ? vae.block_out_channels.length : 1;
  const vaeScale = 2 ** (blocks - 1);
  const ss = Array.isArray(unet.sample_size) ? Number(unet.sample_size[0]) : Number(unet.sample_size ?? 64);
  return { size: ss * vaeScale, vaeScale };
}

/** The LoRA to apply: a file, a PEFT adapter folder or a checkpoint folder; the native loader reads each at its own alpha. */
function resolveLora(lora: string): string {
  if (!fs.existsSync(lora)) throw new Error(`--lora ${lora}: not found (give a LoRA .safetensors file, a PEFT adapter folder or a checkpoint folder)`);
  return lora;
}

export async function runGenerateCommand(args: GenerateArgs): Promise<string[]> {
  if (!args.prompt.length) throw new Error('generate: give at least one --prompt');
  await checkModel(args.model, ['text_encoder', 'unet', 'vae'], true);
  const { size, vaeScale } = defaultImageSize(args.model);
  const width = args.width ?? size;
  const height = args.height ?? size;
  for (const [flag, v] of [['--width', width], ['--height', height]] as const) {
    if (!Number.isSafeInteger(v) || v <= 0 || v % Math.max(8, vaeScale) !== 0)
      throw new Error(`${flag} ${v}: must be a positive multiple of ${Math.max(8, vaeScale)}`);
  }
  const numImages = args.numImages ?? 1;
  if (!Number.isSafeInteger(numImages) || numImages < 1) throw new Error(`--num-images ${numImages}: must be a positive integer`);
  const steps = args.numInferenceSteps ?? 25;
  if (!Number.isSafeInteger(steps) || steps < 1) throw new Error(`--num-inference-steps ${steps}: must be a positive integer`);
  const scheduler = args.scheduler ?? 'pndm';
  if (!SCHEDULER_NAMES.includes(scheduler)) throw new Error(`--scheduler ${scheduler}: choose one of ${SCHEDULER_NAMES.join(', ')}`);
  const schedulerFile = modelSchedulerConfig(args.model);
  const schedulerConfig = { ...(fs.existsSync(schedulerFile) ? readJson(schedulerFile) : {}), ...(args.predictionType ? { prediction_type: args.predictionType } : {}) };
  const tokenizer = CLIPTokenizer.fromFolder(modelTokenizerDir(args.model));

  const n = native();
  const pipe = await n.loadPipeline(args.model, { device: await resolveDevice(args.device ?? 'cpu'), dtype: args.dtype ?? 'fp32', components: ['text_encoder', 'unet', 'vae'] });
  try {
    if (args.lora) {
      const file = resolveLora(args.lora);
      try {
        await n.pipelineApplyLora(pipe, file, args.loraScale ?? 1, args.loraAlpha);
      } catch (e) {
        throw new Error(`--lora ${args.lora}: ${(e as Error).message}`);
      }
    }
    let progress: ProgressBar | null = null;
    const images = await textToImage(pipe, tokenizer, schedulerConfig, {
      prompts: args.prompt,
      negativePrompt: args.negativePrompt,
      numImagesPerPrompt: numImages,
      width,
      height,
      numInferenceSteps: steps,
      guidanceScale: args.guidanceScale ?? 7.5,
      seed: args.seed ?? 0,
      scheduler,
      onStep: (step, total) => {
        progress ??= new ProgressBar({ total, label: 'Denoising', unit: 'step', stream: args.stream ?? process.stderr });
        progress.update(step);
      },
    });
    (progress as ProgressBar | null)?.finish();
    fs.mkdirSync(args.out, { recursive: true });
    const files: string[] = [];
    for (const img of images) {
      const f = path.join(args.out, `${img.promptIndex}_${img.imageIndex}.png`);
      await writePng(f, img);
      files.push(f);
    }
    if (args.grid) {
      const f = path.join(args.out, 'grid.png');
      const factor = gridUpscale(Math.min(images[0].width, images[0].height));
      fs.writeFileSync(f, await makeGrid(images.map((im) => upscaleNearest(im, factor)), images.map((im) => im.prompt), numImages));
      files.push(f);
    }
    return files;
  } finally {
    n.dispose(pipe);
  }
}

/** `generate`: images from prompts. */
export function generateCommand<T>(cli: Argv<T>): Argv<T> {
  return cli.command(
    'generate',
    'Generate images from prompts with a model and optionally a LoRA (writes OUT/<prompt-index>_<image-index>.png)',
    (y) =>
      y
        .option('model', MODEL_FOLDER)
        .option('lora', { type: 'string', describe: 'LoRA .safetensors (diffusers, peft or kohya keys), a PEFT adapter folder or a training checkpoint folder' })
        .option('lora-scale', { type: 'number', default: 1, describe: 'LoRA strength' })
        .option('lora-alpha', LORA_ALPHA)
        .option('prediction-type', { choices: ['epsilon', 'v_prediction'] as const, describe: "override the scheduler config's (v_prediction for a v-prediction single-file model)" })
        .option('prompt', { type: 'string', array: true, demandOption: true, describe: 'prompt (repeat for several)' })
        .option('negative-prompt', { type: 'string', describe: 'one negative prompt for every image' })
        .option('num-images', { type: 'number', default: 1, describe: 'images per prompt' })
        .option('seed', { type: 'number', default: 0 })
        .option('num-inference-steps', { type: 'number', default: 25, alias: 'steps' })
        .option('guidance-scale', { type: 'number', default: 7.5 })
        .option('width', { type: 'number', describe: 'pixels, a multiple of 8 (default: the UNet sample_size * VAE scale)' })
        .option('height', { type: 'number', describe: 'pixels, a multiple of 8 (default: the UNet sample_size * VAE scale)' })
        .option('scheduler', { choices: SCHEDULER_NAMES, default: 'pndm' as SchedulerName })
        .option('device', RUN_DEVICE)
        .option('dtype', RUN_DTYPE)
        .option('out', { type: 'string', default: 'generated', describe: 'output folder' })
        .option('grid', { type: 'boolean', default: false, describe: 'also write OUT/grid.png with the prompts as labels' }),
    async (a) => {
      const files = await runGenerateCommand({
        model: a.model,
        lora: a.lora,
        loraScale: a['lora-scale'],
        loraAlpha: a['lora-alpha'],
        predictionType: a['prediction-type'],
        prompt: a.prompt.map(String),
        negativePrompt: a['negative-prompt'],
        numImages: a['num-images'],
        seed: a.seed,
        numInferenceSteps: a['num-inference-steps'],
        guidanceScale: a['guidance-scale'],
        width: a.width,
        height: a.height,
        scheduler: a.scheduler as SchedulerName,
        device: a.device,
        dtype: a.dtype as Precision,
        out: a.out,
        grid: a.grid,
      });
      console.log(`wrote ${files.length} file(s): ${files.join(', ')}`);
    },
  );
}
