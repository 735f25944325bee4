import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import sharp from 'sharp';

import {
  type Interpolation,
  type RgbImage,
  centerCropOffsets,
  cropToChw,
  decodeRgb,
  pilResize,
  processImage,
  randomCropOffsets,
  readImageHeader,
  resizedSize,
} from '../src/data/images';
import { Prng, derive } from '../src/data/prng';

// References from torchvision + PIL: test/fixtures/data/make_image_fixtures.py.
const FIX = path.join(__dirname, 'fixtures', 'data');
interface Ref {
  source: string;
  interpolation: Interpolation;
  resolution: number;
  ref: string;
  width: number;
  height: number;
}
interface Refs {
  refs: Ref[];
  normalize: number[];
  sizes: Array<{ width: number; height: number; resolution: number; resizedWidth: number; resizedHeight: number }>;
  centerCrops: Array<{ height: number; width: number; crop: number; top: number; left: number }>;
}
const REFS: Refs = JSON.parse(fs.readFileSync(path.join(FIX, 'image_refs.json'), 'utf8'));

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'data-images-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** Writes raw RGB pixels as a PNG (lossless) and returns its path. */
async function writePng(name: string, width: number, height: number, px: (x: number, y: number) => [number, number, number]): Promise<string> {
  const data = Buffer.alloc(width * height * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) data.set(px(x, y), (y * width + x) * 3);
  }
  const file = path.join(tmp, name);
  await sharp(data, { raw: { width, height, channels: 3 } }).png().toFile(file);
  return file;
}

/** The value a byte becomes after ToTensor + Normalize (from the torch reference). */
const norm = (v: number): number => REFS.normalize[v];

/** Byte value back from a normalized float (exact inverse of the LUT). */
const byteOf = (f: number): number => Math.round((f + 1) * 127.5);

/** Expected CHW floats of a size x size window of an RGB image. */
function expectedChw(img: RgbImage, top: number, left: number, size: number, flip: boolean): Float32Array {
  const out = new Float32Array(3 * size * size);
  for (let c = 0; c < 3; c++) {
    for (let y = 0; y < size; y++) {
      for (let x = 0; x < size; x++) {
        const sx = flip ? left + size - 1 - x : left + x;
        out[c * size * size + y * size + x] = norm(img.data[((top + y) * img.width + sx) * 3 + c]);
      }
    }
  }
  return out;
}

describe('geometry matches torchvision', () => {
  test('Resize(int) output sizes, including the truncated long side', () => {
    for (const s of REFS.sizes) {
      expect(resizedSize(s.width, s.height, s.resolution)).toEqual({ width: s.resizedWidth, height: s.resizedHeight });
    }
  });

  test('CenterCrop offsets use round-half-to-even like Python', () => {
    for (const c of REFS.centerCrops) {
      expect(centerCropOffsets(c.height, c.width, c.crop, c.crop)).toEqual({ top: c.top, left: c.left });
    }
  });

  test('RandomCrop draws top then left, uniform over the full range, and nothing when sizes match', () => {
    const rng = Prng.fromSeed(1);
    const copy = rng.clone();
    const { top, left } = randomCropOffsets(20, 30, 8, 8, rng);
    expect(top).toBe(copy.int(13));
    expect(left).toBe(copy.int(23));
    const tops = new Set<number>();
    const lefts = new Set<number>();
    for (let i = 0; i < 2000; i++) {
      const o = randomCropOffsets(12, 9, 8, 8, rng);
      tops.add(o.top);
      lefts.add(o.left);
    }
    expect([...tops].sort()).toEqual([0, 1, 2, 3, 4]);
    expect([...lefts].sort()).toEqual([0, 1]);
    const before = rng.state();
    expect(randomCropOffsets(8, 8, 8, 8, rng)).toEqual({ top: 0, left: 0 });
    expect(rng.state()).toEqual(before);
    expect(() => randomCropOffsets(7, 8, 8, 8, rng)).toThrow(RangeError);
  });

  test('normalization is ToTensor + Normalize(0.5, 0.5) bit for bit', async () => {
    const file = await writePng('ramp.png', 256, 1, (x) => [x, 255 - x, x]);
    const img = await decodeRgb(file);
    const chw = cropToChw({ ...img, height: 1 }, 0, 0, 1, false);
    expect(chw[0]).toBe(norm(0));
    // Full ramp through a 16x16 image holding every byte value once.
    const sq = await writePng('ramp16.png', 16, 16, (x, y) => [y * 16 + x, 0, 255]);
    const r = await processImage(sq, { resolution: 16, centerCrop: true });
    expect(Array.from(r.pixels.subarray(0, 256))).toEqual(REFS.normalize);
    expect(Math.min(...r.pixels)).toBe(-1);
    expect(Math.max(...r.pixels)).toBe(1);
  });
});

describe('resizing matches PIL', () => {
  test.each(REFS.refs.map((r) => [r.source, r.interpolation, r] as const))('%s %s: pil resampler is bit-exact', async (_s, _i, ref) => {
    const expected = await decodeRgb(path.join(FIX, ref.ref));
    expect([expected.width, expected.height]).toEqual([ref.width, ref.height]);
    const src = path.join(FIX, ref.source);
    // The whole resized image...
    const full = pilResize(await decodeRgb(src), ref.width, ref.height, ref.interpolation);
    expect(Buffer.from(full.data).equals(Buffer.from(expected.data))).toBe(true);
    // ...and the processed training crop (center crop).
    const { top, left } = centerCropOffsets(ref.height, ref.width, ref.resolution, ref.resolution);
    const r = await processImage(src, { resolution: ref.resolution, interpolation: ref.interpolation, centerCrop: true, resampler: 'pil' });
    expect(r).toMatchObject({ resizedWidth: ref.width, resizedHeight: ref.height, cropTop: top, cropLeft: left, flipped: false });
    expect(r.pixels).toEqual(expectedChw(expected, top, left, ref.resolution, false));
  });

  test('a region of pilResize equals the same window of the full resize', async () => {
    const src = await decodeRgb(path.join(FIX, 'src_97x130.png'));
    for (const mode of ['lanczos', 'bilinear', 'nearest'] as const) {
      const full = pilResize(src, 48, 64, mode);
      const part = pilResize(src, 48, 64, mode, { top: 5, left: 3, width: 40, height: 50 });
      expect(part).toEqual(pilResize(full, 48, 64, mode, { top: 5, left: 3, width: 40, height: 50 }));
    }
  });

  test("the default ('auto') resampler stays close to PIL when downscaling and is exact when upscaling", async () => {
    for (const ref of REFS.refs.filter((r) => ['lanczos', 'bilinear', 'bicubic'].includes(r.interpolation))) {
      const expected = await decodeRgb(path.join(FIX, ref.ref));
      const { top, left } = centerCropOffsets(ref.height, ref.width, ref.resolution, ref.resolution);
      const want = expectedChw(expected, top, left, ref.resolution, false);
      const got = (await processImage(path.join(FIX, ref.source), { resolution: ref.resolution, interpolation: ref.interpolation, centerCrop: true })).pixels;
      let sum = 0;
      for (let i = 0; i < want.length; i++) sum += Math.abs(byteOf(want[i]) - byteOf(got[i]));
      const meanLevels = sum / want.length;
      if (ref.source.includes('_up')) expect(meanLevels).toBe(0);
      else expect(meanLevels).toBeLessThan(2.5);
    }
  });

  test('alpha is dropped before resizing, keeping the RGB under transparent pixels (PIL convert("RGB"))', async () => {
    const ref = REFS.refs.find((r) => r.source.startsWith('src_rgba') && r.interpolation === 'lanczos') as Ref;
    const expected = await decodeRgb(path.join(FIX, ref.ref));
    const { top, left } = centerCropOffsets(ref.height, ref.width, 48, 48);
    const want = expectedChw(expected, top, left, 48, false);
    const got = await processImage(path.join(FIX, ref.source), { resolution: 48, centerCrop: true, resampler: 'sharp' });
    let sum = 0;
    for (let i = 0; i < want.length; i++) sum += Math.abs(byteOf(want[i]) - byteOf(got.pixels[i]));
    // Resizing with premultiplied alpha (sharp's own behaviour) would be tens of levels off here.
    expect(sum / want.length).toBeLessThan(2.5);
  });
});

describe('processImage', () => {
  test('output is float32 CHW of 3*res*res in [-1, 1] with its geometry', async () => {
    const file = await writePng('wide.png', 120, 40, (x, y) => [x * 2, y * 6, 128]);
    const r = await processImage(file, { resolution: 32, centerCrop: true });
    expect(r.pixels).toBeInstanceOf(Float32Array);
    expect(r.pixels.length).toBe(3 * 32 * 32);
    expect(r).toMatchObject({ resolution: 32, originalWidth: 120, originalHeight: 40, resizedWidth: 96, resizedHeight: 32, cropTop: 0, cropLeft: 32 });
    for (const v of r.pixels) expect(v >= -1 && v <= 1).toBe(true);
  });

  test('random crop offsets and the flip come from the rng, and the pixels agree with them', async () => {
    // R encodes x, G encodes y: the output's corner pixel reveals the crop window.
    const file = await writePng('coords.png', 200, 64, (x, y) => [x, y * 3, 77]);
    const flips = new Set<boolean>();
    const lefts = new Set<number>();
    for (let i = 0; i < 24; i++) {
      const rng = derive(99, i);
      const expectRng = rng.clone();
      const eTop = expectRng.int(1); // the 64-pixel side already fits: top range [0, 0]
      const eLeft = expectRng.int(200 - 64 + 1);
      const eFlip = expectRng.nextFloat() < 0.5;
      const r = await processImage(file, { resolution: 64, randomFlip: true }, rng);
      expect([r.cropTop, r.cropLeft, r.flipped]).toEqual([eTop, eLeft, eFlip]);
      const firstR = byteOf(r.pixels[0]);
      const lastR = byteOf(r.pixels[63]);
      expect(firstR).toBe(eFlip ? eLeft + 63 : eLeft);
      expect(lastR).toBe(eFlip ? eLeft : eLeft + 63);
      // G of row y is 3y everywhere.
      expect(byteOf(r.pixels[64 * 64 + 10 * 64 + 5])).toBe(30);
      flips.add(r.flipped);
      lefts.add(r.cropLeft);
    }
    expect(flips).toEqual(new Set([true, false]));
    expect(lefts.size).toBeGreaterThan(10);
  });

  test('vertical random crops on a tall image', async () => {
    const file = await writePng('tall.png', 32, 90, (x, y) => [x, y, 0]);
    const rng = derive(5, 1);
    const r = await processImage(file, { resolution: 32 }, rng);
    expect(r.cropLeft).toBe(0);
    expect(byteOf(r.pixels[32 * 32])).toBe(r.cropTop); // G at (0, 0)
    expect(r.flipped).toBe(false);
  });

  test('horizontal flip mirrors a left/right split image', async () => {
    const file = await writePng('split.png', 16, 16, (x) => (x < 8 ? [255, 0, 0] : [0, 0, 255]));
    // Find one rng that flips and one that does not (flip is the first draw: crop needs none).
    let flipped: Float32Array | undefined;
    let plain: Float32Array | undefined;
    for (let i = 0; i < 20 && !(flipped && plain); i++) {
      const r = await processImage(file, { resolution: 16, randomFlip: true, centerCrop: true }, derive(1, i));
      if (r.flipped) flipped = r.pixels;
      else plain = r.pixels;
    }
    if (!flipped || !plain) throw new Error('no flip / no-flip case found');
    const red = (p: Float32Array, x: number): number => p[3 * 16 + x];
    const blue = (p: Float32Array, x: number): number => p[2 * 256 + 3 * 16 + x];
    expect([red(plain, 0), blue(plain, 0), red(plain, 15), blue(plain, 15)]).toEqual([1, -1, -1, 1]);
    expect([red(flipped, 0), blue(flipped, 0), red(flipped, 15), blue(flipped, 15)]).toEqual([-1, 1, 1, -1]);
  });

  test('without randomFlip nothing is flipped and center crop needs no rng', async () => {
    const file = await writePng('noflip.png', 20, 20, (x) => [x * 10, 0, 0]);
    const r = await processImage(file, { resolution: 20, centerCrop: true });
    expect(r.flipped).toBe(false);
    expect(byteOf(r.pixels[0])).toBe(0);
    await expect(processImage(file, { resolution: 20 })).rejects.toThrow(/need a Prng/);
  });

  test('writes into a caller-supplied buffer', async () => {
    const file = await writePng('into.png', 24, 24, () => [10, 20, 30]);
    const big = new Float32Array(2 * 3 * 24 * 24).fill(7);
    const view = big.subarray(3 * 24 * 24);
    const r = await processImage(file, { resolution: 24, centerCrop: true }, undefined, view);
    expect(r.pixels).toBe(view);
    expect(big[0]).toBe(7);
    expect(big[3 * 24 * 24]).toBe(norm(10));
  });

  test('EXIF orientation is applied before resizing and cropping', async () => {
    // Stored 40x20: left half red, right half blue. Orientation 6 = rotate 90° clockwise to view,
    // so the viewer shows 20x40 with red on top.
    const data = Buffer.alloc(40 * 20 * 3);
    for (let y = 0; y < 20; y++) for (let x = 0; x < 40; x++) data.set(x < 20 ? [255, 0, 0] : [0, 0, 255], (y * 40 + x) * 3);
    const file = path.join(tmp, 'rotated.jpg');
    await sharp(data, { raw: { width: 40, height: 20, channels: 3 } }).jpeg({ quality: 100 }).withMetadata({ orientation: 6 }).toFile(file);
    expect(await readImageHeader(file)).toMatchObject({ width: 20, height: 40, format: 'jpeg' });
    const r = await processImage(file, { resolution: 20, centerCrop: true });
    expect(r).toMatchObject({ originalWidth: 20, originalHeight: 40, resizedWidth: 20, resizedHeight: 40, cropTop: 10 });
    const redAt = (y: number): number => byteOf(r.pixels[y * 20 + 10]);
    expect(redAt(2)).toBeGreaterThan(200); // source rows 12.. are red
    expect(redAt(17)).toBeLessThan(50); // source rows ..27 are blue
  });

  test('greyscale images become 3 equal channels', async () => {
    const ref = REFS.refs.find((r) => r.source.startsWith('src_gray') && r.interpolation === 'bicubic') as Ref;
    const r = await processImage(path.join(FIX, ref.source), { resolution: 48, interpolation: 'bicubic', centerCrop: true, resampler: 'pil' });
    const plane = 48 * 48;
    for (let i = 0; i < plane; i += 37) {
      expect(r.pixels[i]).toBe(r.pixels[plane + i]);
      expect(r.pixels[i]).toBe(r.pixels[2 * plane + i]);
    }
  });

  test('corrupt input fails with sharp’s error, unknown options are refused', async () => {
    const bad = path.join(tmp, 'bad.png');
    fs.writeFileSync(bad, Buffer.from('not an image at all'));
    await expect(processImage(bad, { resolution: 8, centerCrop: true })).rejects.toThrow(/unsupported image format|Input/i);
    await expect(readImageHeader(bad)).rejects.toThrow();
    const ok = await writePng('ok.png', 8, 8, () => [0, 0, 0]);
    await expect(processImage(ok, { resolution: 8, centerCrop: true, interpolation: 'hamming' as Interpolation })).rejects.toThrow(/unknown interpolation/);
    await expect(processImage(ok, { resolution: 0, centerCrop: true })).rejects.toThrow(/resolution/);
  });
});
