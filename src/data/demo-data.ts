/**
 * A small synthetic, learnable captioned dataset for the demo and tests: one coloured shape per
 * image (circle, square, triangle, star) on a plain contrasting background, captioned
 * "a red circle on a white background" and variants. With the default 48 items every
 * shape x colour x background combination appears exactly once. Rasterized from raw pixels
 * (4x4 supersampled edges) and written as PNG by sharp, so a seed always gives the same files.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import sharp from 'sharp';

import type { DatasetLayout } from './dataset';
import { Prng } from './prng';

export type DemoShape = 'circle' | 'square' | 'triangle' | 'star';
export const DEMO_SHAPES: readonly DemoShape[] = ['circle', 'square', 'triangle', 'star'];

type Rgb = readonly [number, number, number];
export const DEMO_COLORS: Readonly<Record<string, Rgb>> = {
  red: [220, 40, 40],
  green: [40, 170, 60],
  blue: [40, 80, 220],
  yellow: [240, 210, 40],
  purple: [140, 60, 190],
  orange: [245, 140, 30],
};
export const DEMO_BACKGROUNDS: Readonly<Record<string, Rgb>> = {
  white: [245, 245, 245],
  black: [20, 20, 20],
};

export interface DemoDataOptions {
  /** Number of images (default 48). */
  count?: number;
  /** Image side in pixels (default 64, at least 8). */
  size?: number;
  /** Default 0. */
  seed?: number;
  /** Default 'captions.json'. */
  layout?: DatasetLayout;
  /**
   * 'named' (default): white or black, named in the caption (the demo's training data). 'random': random muted
   * colours, captioned "muted" ("a red circle on a muted background"): what the demo model's base UNet was
   * pre-trained on, so that the demo's LoRA visibly teaches it white and black backgrounds.
   */
  background?: 'named' | 'random';
}

export interface DemoItem {
  /** Path relative to the dataset root. */
  file: string;
  captions: string[];
  shape: DemoShape;
  color: string;
  background: string;
}

export interface DemoData {
  root: string;
  layout: DatasetLayout;
  items: DemoItem[];
}

const TEMPLATES: ReadonlyArray<(c: string, s: string, b: string) => string> = [
  (c, s, b) => `a ${c} ${s} on a ${b} background`,
  (c, s, b) => `${c} ${s}, ${b} background`,
  (c, s, b) => `a simple drawing of a ${c} ${s} on ${b}`,
  (c, s, b) => `a ${s} colored ${c} against a ${b} backdrop`,
];

/** A random muted colour: uniform hue, saturation 0.15-0.5, value 0.35-0.7 (HSV): never white or black. */
function randomMutedColor(rng: Prng): Rgb {
  const h = rng.nextFloat() * 6;
  const s = 0.15 + 0.35 * rng.nextFloat();
  const v = 0.35 + 0.35 * rng.nextFloat();
  const f = (n: number) => {
    const k = (n + h) % 6;
    return Math.round(255 * v * (1 - s * Math.max(0, Math.min(k, 4 - k, 1))));
  };
  return [f(5), f(3), f(1)];
}

type Inside = (x: number, y: number) => boolean;

/** Point-in-polygon by ray crossing. */
function polygon(points: ReadonlyArray<readonly [number, number]>): Inside {
  const n = points.length;
  const px = Float64Array.from(points, (p) => p[0]);
  const py = Float64Array.from(points, (p) => p[1]);
  return (x, y) => {
    let inside = false;
    for (let i = 0, j = n - 1; i < n; j = i++) {
      if (py[i] > y !== py[j] > y && x < ((px[j] - px[i]) * (y - py[i])) / (py[j] - py[i]) + px[i]) inside = !inside;
    }
    return inside;
  };
}

/** Inside test for a shape centred at (cx, cy) with "radius" r, in pixel units. */
function shapeTest(shape: DemoShape, cx: number, cy: number, r: number): Inside {
  switch (shape) {
    case 'circle':
      return (x, y) => (x - cx) ** 2 + (y - cy) ** 2 <= r * r;
    case 'square': {
      const h = r * 0.85;
      return (x, y) => Math.abs(x - cx) <= h && Math.abs(y - cy) <= h;
    }
    case 'triangle': {
      const pts = [0, 1, 2].map((k): [number, number] => {
        const a = -Math.PI / 2 + (k * 2 * Math.PI) / 3;
        return [cx + r * 1.1 * Math.cos(a), cy + 0.15 * r + r * 1.1 * Math.sin(a)];
      });
      return polygon(pts);
    }
    case 'star': {
      const pts: Array<[number, number]> = [];
      for (let k = 0; k < 10; k++) {
        const a = -Math.PI / 2 + (k * Math.PI) / 5;
        const rr = k % 2 === 0 ? r * 1.15 : r * 0.5;
        pts.push([cx + rr * Math.cos(a), cy + rr * Math.sin(a)]);
      }
      return polygon(pts);
    }
  }
}

/** RGB pixels of one image: the shape's coverage (4x4 samples per pixel) blends fg over bg. */
export function renderShape(shape: DemoShape, fg: Rgb, bg: Rgb, size: number, cx: number, cy: number, r: number): Uint8Array {
  const inside = shapeTest(shape, cx, cy, r);
  const data = new Uint8Array(size * size * 3);
  const S = 4;
  const reach = r * 1.3; // every shape lies within this distance of its centre
  for (let y = 0; y < size; y++) {
    for (let x = 0; x < size; x++) {
      let hits = 0;
      if (x + 1 >= cx - reach && x <= cx + reach && y + 1 >= cy - reach && y <= cy + reach) {
        for (let sy = 0; sy < S; sy++) for (let sx = 0; sx < S; sx++) if (inside(x + (sx + 0.5) / S, y + (sy + 0.5) / S)) hits++;
      }
      const a = hits / (S * S);
      const o = (y * size + x) * 3;
      for (let c = 0; c < 3; c++) data[o + c] = Math.round(fg[c] * a + bg[c] * (1 - a));
    }
  }
  return data;
}

/** Writes the demo dataset into `outDir` (created if needed; existing files of the same names are replaced). */
export async function makeDemoData(outDir: string, options: DemoDataOptions = {}): Promise<DemoData> {
  const count = options.count ?? 48;
  const size = options.size ?? 64;
  const layout = options.layout ?? 'captions.json';
  if (!Number.isInteger(count) || count < 1) throw new RangeError(`count must be a positive integer, got ${count}`);
  if (!Number.isInteger(size) || size < 8) throw new RangeError(`size must be an integer >= 8, got ${size}`);
  const rng = Prng.fromSeed(options.seed ?? 0);

  const randomBackground = options.background === 'random';
  // Every combination once per round, rounds in seeded order.
  const backgrounds = randomBackground ? ['random'] : Object.keys(DEMO_BACKGROUNDS);
  const combos: Array<[DemoShape, string, string]> = [];
  for (const s of DEMO_SHAPES) for (const c of Object.keys(DEMO_COLORS)) for (const b of backgrounds) combos.push([s, c, b]);

  const root = path.resolve(outDir);
  const imageDir = layout === 'captions.json' ? path.join(root, 'images') : root;
  fs.mkdirSync(imageDir, { recursive: true });
  const items: DemoItem[] = [];
  const digits = Math.max(3, String(count - 1).length);
  let round: Array<[DemoShape, string, string]> = [];
  for (let i = 0; i < count; i++) {
    if (round.length === 0) round = rng.shuffle(combos.slice());
    const [shape, color, background] = round.pop() as [DemoShape, string, string];
    const r = size * (0.24 + 0.08 * rng.nextFloat());
    const cx = size / 2 + size * 0.08 * (2 * rng.nextFloat() - 1);
    const cy = size / 2 + size * 0.08 * (2 * rng.nextFloat() - 1);
    const bg: Rgb = randomBackground ? randomMutedColor(rng) : DEMO_BACKGROUNDS[background];
    const pixels = renderShape(shape, DEMO_COLORS[color], bg, size, cx, cy, r);
    const caption = (k: number) => TEMPLATES[k](color, shape, randomBackground ? 'muted' : background);
    // Every third item has a list of caption variants; the others one template (mostly the first).
    const captions =
      i % 3 === 2
        ? rng.shuffle([0, 1, 2, 3]).slice(0, 2 + rng.int(2)).map(caption)
        : [caption(rng.nextFloat() < 0.6 ? 0 : rng.int(TEMPLATES.length))];
    const name = `${String(i).padStart(digits, '0')}_${color}_${shape}.png`;
    const png = await sharp(Buffer.from(pixels.buffer, pixels.byteOffset, pixels.byteLength), { raw: { width: size, height: size, channels: 3 } })
      .png()
      .toBuffer();
    fs.writeFileSync(path.join(imageDir, name), png);
    items.push({ file: layout === 'captions.json' ? `images/${name}` : name, captions, shape, color, background });
  }

  const imageName = (it: DemoItem): string => path.basename(it.file);
  const captionValue = (it: DemoItem): string | string[] => (it.captions.length === 1 ? it.captions[0] : it.captions);
  switch (layout) {
    case 'captions.json': {
      const obj: Record<string, string | string[]> = {};
      for (const it of items) obj[imageName(it)] = captionValue(it);
      fs.writeFileSync(path.join(root, 'captions.json'), `${JSON.stringify(obj, null, 2)}\n`);
      break;
    }
    case 'metadata.jsonl':
      fs.writeFileSync(
        path.join(root, 'metadata.jsonl'),
        items.map((it) => JSON.stringify({ file_name: imageName(it), text: captionValue(it) })).join('\n') + '\n',
      );
      break;
    case 'txt':
      for (const it of items) fs.writeFileSync(path.join(root, imageName(it).replace(/\.png$/, '.txt')), `${it.captions.join('\n')}\n`);
      break;
  }
  return { root, layout, items };
}
