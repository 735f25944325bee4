import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { datasetFingerprint, loadDataset } from '../src/data/dataset';
import { DEMO_BACKGROUNDS, DEMO_COLORS, DEMO_SHAPES, makeDemoData } from '../src/data/demo-data';
import { decodeRgb } from '../src/data/images';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'data-demo-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** Every file under dir with its bytes, relative paths sorted. */
function snapshot(dir: string): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  const walk = (rel: string): void => {
    for (const e of fs.readdirSync(path.join(dir, rel), { withFileTypes: true })) {
      const r = path.join(rel, e.name);
      if (e.isDirectory()) walk(r);
      else out.push([r, fs.readFileSync(path.join(dir, r)).toString('base64')]);
    }
  };
  walk('');
  return out.sort((a, b) => (a[0] < b[0] ? -1 : 1));
}

describe('makeDemoData', () => {
  test('is byte-for-byte deterministic for a seed and differs across seeds', async () => {
    const a = await makeDemoData(path.join(tmp, 'a'), { seed: 1 });
    const b = await makeDemoData(path.join(tmp, 'b'), { seed: 1 });
    const c = await makeDemoData(path.join(tmp, 'c'), { seed: 2 });
    expect(b.items).toEqual(a.items);
    expect(snapshot(b.root)).toEqual(snapshot(a.root));
    expect(snapshot(c.root)).not.toEqual(snapshot(a.root));
  });

  test.each(['captions.json', 'metadata.jsonl', 'txt'] as const)('layout %s loads with the dataset loader, captions intact', async (layout) => {
    const demo = await makeDemoData(path.join(tmp, `layout-${layout}`), { seed: 3, layout, count: 48 });
    const ds = await loadDataset(demo.root);
    expect(ds.layout).toBe(layout);
    expect(ds.counts.images).toBe(48);
    expect(ds.counts.multiCaption).toBe(16);
    const byFile = new Map(demo.items.map((it) => [it.file, it.captions]));
    for (const it of ds.items) {
      expect(it.captions).toEqual(byFile.get(it.file));
      expect([it.width, it.height, it.format]).toEqual([64, 64, 'png']);
    }
  });

  test('the same content in any layout has a layout-independent caption set', async () => {
    const one = await loadDataset((await makeDemoData(path.join(tmp, 'fp1'), { seed: 4, layout: 'txt' })).root);
    const two = await loadDataset((await makeDemoData(path.join(tmp, 'fp2'), { seed: 4, layout: 'metadata.jsonl' })).root);
    expect(datasetFingerprint(one)).toBe(datasetFingerprint(two));
  });

  test('48 items cover every shape x colour x background once, captions name them', async () => {
    const demo = await makeDemoData(path.join(tmp, 'cover'), { seed: 5 });
    const combos = new Set(demo.items.map((it) => `${it.shape}/${it.color}/${it.background}`));
    expect(combos.size).toBe(DEMO_SHAPES.length * Object.keys(DEMO_COLORS).length * Object.keys(DEMO_BACKGROUNDS).length);
    expect(combos.size).toBe(48);
    for (const it of demo.items) {
      for (const cap of it.captions) {
        expect(cap).toContain(it.shape);
        expect(cap).toContain(it.color);
        expect(cap).toContain(it.background);
      }
    }
  });

  test('pictures match their captions: background in the corners, a blob of the shape colour in the middle', async () => {
    const demo = await makeDemoData(path.join(tmp, 'pixels'), { seed: 6, count: 12, size: 48 });
    for (const it of demo.items) {
      const img = await decodeRgb(path.join(demo.root, it.file));
      expect([img.width, img.height]).toEqual([48, 48]);
      const at = (x: number, y: number): number[] => Array.from(img.data.subarray((y * 48 + x) * 3, (y * 48 + x) * 3 + 3));
      const bg = DEMO_BACKGROUNDS[it.background];
      for (const [x, y] of [[0, 0], [47, 0], [0, 47], [47, 47]]) expect(at(x, y)).toEqual([...bg]);
      const fg = DEMO_COLORS[it.color];
      let fgPixels = 0;
      for (let i = 0; i < 48 * 48; i++) {
        if (fg.every((v, c) => img.data[i * 3 + c] === v)) fgPixels++;
      }
      expect(fgPixels / (48 * 48)).toBeGreaterThan(0.08);
    }
  });

  test('shapes are distinguishable: the same colour and background give different masks per shape', async () => {
    const demo = await makeDemoData(path.join(tmp, 'shapes'), { seed: 7 });
    const fills = new Map<string, number>();
    for (const it of demo.items.filter((x) => x.color === 'red' && x.background === 'white')) {
      const img = await decodeRgb(path.join(demo.root, it.file));
      let n = 0;
      for (let i = 0; i < 64 * 64; i++) if (img.data[i * 3 + 1] < 128) n++;
      fills.set(it.shape, n / (64 * 64));
    }
    expect(fills.size).toBe(4);
    // Circles and squares fill more than stars and triangles of the same radius range.
    expect(Math.min(fills.get('circle') ?? 0, fills.get('square') ?? 0)).toBeGreaterThan(Math.max(fills.get('star') ?? 1, fills.get('triangle') ?? 1) * 0.9);
  });

  test("background 'random' (the demo base's pre-training data): muted backgrounds that are never white or black, captioned 'muted'", async () => {
    const demo = await makeDemoData(path.join(tmp, 'random-bg'), { seed: 8, count: 24, size: 32, background: 'random' });
    const corners = new Set<string>();
    for (const it of demo.items) {
      expect(it.background).toBe('random');
      for (const cap of it.captions) {
        expect(cap).toContain(it.shape);
        expect(cap).toContain(it.color);
        expect(cap).toContain('muted');
        expect(cap).not.toMatch(/white|black/);
      }
      const img = await decodeRgb(path.join(demo.root, it.file));
      const bg = Array.from(img.data.subarray(0, 3));
      expect(Math.max(...bg)).toBeLessThan(0.75 * 255); // value <= 0.7
      expect(Math.max(...bg)).toBeGreaterThan(0.3 * 255); // value >= 0.35
      corners.add(bg.join(','));
    }
    expect(corners.size).toBe(24);
  });

  test('options are validated; counts beyond 48 repeat combinations in a new order', async () => {
    await expect(makeDemoData(path.join(tmp, 'bad'), { count: 0 })).rejects.toThrow(RangeError);
    await expect(makeDemoData(path.join(tmp, 'bad'), { size: 4 })).rejects.toThrow(RangeError);
    const big = await makeDemoData(path.join(tmp, 'big'), { count: 100, size: 16, layout: 'txt' });
    expect(big.items).toHaveLength(100);
    expect(new Set(big.items.map((i) => i.file)).size).toBe(100);
    expect((await loadDataset(big.root)).counts.images).toBe(100);
  });
});
