/**
 * Text-to-image generation equal to diffusers' StableDiffusionPipeline (fp32: within 1e-4 of its output_type="np"
 * images for the same seed), on a loaded Pipeline handle. The latents and the scheduler's history stay on the
 * torch thread (a native Sampler session); this file only sends the scheduler's op programs
 * (src/inference/schedulers.ts), one native call per step, and gets the images back at the end.
 *
 * Safe during training: sampling runs with gradients off, modules in eval mode (restored afterwards), and its own
 * CPU generator, so a Trainer on the same Pipeline continues bit-identically.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import sharp from 'sharp';

import { native, type HostTensor, type PipelineHandle } from '../native';
import { fromInt64 } from '../tensors';
import type { CLIPTokenizer } from '../tokenizer';
import { makeSchedule, type SchedulerName, type SchedulerOverrides } from './schedulers';

export interface TextToImageOptions {
  prompts: string[];
  /** One negative prompt for every image ("" when absent, as diffusers). */
  negativePrompt?: string;
  numImagesPerPrompt?: number;
  /** Pixels; multiples of the VAE's downscale factor (8 for SD). Default 512. */
  width?: number;
  height?: number;
  numInferenceSteps?: number;
  guidanceScale?: number;
  seed?: number;
  scheduler?: SchedulerName;
  /** Scheduler config keys to override (e.g. prediction_type). */
  schedulerOverrides?: SchedulerOverrides;
  /** 'uint8' (default): PIL-equivalent bytes; 'float': diffusers' output_type="np" values in [0, 1]. */
  output?: 'uint8' | 'float';
  /** After each denoising step (1-based). */
  onStep?: (step: number, total: number) => void;
}

/** An RGB image, row-major HWC. */
export interface RgbImage {
  width: number;
  height: number;
  data: Uint8Array | Float32Array;
}

export interface GeneratedImage extends RgbImage {
  prompt: string;
  promptIndex: number;
  /** Index among this prompt's images. */
  imageIndex: number;
}

/**
 * Generates numImagesPerPrompt images per prompt, prompt-major (as diffusers orders its batch). Resolves with
 * one entry per image, each saying which prompt and index it is.
 */
export async function textToImage(
  pipe: PipelineHandle,
  tokenizer: CLIPTokenizer,
  schedulerConfig: unknown,
  opts: TextToImageOptions,
): Promise<GeneratedImage[]> {
  const prompts = opts.prompts;
  if (!prompts.length) throw new Error('textToImage: give at least one prompt');
  const perPrompt = opts.numImagesPerPrompt ?? 1;
  if (!Number.isSafeInteger(perPrompt) || perPrompt < 1) throw new RangeError(`numImagesPerPrompt must be a positive integer, got ${perPrompt}`);
  const width = opts.width ?? 512;
  const height = opts.height ?? 512;
  for (const [k, v] of [['width', width], ['height', height]] as const) {
    if (!Number.isSafeInteger(v) || v <= 0 || v % 8 !== 0) throw new RangeError(`${k} must be a positive multiple of 8, got ${v}`);
  }
  const schedule = makeSchedule(opts.scheduler ?? 'pndm', schedulerConfig, opts.numInferenceSteps ?? 25, opts.schedulerOverrides);
  const maxLength = tokenizer.modelMaxLength;
  const ids = tokenizer.encodeBatch(prompts, { maxLength, padding: 'max_length' });
  const neg = tokenizer.encodeBatch([opts.negativePrompt ?? ''], { maxLength, padding: 'max_length' });
  const n = native();
  const { sampler } = await n.samplerCreate(pipe, {
    inputIds: fromInt64('input_ids', [ids.length, maxLength], ids.flat()),
    negativeInputIds: fromInt64('negative_input_ids', [1, maxLength], neg.flat()),
    guidanceScale: opts.guidanceScale ?? 7.5,
    width,
    height,
    numImagesPerPrompt: perPrompt,
    seed: opts.seed ?? 0,
    initNoiseSigma: schedule.initNoiseSigma,
  });
  try {
    const total = schedule.steps.length;
    for (let i = 0; i < total; i++) {
      await n.samplerStep(sampler, schedule.steps[i]);
      opts.onStep?.(i + 1, total);
    }
    const out = await n.samplerDecode(sampler, { output: opts.output ?? 'uint8' });
    return splitImages(out, prompts, perPrompt);
  } finally {
    n.dispose(sampler);
  }
}

function splitImages(t: HostTensor, prompts: string[], perPrompt: number): GeneratedImage[] {
  const [b, h, w, c] = t.shape;
  if (c !== 3 || b !== prompts.length * perPrompt) throw new Error(`samplerDecode returned shape [${t.shape.join(', ')}]`);
  const per = h * w * 3;
  const float = t.dtype === 'F32';
  const all = float
    ? new Float32Array(t.data.buffer.slice(t.data.byteOffset, t.data.byteOffset + t.data.byteLength))
    : new Uint8Array(t.data.buffer.slice(t.data.byteOffset, t.data.byteOffset + t.data.byteLength));
  const out: GeneratedImage[] = [];
  for (let i = 0; i < b; i++) {
    const promptIndex = Math.floor(i / perPrompt);
    out.push({ prompt: prompts[promptIndex], promptIndex, imageIndex: i % perPrompt, width: w, height: h, data: all.slice(i * per, (i + 1) * per) });
  }
  return out;
}

/** uint8 RGB bytes of an image (float images are scaled as diffusers' numpy_to_pil: round(x * 255)). */
export function toRgbBytes(img: RgbImage): Uint8Array {
  if (img.data instanceof Uint8Array) return img.data;
  return Uint8Array.from(img.data, (v) => Math.round(Math.min(1, Math.max(0, v)) * 255));
}

export async function pngBuffer(img: RgbImage): Promise<Buffer> {
  return sharp(Buffer.from(toRgbBytes(img)), { raw: { width: img.width, height: img.height, channels: 3 } })
    .png()
    .toBuffer();
}

/** Writes an RGB image as PNG (creating the folder). */
export async function writePng(file: string, img: RgbImage): Promise<void> {
  fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  fs.writeFileSync(file, await pngBuffer(img));
}

// ------------------------------------------------------------------ grid with labels

const LABEL_HEIGHT = 20;
const FONT_SIZE = 12;

function escapeXml(s: string): string {
  return s.replace(/[<>&'"]/g, (c) => ({ '<': '&lt;', '>': '&gt;', '&': '&amp;', "'": '&apos;', '"': '&quot;' })[c] ?? c);
}

/** Shortens text to about what fits in `width` pixels at FONT_SIZE. */
function fitText(text: string, width: number): string {
  const maxChars = Math.max(1, Math.floor((width - 6) / (FONT_SIZE * 0.6)));
  return text.length <= maxChars ? text : text.slice(0, Math.max(1, maxChars - 1)) + '…';
}

// A 3x5 bitmap font (rows top to bottom, 3 bits each) for when no system font renders SVG text.
const GLYPHS: Record<string, number[]> = {
  A: [2, 5, 7, 5, 5], B: [6, 5, 6, 5, 6], C: [3, 4, 4, 4, 3], D: [6, 5, 5, 5, 6], E: [7, 4, 6, 4, 7], F: [7, 4, 6, 4, 4],
  G: [3, 4, 5, 5, 3], H: [5, 5, 7, 5, 5], I: [7, 2, 2, 2, 7], J: [1, 1, 1, 5, 2], K: [5, 5, 6, 5, 5], L: [4, 4, 4, 4, 7],
  M: [5, 7, 7, 5, 5], N: [6, 5, 5, 5, 5], O: [2, 5, 5, 5, 2], P: [6, 5, 6, 4, 4], Q: [2, 5, 5, 6, 3], R: [6, 5, 6, 5, 5],
  S: [3, 4, 2, 1, 6], T: [7, 2, 2, 2, 2], U: [5, 5, 5, 5, 7], V: [5, 5, 5, 5, 2], W: [5, 5, 7, 7, 5], X: [5, 5, 2, 5, 5],
  Y: [5, 5, 2, 2, 2], Z: [7, 1, 2, 4, 7], '0': [7, 5, 5, 5, 7], '1': [2, 6, 2, 2, 7], '2': [6, 1, 2, 4, 7], '3': [6, 1, 2, 1, 6],
  '4': [5, 5, 7, 1, 1], '5': [7, 4, 6, 1, 6], '6': [3, 4, 7, 5, 7], '7': [7, 1, 2, 2, 2], '8': [7, 5, 7, 5, 7], '9': [7, 5, 7, 1, 6],
  '.': [0, 0, 0, 0, 2], ',': [0, 0, 0, 2, 4], '-': [0, 0, 7, 0, 0], ':': [0, 2, 0, 2, 0], '?': [6, 1, 2, 0, 2], '!': [2, 2, 2, 0, 2],
};

/** The label as SVG rectangles of the bitmap font (no fonts needed). */
function bitmapLabelSvg(text: string, width: number): string {
  const px = 2;
  const maxChars = Math.max(1, Math.floor((width - 4) / (4 * px)));
  const rects: string[] = [];
  [...text.toUpperCase().slice(0, maxChars)].forEach((ch, i) => {
    const g = GLYPHS[ch];
    if (!g) return;
    g.forEach((row, y) => {
      for (let x = 0; x < 3; x++) if (row & (4 >> x)) rects.push(`<rect x="${3 + (i * 4 + x) * px}" y="${5 + y * px}" width="${px}" height="${px}"/>`);
    });
  });
  return `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${LABEL_HEIGHT}"><rect width="100%" height="100%" fill="white"/><g fill="black">${rects.join('')}</g></svg>`;
}

function textLabelSvg(text: string, width: number): string {
  return (
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${LABEL_HEIGHT}"><rect width="100%" height="100%" fill="white"/>` +
    `<text x="3" y="${LABEL_HEIGHT - 6}" font-family="DejaVu Sans, sans-serif" font-size="${FONT_SIZE}" fill="black">${escapeXml(fitText(text, width))}</text></svg>`
  );
}

let fontsRender: boolean | undefined;
/** Whether SVG text renders here (it needs a system font); checked once. */
async function svgTextRenders(): Promise<boolean> {
  if (fontsRender !== undefined) return fontsRender;
  try {
    const { data, info } = await sharp(Buffer.from(textLabelSvg('Test', 60))).greyscale().raw().toBuffer({ resolveWithObject: true });
    let dark = 0;
    for (let i = 0; i < data.length; i += info.channels) if (data[i] < 128) dark++;
    fontsRender = dark > 5;
  } catch {
    fontsRender = false;
  }
  return fontsRender;
}

/**
 * A label strip (`width` x 20) as raw RGB: SVG text when a system font renders here, else the built-in bitmap font
 * (`bitmap: true` forces it); a blank strip if even that fails (a label never fails a run).
 */
export async function labelStrip(text: string, width: number, opts: { bitmap?: boolean } = {}): Promise<Buffer> {
  const blank = (): Buffer => Buffer.alloc(width * LABEL_HEIGHT * 3, 255);
  try {
    const svg = !opts.bitmap && (await svgTextRenders()) ? textLabelSvg(text, width) : bitmapLabelSvg(text, width);
    return await sharp(Buffer.from(svg)).removeAlpha().raw().toBuffer();
  } catch {
    return blank();
  }
}

/** Nearest-neighbour upscaling by an integer factor (tiny validation images stay visible in the grid). */
export function upscaleNearest(img: RgbImage, factor: number): RgbImage {
  if (factor <= 1) return img;
  const w = img.width * factor;
  const h = img.height * factor;
  const out = new Uint8Array(w * h * 3);
  for (let y = 0; y < h; y++) {
    const sy = Math.floor(y / factor);
    for (let x = 0; x < w; x++) {
      const s = (sy * img.width + Math.floor(x / factor)) * 3;
      const d = (y * w + x) * 3;
      out[d] = img.data[s];
      out[d + 1] = img.data[s + 1];
      out[d + 2] = img.data[s + 2];
    }
  }
  return { data: out, width: w, height: h };
}

/** The integer factor that makes a grid cell at least 128 px wide, so that tiny images and their labels stay readable. */
export function gridUpscale(size: number): number {
  return Math.max(1, Math.ceil(128 / size));
}

/**
 * A PNG grid of the images (`columns` per row, default: as many as fit a square) with each image's label in a
 * strip under it. All images must have the same size.
 */
export async function makeGrid(images: RgbImage[], labels: string[], columns?: number): Promise<Buffer> {
  if (!images.length) throw new Error('makeGrid: no images');
  const { width: w, height: h } = images[0];
  if (images.some((im) => im.width !== w || im.height !== h)) throw new Error('makeGrid: images differ in size');
  const cols = Math.max(1, Math.min(images.length, columns ?? Math.ceil(Math.sqrt(images.length))));
  const rows = Math.ceil(images.length / cols);
  const cellH = h + LABEL_HEIGHT;
  const composites: sharp.OverlayOptions[] = [];
  for (let i = 0; i < images.length; i++) {
    const left = (i % cols) * w;
    const top = Math.floor(i / cols) * cellH;
    composites.push({ input: Buffer.from(toRgbBytes(images[i])), raw: { width: w, height: h, channels: 3 }, left, top });
    composites.push({ input: await labelStrip(labels[i] ?? '', w), raw: { width: w, height: LABEL_HEIGHT, channels: 3 }, left, top: top + h });
  }
  return sharp({ create: { width: cols * w, height: rows * cellH, channels: 3, background: { r: 255, g: 255, b: 255 } } })
    .composite(composites)
    .png()
    .toBuffer();
}
