/**
 * The training image transform of diffusers' train_text_to_image_lora.py:
 *
 *   image.convert("RGB") -> Resize(resolution, interpolation) -> CenterCrop | RandomCrop(resolution)
 *   -> RandomHorizontalFlip(p=0.5) (optional) -> ToTensor -> Normalize([0.5], [0.5])
 *
 * giving float32 CHW pixels in [-1, 1] (x / 255 * 2 - 1, computed in float32 like torchvision).
 *
 * Choices that differ from (or pin down) the PIL/torchvision reference:
 * - EXIF orientation IS applied (PIL does not auto-rotate; users expect what their viewer shows).
 * - Embedded ICC profiles are honoured (sharp converts to sRGB; PIL ignores them), 16-bit images
 *   are reduced to 8 bits by sharp (PIL clips 16-bit greyscale), animated images use frame 0.
 * - Alpha is dropped, not composited, as PIL's convert("RGB") does; it is dropped BEFORE resizing
 *   (sharp on its own would resize premultiplied and change colours near transparent pixels).
 * - Resizing ("resampler"): 'pil' runs a JS port of Pillow's resampling (8-bit fixed point) that
 *   reproduces PIL's Image.resize bit for bit, but is 3-6x slower than libvips for large
 *   downscales and runs on the calling thread. 'sharp' uses libvips: for downscaling with
 *   lanczos/bilinear/bicubic it is within ~1 grey level on average of PIL (max a few levels), but
 *   its upscaling and its nearest-neighbour sample positions differ visibly from PIL's.
 *   'auto' (default) = libvips for lanczos/bilinear/bicubic downscales, the PIL port otherwise.
 *   'area' has no libvips kernel and always uses the PIL port (PIL's BOX filter, torchvision's BOX).
 */
import { readFile } from 'node:fs/promises';

import sharp from 'sharp';

import type { Prng } from './prng';

export type Interpolation = 'lanczos' | 'bilinear' | 'bicubic' | 'nearest' | 'area';
export const INTERPOLATIONS: readonly Interpolation[] = ['lanczos', 'bilinear', 'bicubic', 'nearest', 'area'];
export type Resampler = 'auto' | 'sharp' | 'pil';

export interface ImageTransformOptions {
  /** Output side in pixels (the shorter side is resized to it, then a square crop). */
  resolution: number;
  /** Default 'lanczos' (diffusers' default --image_interpolation_mode). */
  interpolation?: Interpolation;
  /** Center crop (true) or random crop (false, the default, as diffusers without --center_crop). */
  centerCrop?: boolean;
  /** Random horizontal flip with p = 0.5 (default false, as diffusers without --random_flip). */
  randomFlip?: boolean;
  /** Default 'auto'; see the module comment. */
  resampler?: Resampler;
  /**
   * An aspect-ratio bucket (--enable-bucket; see buckets.ts): resize to resizedWidth x resizedHeight (covering the
   * bucket), then crop width x height (center or random as centerCrop says), instead of the square transform.
   */
  bucket?: BucketTarget;
  /**
   * --masked-loss: also return the mask, following the image's resize, crop and flip exactly: 'alpha' (the image's
   * alpha channel; none: all ones) or a mask image file (its first channel). Values 0..255 (255 = full weight).
   */
  mask?: 'alpha' | string;
}

/** Where an image goes in its bucket: the bucket size and the size it is resized to first. */
export interface BucketTarget {
  width: number;
  height: number;
  resizedWidth: number;
  resizedHeight: number;
}

/** 8-bit RGB, row-major HWC. */
export interface RgbImage {
  data: Uint8Array;
  width: number;
  height: number;
}

export interface ProcessedImage {
  /** Float32 CHW, 3 * height * width values in [-1, 1]. */
  pixels: Float32Array;
  resolution: number;
  /** Output size (resolution x resolution, or the bucket's). */
  width: number;
  height: number;
  /** With the `mask` option: height * width mask bytes (0..255), cropped and flipped as the pixels. */
  mask?: Uint8Array;
  /** Size after EXIF orientation, before resizing (SDXL's original_size). */
  originalWidth: number;
  originalHeight: number;
  /** Size after Resize(resolution). */
  resizedWidth: number;
  resizedHeight: number;
  /** Crop offsets in the resized image (SDXL's crop_top_left), before any flip. */
  cropTop: number;
  cropLeft: number;
  flipped: boolean;
}

export interface ImageHeader {
  format: string;
  /** Size after EXIF orientation. */
  width: number;
  height: number;
}

// ---------------------------------------------------------------------------------------------
// Geometry (torchvision semantics)

/**
 * torchvision Resize(size: int): the shorter side becomes `resolution`, the longer one
 * int(resolution * long / short) (truncated, computed in double precision like Python).
 */
export function resizedSize(width: number, height: number, resolution: number): { width: number; height: number } {
  if (width <= height) return { width: resolution, height: Math.trunc((resolution * height) / width) };
  return { width: Math.trunc((resolution * width) / height), height: resolution };
}

/** Python's round(): half to even. */
function roundHalfEven(x: number): number {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

/** torchvision center_crop offsets: int(round((h - th) / 2)), with Python's banker's rounding. */
export function centerCropOffsets(height: number, width: number, cropHeight: number, cropWidth: number): { top: number; left: number } {
  return { top: roundHalfEven((height - cropHeight) / 2), left: roundHalfEven((width - cropWidth) / 2) };
}

/**
 * torchvision RandomCrop.get_params: top uniform in [0, h - th], then left uniform in [0, w - tw];
 * no draws at all when the image already has the crop size.
 */
export function randomCropOffsets(height: number, width: number, cropHeight: number, cropWidth: number, rng: Prng): { top: number; left: number } {
  if (height < cropHeight || width < cropWidth) {
    throw new RangeError(`crop ${cropWidth}x${cropHeight} is larger than the image ${width}x${height}`);
  }
  if (height === cropHeight && width === cropWidth) return { top: 0, left: 0 };
  const top = rng.int(height - cropHeight + 1);
  const left = rng.int(width - cropWidth + 1);
  return { top, left };
}

// ---------------------------------------------------------------------------------------------
// Pixels -> normalized CHW floats

/** ToTensor + Normalize(0.5, 0.5) in float32, exactly as torch computes it: (v/255 - 0.5) / 0.5. */
const NORMALIZE_LUT: Float32Array = (() => {
  const lut = new Float32Array(256);
  for (let v = 0; v < 256; v++) lut[v] = Math.fround(Math.fround(v / 255) - 0.5) * 2;
  return lut;
})();

/**
 * Copies the `size` x `size` window at (top, left) of an RGB image into `out` as normalized CHW
 * floats, mirrored horizontally when `flip` (flip happens after the crop, as in torchvision).
 */
export function cropToChw(img: RgbImage, top: number, left: number, size: number, flip: boolean, out?: Float32Array): Float32Array {
  return cropRectToChw(img, top, left, size, size, flip, out);
}

/** cropToChw for a `width` x `height` window. */
export function cropRectToChw(img: RgbImage, top: number, left: number, width: number, height: number, flip: boolean, out?: Float32Array): Float32Array {
  if (top < 0 || left < 0 || top + height > img.height || left + width > img.width) {
    throw new RangeError(`crop ${width}x${height} at (${top}, ${left}) is outside the ${img.width}x${img.height} image`);
  }
  const plane = width * height;
  const dst = out ?? new Float32Array(3 * plane);
  if (dst.length !== 3 * plane) throw new RangeError(`output has ${dst.length} floats, need ${3 * plane}`);
  const src = img.data;
  const plane2 = 2 * plane;
  for (let y = 0; y < height; y++) {
    const o = y * width;
    if (flip) {
      let s = ((top + y) * img.width + left + width - 1) * 3;
      for (let x = 0; x < width; x++, s -= 3) {
        dst[o + x] = NORMALIZE_LUT[src[s]];
        dst[plane + o + x] = NORMALIZE_LUT[src[s + 1]];
        dst[plane2 + o + x] = NORMALIZE_LUT[src[s + 2]];
      }
    } else {
      let s = ((top + y) * img.width + left) * 3;
      for (let x = 0; x < width; x++, s += 3) {
        dst[o + x] = NORMALIZE_LUT[src[s]];
        dst[plane + o + x] = NORMALIZE_LUT[src[s + 1]];
        dst[plane2 + o + x] = NORMALIZE_LUT[src[s + 2]];
      }
    }
  }
  return dst;
}

// ---------------------------------------------------------------------------------------------
// Pillow's resampling, ported (src/libImaging/Resample.c and Geometry.c, 8 bits per channel)

interface Filter {
  support: number;
  fn: (x: number) => number;
}

const sinc = (x: number): number => {
  if (x === 0) return 1;
  x *= Math.PI;
  return Math.sin(x) / x;
};

const PIL_FILTERS: Record<Exclude<Interpolation, 'nearest'>, Filter> = {
  area: { support: 0.5, fn: (x) => (x > -0.5 && x <= 0.5 ? 1 : 0) },
  bilinear: {
    support: 1,
    fn: (x) => {
      x = Math.abs(x);
      return x < 1 ? 1 - x : 0;
    },
  },
  bicubic: {
    support: 2,
    fn: (x) => {
      const a = -0.5;
      x = Math.abs(x);
      if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
      if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
      return 0;
    },
  },
  lanczos: { support: 3, fn: (x) => (x >= -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0) },
};

const PRECISION_BITS = 32 - 8 - 2;

interface Coeffs {
  ksize: number;
  /** Per output pixel: first input index and tap count. */
  bounds: Int32Array;
  /** Fixed-point taps, ksize per output pixel. */
  kk: Int32Array;
}

/** precompute_coeffs + normalize_coeffs_8bpc for a full [0, inSize) box. */
function precomputeCoeffs(inSize: number, outSize: number, filter: Filter): Coeffs {
  const scale = inSize / outSize;
  const filterscale = Math.max(scale, 1);
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2);
  const kk = new Int32Array(outSize * ksize);
  const w = new Float64Array(ksize);
  const ss = 1 / filterscale;
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    const xmin = Math.max(Math.trunc(center - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(center + support + 0.5), inSize) - xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      w[x] = filter.fn((x + xmin - center + 0.5) * ss);
      ww += w[x];
    }
    for (let x = 0; x < xmax; x++) {
      const k = ww !== 0 ? w[x] / ww : w[x];
      kk[xx * ksize + x] = k < 0 ? Math.trunc(-0.5 + k * (1 << PRECISION_BITS)) : Math.trunc(0.5 + k * (1 << PRECISION_BITS));
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, bounds, kk };
}

/** clip8: the accumulator (with its 0.5 rounding bias already added) to 0..255. */
function clip8(v: number): number {
  const r = v >> PRECISION_BITS;
  return r < 0 ? 0 : r > 255 ? 255 : r;
}

/** Window of a resized image to compute: rows [top, top+height), columns [left, left+width). */
export interface Region {
  top: number;
  left: number;
  width: number;
  height: number;
}

/**
 * PIL's Image.resize((width, height), filter) on an RGB image, bit-exact, computing only
 * `region` of the output (default: all of it). Each output pixel depends only on its own taps,
 * so a region is identical to cropping the full result.
 */
export function pilResize(img: RgbImage, width: number, height: number, interpolation: Interpolation, region?: Region): RgbImage {
  const r = region ?? { top: 0, left: 0, width, height };
  if (r.top < 0 || r.left < 0 || r.top + r.height > height || r.left + r.width > width) {
    throw new RangeError('region is outside the output image');
  }
  if (width === img.width && height === img.height) return cropRgb(img, r);
  if (interpolation === 'nearest') return pilNearest(img, width, height, r);

  const filter = PIL_FILTERS[interpolation];
  const needH = width !== img.width;
  const needV = height !== img.height;
  const v = precomputeCoeffs(img.height, height, filter);
  // Source rows the vertical pass reads for the region's rows.
  const yFirst = needV ? v.bounds[r.top * 2] : r.top;
  const yLast = needV ? v.bounds[(r.top + r.height - 1) * 2] + v.bounds[(r.top + r.height - 1) * 2 + 1] : r.top + r.height;

  // Horizontal pass over rows [yFirst, yLast), output columns of the region only.
  let tmp: RgbImage;
  if (needH) {
    const h = precomputeCoeffs(img.width, width, filter);
    const rows = yLast - yFirst;
    const data = new Uint8Array(rows * r.width * 3);
    const src = img.data;
    const half = 1 << (PRECISION_BITS - 1);
    for (let y = 0; y < rows; y++) {
      const srow = (y + yFirst) * img.width * 3;
      for (let xo = 0; xo < r.width; xo++) {
        const xx = xo + r.left;
        const xmin = h.bounds[xx * 2];
        const xmax = h.bounds[xx * 2 + 1];
        const k0 = xx * h.ksize;
        // int32 arithmetic throughout, as PIL's (the taps leave two bits of headroom).
        let s0 = half;
        let s1 = half;
        let s2 = half;
        for (let x = 0; x < xmax; x++) {
          const k = h.kk[k0 + x];
          const p = srow + (x + xmin) * 3;
          s0 = (s0 + Math.imul(src[p], k)) | 0;
          s1 = (s1 + Math.imul(src[p + 1], k)) | 0;
          s2 = (s2 + Math.imul(src[p + 2], k)) | 0;
        }
        const o = (y * r.width + xo) * 3;
        data[o] = clip8(s0);
        data[o + 1] = clip8(s1);
        data[o + 2] = clip8(s2);
      }
    }
    tmp = { data, width: r.width, height: rows };
  } else {
    tmp = cropRgb(img, { top: yFirst, left: r.left, width: r.width, height: yLast - yFirst });
  }
  if (!needV) return tmp;

  // Vertical pass (tmp row 0 is source row yFirst), accumulating whole rows for locality.
  const out = new Uint8Array(r.width * r.height * 3);
  const stride = tmp.width * 3;
  const acc = new Int32Array(stride);
  for (let yo = 0; yo < r.height; yo++) {
    const yy = yo + r.top;
    const ymin = v.bounds[yy * 2] - yFirst;
    const ymax = v.bounds[yy * 2 + 1];
    const k0 = yy * v.ksize;
    acc.fill(1 << (PRECISION_BITS - 1));
    for (let y = 0; y < ymax; y++) {
      const k = v.kk[k0 + y];
      const row = (y + ymin) * stride;
      for (let i = 0; i < stride; i++) acc[i] = (acc[i] + Math.imul(tmp.data[row + i], k)) | 0;
    }
    const o = yo * stride;
    for (let i = 0; i < stride; i++) out[o + i] = clip8(acc[i]);
  }
  return { data: out, width: r.width, height: r.height };
}

/** PIL's NEAREST resize (ImagingScaleAffine): accumulated double coordinates, truncated. */
function pilNearest(img: RgbImage, width: number, height: number, r: Region): RgbImage {
  const a0 = img.width / width;
  const a4 = img.height / height;
  const xin = new Int32Array(width);
  let xo = a0 * 0.5;
  for (let x = 0; x < width; x++, xo += a0) xin[x] = Math.min(Math.trunc(xo), img.width - 1);
  const out = new Uint8Array(r.width * r.height * 3);
  let yo = a4 * 0.5;
  for (let y = 0; y < height; y++, yo += a4) {
    if (y < r.top || y >= r.top + r.height) continue;
    const yi = Math.min(Math.trunc(yo), img.height - 1);
    for (let x = 0; x < r.width; x++) {
      const s = (yi * img.width + xin[x + r.left]) * 3;
      const o = ((y - r.top) * r.width + x) * 3;
      out[o] = img.data[s];
      out[o + 1] = img.data[s + 1];
      out[o + 2] = img.data[s + 2];
    }
  }
  return { data: out, width: r.width, height: r.height };
}

function cropRgb(img: RgbImage, r: Region): RgbImage {
  if (r.top === 0 && r.left === 0 && r.width === img.width && r.height === img.height) return img;
  const out = new Uint8Array(r.width * r.height * 3);
  for (let y = 0; y < r.height; y++) {
    const s = ((y + r.top) * img.width + r.left) * 3;
    out.set(img.data.subarray(s, s + r.width * 3), y * r.width * 3);
  }
  return { data: out, width: r.width, height: r.height };
}

// ---------------------------------------------------------------------------------------------
// Decoding with sharp

const SHARP_KERNELS: Record<Exclude<Interpolation, 'area'>, keyof sharp.KernelEnum> = {
  lanczos: 'lanczos3',
  bilinear: 'linear',
  bicubic: 'cubic', // Catmull-Rom, as PIL's BICUBIC (a = -0.5)
  nearest: 'nearest',
};

type Source = string | Buffer;

const load = (src: Source): Promise<Buffer> => (typeof src === 'string' ? readFile(src) : Promise.resolve(src));

/** The header only (fast): format and EXIF-oriented size. Throws if sharp cannot parse it. */
export async function readImageHeader(src: Source): Promise<ImageHeader> {
  const meta = await sharp(src).metadata();
  if (!meta.width || !meta.height) throw new Error('image has no size');
  return { format: meta.format, width: meta.autoOrient.width, height: meta.autoOrient.height };
}

/** Decodes to 8-bit sRGB (EXIF orientation applied, alpha dropped), optionally resized by libvips. */
async function decodeWithSharp(buf: Buffer, hasAlpha: boolean, resize?: { width: number; height: number; kernel: keyof sharp.KernelEnum }): Promise<RgbImage> {
  let pipeline = sharp(buf, { autoOrient: true });
  if (hasAlpha && resize) {
    // Drop alpha first (PIL semantics), then resize the opaque RGB in a second pipeline.
    const rgb = await decodeWithSharp(buf, true);
    pipeline = sharp(rgb.data, { raw: { width: rgb.width, height: rgb.height, channels: 3 } });
  }
  if (resize) {
    pipeline = pipeline.resize(resize.width, resize.height, { fit: 'fill', kernel: resize.kernel, fastShrinkOnLoad: false });
  }
  const { data, info } = await pipeline.removeAlpha().toColourspace('srgb').raw().toBuffer({ resolveWithObject: true });
  if (info.channels !== 3) throw new Error(`decoded to ${info.channels} channels, expected 3`);
  return { data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength), width: info.width, height: info.height };
}

/** The whole image as 8-bit RGB, EXIF-oriented, alpha dropped (PIL's convert("RGB")). */
export async function decodeRgb(src: Source): Promise<RgbImage> {
  return decodeWithSharp(await load(src), false);
}

/**
 * Runs the training transform on one image. `rng` supplies the random crop offsets and then the
 * flip decision (required when either is random). Writes into `out` when given (3*res*res floats).
 */
export async function processImage(src: Source, options: ImageTransformOptions, rng?: Prng, out?: Float32Array): Promise<ProcessedImage> {
  const res = options.resolution;
  if (!Number.isInteger(res) || res < 1) throw new RangeError(`resolution must be a positive integer, got ${res}`);
  const interpolation = options.interpolation ?? 'lanczos';
  if (!INTERPOLATIONS.includes(interpolation)) {
    throw new RangeError(`unknown interpolation '${interpolation}' (one of ${INTERPOLATIONS.join(', ')})`);
  }
  const needRng = !options.centerCrop || options.randomFlip === true;
  if (needRng && !rng) throw new Error('processImage: random crop / flip need a Prng');

  const buf = await load(src);
  const meta = await sharp(buf).metadata();
  const ow = meta.autoOrient.width;
  const oh = meta.autoOrient.height;
  const b = options.bucket;
  const outW = b ? b.width : res;
  const outH = b ? b.height : res;
  const size = b ? { width: b.resizedWidth, height: b.resizedHeight } : resizedSize(ow, oh, res);
  const { top, left } = options.centerCrop
    ? centerCropOffsets(size.height, size.width, outH, outW)
    : randomCropOffsets(size.height, size.width, outH, outW, rng as Prng);
  const flipped = options.randomFlip === true && (rng as Prng).nextFloat() < 0.5;

  const region: Region = { top, left, width: outW, height: outH };
  const window = await resizedWindow(buf, meta.hasAlpha === true, ow, oh, size, region, interpolation, options.resampler ?? 'auto');
  const pixels = cropRectToChw(window, 0, 0, outW, outH, flipped, out);
  let mask: Uint8Array | undefined;
  if (options.mask !== undefined) {
    const gray = await decodeMask(options.mask === 'alpha' ? buf : await load(options.mask), options.mask === 'alpha', ow, oh, options.mask);
    let win: RgbImage;
    if (gray === undefined) win = { data: new Uint8Array(outW * outH * 3).fill(255), width: outW, height: outH };
    else {
      // The mask as an opaque 3-channel image through the very resize and crop of the pixels.
      const rgb = Buffer.alloc(ow * oh * 3);
      for (let k = 0; k < ow * oh; k++) rgb[3 * k] = rgb[3 * k + 1] = rgb[3 * k + 2] = gray[k];
      const png = await sharp(rgb, { raw: { width: ow, height: oh, channels: 3 } }).png({ compressionLevel: 0 }).toBuffer();
      win = await resizedWindow(png, false, ow, oh, size, region, interpolation, options.resampler ?? 'auto');
    }
    mask = new Uint8Array(outW * outH);
    for (let y = 0; y < outH; y++) for (let x = 0; x < outW; x++) mask[y * outW + x] = win.data[(y * outW + (flipped ? outW - 1 - x : x)) * 3];
  }
  return {
    pixels,
    resolution: res,
    width: outW,
    height: outH,
    ...(mask ? { mask } : {}),
    originalWidth: ow,
    originalHeight: oh,
    resizedWidth: size.width,
    resizedHeight: size.height,
    cropTop: top,
    cropLeft: left,
    flipped,
  };
}

/**
 * The `region` of the image resized to `size` as 8-bit RGB: the PIL port or libvips as the module comment says.
 * (A region of the resize equals cropping the whole resize.)
 */
async function resizedWindow(
  buf: Buffer,
  hasAlpha: boolean,
  ow: number,
  oh: number,
  size: { width: number; height: number },
  region: Region,
  interpolation: Interpolation,
  resampler: Resampler,
): Promise<RgbImage> {
  const sameSize = size.width === ow && size.height === oh; // torchvision returns the image untouched
  const upscale = size.width > ow || size.height > oh;
  const usePil =
    !sameSize &&
    (interpolation === 'area' || resampler === 'pil' || (resampler === 'auto' && (upscale || interpolation === 'nearest')));
  if (usePil) {
    const full = await decodeWithSharp(buf, hasAlpha);
    return pilResize(full, size.width, size.height, interpolation, region);
  }
  const kernel = SHARP_KERNELS[interpolation === 'area' ? 'nearest' : interpolation]; // 'area' gets here only unresized
  const img = await decodeWithSharp(buf, hasAlpha, sameSize ? undefined : { ...size, kernel });
  if (img.width !== size.width || img.height !== size.height) {
    throw new Error(`decoded to ${img.width}x${img.height}, expected ${size.width}x${size.height}`);
  }
  return cropRgb(img, region);
}

/**
 * A mask's values (one byte per pixel, EXIF-oriented): the alpha channel of `buf` (undefined when it has none: the
 * image counts fully), or the first channel of a mask image, which must have the image's size.
 */
async function decodeMask(buf: Buffer, alpha: boolean, width: number, height: number, file: string): Promise<Uint8Array | undefined> {
  const meta = await sharp(buf).metadata();
  if (alpha && !meta.hasAlpha) return undefined;
  if (!alpha && (meta.autoOrient.width !== width || meta.autoOrient.height !== height))
    throw new Error(`the mask ${file} is ${meta.autoOrient.width}x${meta.autoOrient.height} but its image is ${width}x${height}: a mask must have its image's size`);
  const channel = (alpha ? (meta.channels ?? 4) - 1 : 0) as 0 | 1 | 2 | 3;
  const { data, info } = await sharp(buf, { autoOrient: true }).extractChannel(channel).raw().toBuffer({ resolveWithObject: true });
  if (info.width !== width || info.height !== height || info.channels !== 1) throw new Error(`mask decoded to ${info.width}x${info.height}x${info.channels}, expected ${width}x${height}x1`);
  return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
}

/**
 * A mask (bytes, 255 = full weight) at the latent size: the mean of each `stride` x `stride` block of value / 255,
 * as kohya's interpolate(mask, size=latent size, mode="area") when the sides are multiples of the stride.
 */
export function maskToLatent(mask: Uint8Array, width: number, height: number, stride: number, out?: Float32Array): Float32Array {
  if (width % stride !== 0 || height % stride !== 0) throw new RangeError(`mask ${width}x${height} is not a multiple of the latent stride ${stride}`);
  const lw = width / stride;
  const lh = height / stride;
  const dst = out ?? new Float32Array(lw * lh);
  for (let y = 0; y < lh; y++)
    for (let x = 0; x < lw; x++) {
      let sum = 0;
      for (let dy = 0; dy < stride; dy++) {
        const row = (y * stride + dy) * width + x * stride;
        for (let dx = 0; dx < stride; dx++) sum += mask[row + dx];
      }
      dst[y * lw + x] = sum / 255 / (stride * stride);
    }
  return dst;
}
