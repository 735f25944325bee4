import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import sharp from 'sharp';

import { CAPTION_DROPOUT_KEY, CAPTION_KEY, type Dataset, DatasetError, datasetFingerprint, describeDataset, loadDataset, pickCaption } from '../src/data/dataset';
import { derive } from '../src/data/prng';

const base = fs.mkdtempSync(path.join(os.tmpdir(), 'data-dataset-'));
afterAll(() => fs.rmSync(base, { recursive: true, force: true }));

let counter = 0;
let png: Buffer;
let jpg: Buffer;
beforeAll(async () => {
  png = await sharp({ create: { width: 12, height: 8, channels: 3, background: { r: 200, g: 10, b: 10 } } }).png().toBuffer();
  jpg = await sharp({ create: { width: 9, height: 14, channels: 3, background: { r: 10, g: 200, b: 10 } } }).jpeg().toBuffer();
});

/** CRC-32 of PNG chunks (zlib's polynomial). */
function crc32(buf: Buffer): number {
  let c = ~0;
  for (const b of buf) {
    c ^= b;
    for (let k = 0; k < 8; k++) c = (c >>> 1) ^ (0xedb88320 & -(c & 1));
  }
  return ~c >>> 0;
}

/** A 48x32 noisy PNG whose IDAT (deflate) data has 40 damaged bytes, its chunk CRC recomputed: the header is intact. */
async function damagedPng(): Promise<Buffer> {
  const raw = Buffer.alloc(48 * 32 * 3);
  for (let i = 0; i < raw.length; i++) raw[i] = (i * 7919 + (i >> 5) * 31) % 251;
  const good = await sharp(raw, { raw: { width: 48, height: 32, channels: 3 } }).png({ compressionLevel: 9 }).toBuffer();
  const out = Buffer.from(good);
  for (let off = 8; off < out.length; ) {
    const len = out.readUInt32BE(off);
    if (out.toString('ascii', off + 4, off + 8) === 'IDAT') {
      for (let i = 0; i < 40; i++) out[off + 8 + (len >> 1) + i] ^= 0x5a;
      out.writeUInt32BE(crc32(out.subarray(off + 4, off + 8 + len)), off + 8 + len);
      return out;
    }
    off += 12 + len;
  }
  throw new Error('no IDAT chunk');
}

/** A fresh folder with `files` (Buffer = bytes, string = text, 'png'/'jpg' = a small image). */
function folder(files: Record<string, Buffer | string>): string {
  const dir = path.join(base, `ds${counter++}`);
  fs.mkdirSync(dir, { recursive: true });
  for (const [name, content] of Object.entries(files)) {
    const file = path.join(dir, name);
    fs.mkdirSync(path.dirname(file), { recursive: true });
    fs.writeFileSync(file, content === 'png' ? png : content === 'jpg' ? jpg : content);
  }
  return dir;
}

/** The DatasetError a load throws (fails the test if it does not throw one). */
async function loadError(dir: string, options = {}): Promise<DatasetError> {
  try {
    await loadDataset(dir, options);
  } catch (err) {
    if (err instanceof DatasetError) return err;
    throw err;
  }
  throw new Error('expected loadDataset to throw');
}

const summary = (ds: Dataset): Array<[string, string[]]> => ds.items.map((it) => [it.file, it.captions]);
const fileList = (ds: Dataset): string[] => ds.items.map((it) => it.file);

/** Loads `dir` and checks the layout it is read as and its (file, captions) list, in file-name order. */
async function expectLayout(dir: string, layout: Dataset['layout'], want: Array<[string, string[]]>): Promise<Dataset> {
  const ds = await loadDataset(dir);
  expect(ds.layout).toBe(layout);
  expect(summary(ds)).toEqual(want);
  return ds;
}

describe('layout (a): captions.json + images/', () => {
  test('object form, sorted by file name, with sizes from the image headers', async () => {
    const dir = folder({
      'images/b.png': 'png',
      'images/a.jpg': 'jpg',
      'images/sub/c.png': 'png',
      'captions.json': JSON.stringify({ 'b.png': 'a bee', 'a.jpg': ['an ant', 'one ant'], 'sub/c.png': 'a cat' }),
    });
    const ds = await expectLayout(dir, 'captions.json', [
      ['images/a.jpg', ['an ant', 'one ant']],
      ['images/b.png', ['a bee']],
      ['images/sub/c.png', ['a cat']],
    ]);
    expect(ds.captionSource).toBe(path.join(dir, 'captions.json'));
    expect(ds.items[0]).toMatchObject({ path: path.join(dir, 'images', 'a.jpg'), width: 9, height: 14, format: 'jpeg', bytes: jpg.length });
    expect(ds.counts).toEqual({ images: 3, captions: 4, multiCaption: 1, skippedBad: 0, skippedUncaptioned: 0, leftOut: 0 });
    expect(describeDataset(ds)).toBe('3 images, 4 captions (1 with variants), layout captions.json');
  });

  test('array form with file_name/text and image/caption keys', async () => {
    const dir = folder({
      'images/x.png': 'png',
      'images/y.png': 'png',
      'captions.json': JSON.stringify([
        { file_name: 'y.png', text: 'why' },
        { image: 'x.png', caption: ['ex', 'cross'] },
      ]),
    });
    expect(summary(await loadDataset(dir))).toEqual([
      ['images/x.png', ['ex', 'cross']],
      ['images/y.png', ['why']],
    ]);
  });

  test('bad JSON names the file and the line', async () => {
    const dir = folder({ 'images/x.png': 'png', 'captions.json': '{\n  "x.png": "ok",\n  "y.png": oops\n}' });
    const err = await loadError(dir);
    expect(err.file).toBe(path.join(dir, 'captions.json'));
    expect(err.message).toContain(path.join(dir, 'captions.json'));
    expect(err.message).toMatch(/not valid JSON.*\(line 3, column 12\)/s);
    expect(err.fix).toMatch(/JSON syntax/);
  });

  test('wrong shapes are explained', async () => {
    const cases: Array<[unknown, RegExp]> = [
      [[{ file_name: 'x.png' }], /entry 0 \(x.png\) has no "text"/],
      [[{ text: 'hi' }], /entry 0 has no "file_name"/],
      [{ 'x.png': 5 }, /"x.png" has a caption of type number/],
      [{ 'x.png': [] }, /empty caption list/],
      [{ 'x.png': ['a', 3] }, /non-string/],
      ['just a string', /must hold an object or an array/],
    ];
    for (const [json, re] of cases) {
      const err = await loadError(folder({ 'images/x.png': 'png', 'captions.json': JSON.stringify(json) }));
      expect(err.message).toMatch(re);
    }
  });

  test('captions.json without images/ says where the images go', async () => {
    const err = await loadError(folder({ 'captions.json': '{}', 'x.png': 'png' }));
    expect(err.file).toMatch(/images$/);
    expect(err.fix).toMatch(/put the images in/);
  });

  test('paths escaping the folder and duplicate entries are refused', async () => {
    const esc = await loadError(folder({ 'images/x.png': 'png', 'captions.json': JSON.stringify({ '../x.png': 'no' }) }));
    expect(esc.message).toMatch(/outside/);
    const dup = await loadError(
      folder({ 'images/x.png': 'png', 'captions.json': JSON.stringify([{ file_name: 'x.png', text: 'a' }, { file_name: './x.png', text: 'b' }]) }),
    );
    expect(dup.message).toMatch(/"x.png" is listed twice \(entry 0 and entry 1\)/);
  });
});

describe('layout (b): metadata.jsonl imagefolder', () => {
  test('file_name + text, blank lines ignored, sorted', async () => {
    const dir = folder({
      'b.png': 'png',
      'a.png': 'png',
      'metadata.jsonl': '{"file_name": "b.png", "text": "bee"}\n\n{"file_name": "a.png", "text": ["ay", "eh"]}\n',
    });
    await expectLayout(dir, 'metadata.jsonl', [
      ['a.png', ['ay', 'eh']],
      ['b.png', ['bee']],
    ]);
  });

  test('falls back to caption / image columns; explicit columns win', async () => {
    const fallback = folder({ 'a.png': 'png', 'metadata.jsonl': '{"image": "a.png", "caption": "cap"}\n' });
    expect(summary(await loadDataset(fallback))).toEqual([['a.png', ['cap']]]);
    const custom = folder({ 'a.png': 'png', 'metadata.jsonl': '{"file_name": "a.png", "text": "t", "prompt": "p"}\n' });
    expect(summary(await loadDataset(custom, { captionColumn: 'prompt' }))).toEqual([['a.png', ['p']]]);
  });

  test('a train/ subfolder holding metadata.jsonl is found', async () => {
    const dir = folder({ 'train/a.png': 'png', 'train/metadata.jsonl': '{"file_name": "a.png", "text": "x"}\n' });
    const ds = await loadDataset(dir);
    expect(ds.items[0].file).toBe('train/a.png');
  });

  test('errors name the line and the fields present', async () => {
    const bad = await loadError(folder({ 'a.png': 'png', 'metadata.jsonl': '{"file_name": "a.png", "text": "x"}\n{"file_name": "b.png", text: 1}\n' }));
    expect(bad.message).toMatch(/metadata.jsonl: line 2 is not valid JSON.*\(column 24\)/);
    const nocap = await loadError(folder({ 'a.png': 'png', 'metadata.jsonl': '{"file_name": "a.png", "prompt": "x"}\n' }));
    expect(nocap.message).toMatch(/line 1 has no "text" field \(fields: file_name, prompt\)/);
    expect(nocap.fix).toMatch(/captionColumn/);
    const col = await loadError(folder({ 'a.png': 'png', 'metadata.jsonl': '{"file_name": "a.png", "text": "x"}\n' }), { captionColumn: 'prompt' });
    expect(col.message).toMatch(/no "prompt" field/);
    const noimg = await loadError(folder({ 'a.png': 'png', 'metadata.jsonl': '{"path": "a.png", "text": "x"}\n' }));
    expect(noimg.message).toMatch(/no "file_name" string/);
    expect(noimg.fix).toMatch(/imageColumn/);
  });
});

describe('layout (c): same-name .txt files', () => {
  test('each non-empty line is a caption variant; subfolders and other extensions work', async () => {
    const dir = folder({
      'a.png': 'png',
      'a.txt': 'first caption\n\nsecond caption\n',
      'sub/b.JPG': 'jpg',
      'sub/b.txt': '  padded  \r\n',
      'c.png': 'png',
      'c.txt': '',
      'notes.txt': 'not a caption',
    });
    const ds = await expectLayout(dir, 'txt', [
      ['a.png', ['first caption', 'second caption']],
      ['c.png', ['']],
      ['sub/b.JPG', ['padded']],
    ]);
    expect(ds.warnings.join()).toMatch(/notes.txt/);
  });

  test('hidden files and folders are ignored', async () => {
    const dir = folder({ 'a.png': 'png', 'a.txt': 'x', '.cache/z.png': 'png', '.hidden.png': 'png' });
    expect(summary(await loadDataset(dir))).toEqual([['a.png', ['x']]]);
  });
});

describe('malformed datasets', () => {
  test('missing folder', async () => {
    const missing = path.join(base, 'does-not-exist');
    const err = await loadError(missing);
    expect(err.file).toBe(missing);
    expect(err.message).toMatch(/does not exist/);
    expect(err.fix).toMatch(/train-data-dir/);
    const file = path.join(base, 'plain-file');
    fs.writeFileSync(file, 'x');
    expect((await loadError(file)).message).toMatch(/is not a folder/);
  });

  test('empty folder, folder of uncaptioned images, empty captions.json', async () => {
    expect((await loadError(folder({}))).message).toMatch(/contains no images and no captions/);
    const noCaps = await loadError(folder({ 'a.png': 'png', 'b.png': 'png' }));
    expect(noCaps.message).toMatch(/has 2 image\(s\) but no captions/);
    expect(noCaps.fix).toMatch(/captions.json.*metadata.jsonl.*\.txt/);
    expect((await loadError(folder({ 'images/.keep': '', 'captions.json': '{}' }))).message).toMatch(/lists no images/);
  });

  test('both captions.json and metadata.jsonl: ambiguous unless a layout is chosen', async () => {
    const dir = folder({ 'images/a.png': 'png', 'a.png': 'png', 'captions.json': '{"a.png": "j"}', 'metadata.jsonl': '{"file_name": "a.png", "text": "m"}' });
    expect((await loadError(dir)).message).toMatch(/ambiguous/);
    expect(summary(await loadDataset(dir, { layout: 'metadata.jsonl', skipUncaptioned: true }))).toEqual([['a.png', ['m']]]);
    expect(summary(await loadDataset(dir, { layout: 'captions.json' }))).toEqual([['images/a.png', ['j']]]);
  });

  test('captions for missing images: all listed in one error, or skipped', async () => {
    const files = { 'images/a.png': 'png', 'images/b.png': 'png', 'captions.json': JSON.stringify({ 'a.png': 'a', 'b.png': 'b', 'gone1.png': 'x', 'gone2.jpg': 'y' }) };
    const err = await loadError(folder(files));
    expect(err.message).toMatch(/2 listed image\(s\) are missing or unreadable/);
    expect(err.message).toContain('images/gone1.png: file not found');
    expect(err.message).toContain('images/gone2.jpg: file not found');
    expect(err.badImages.map((b) => b.file)).toEqual(['images/gone1.png', 'images/gone2.jpg']);
    expect(err.fix).toMatch(/skipBadImages/);
    const ds = await loadDataset(folder(files), { skipBadImages: true });
    expect(fileList(ds)).toEqual(['images/a.png', 'images/b.png']);
    expect(ds.skipped.map((b) => b.file)).toEqual(['images/gone1.png', 'images/gone2.jpg']);
    expect(ds.counts.skippedBad).toBe(2);
  });

  test('unreadable and corrupt images: listed together with missing ones, or skipped', async () => {
    const truncated = png.subarray(0, 20);
    const files = {
      'a.png': 'png',
      'a.txt': 'ok',
      'garbage.png': Buffer.from('this is not a png'),
      'garbage.txt': 'g',
      'cut.png': truncated,
      'cut.txt': 'c',
      'empty.jpg': Buffer.alloc(0),
      'empty.txt': 'e',
    };
    const err = await loadError(folder(files));
    expect(err.badImages.map((b) => b.file)).toEqual(['cut.png', 'empty.jpg', 'garbage.png']);
    expect(err.message).toMatch(/garbage.png: unreadable image/);
    expect(err.message).toMatch(/empty.jpg: empty file/);
    const ds = await loadDataset(folder(files), { skipBadImages: true });
    expect(fileList(ds)).toEqual(['a.png']);
    expect(ds.counts).toMatchObject({ images: 1, skippedBad: 3 });
  });

  test('damaged pixel data behind a valid header (a PNG whose IDAT stream is corrupt) is found at load: an error naming the file and --skip-bad-images, or skipped the same way at every load', async () => {
    const damaged = await damagedPng();
    // The header alone reads fine: only a full decode finds it.
    await expect(sharp(damaged).metadata()).resolves.toMatchObject({ width: 48, height: 32 });
    await expect(sharp(damaged).raw().toBuffer()).rejects.toThrow();
    const files = { 'a.png': 'png', 'a.txt': 'a', 'b.png': damaged, 'b.txt': 'b', 'c.png': 'png', 'c.txt': 'c' };
    const err = await loadError(folder(files));
    expect(err.badImages.map((b) => b.file)).toEqual(['b.png']);
    expect(err.message).toMatch(/b\.png: damaged pixel data: the png header reads as 48x32, but decoding fails/);
    expect(err.message).toContain('--skip-bad-images');
    const dir = folder(files);
    const first = await loadDataset(dir, { skipBadImages: true });
    expect(fileList(first)).toEqual(['a.png', 'c.png']);
    expect(first.skipped).toEqual([{ file: 'b.png', reason: expect.stringMatching(/^damaged pixel data/) }]);
    // A resume loads the folder again: the same images, the same fingerprint, so the data order continues exactly.
    const again = await loadDataset(dir, { skipBadImages: true });
    expect(datasetFingerprint(again)).toBe(datasetFingerprint(first));
    // The header-only check (validateImages: 'header') is what missed it.
    expect(fileList(await loadDataset(dir, { validateImages: 'header' }))).toEqual(['a.png', 'b.png', 'c.png']);
  });

  test('every image bad, even when skipping, is an error', async () => {
    const err = await loadError(folder({ 'x.png': Buffer.from('nope'), 'x.txt': 'x' }), { skipBadImages: true });
    expect(err.message).toMatch(/no usable images/);
  });

  test('images without captions: listed, or skipped with skipUncaptioned', async () => {
    const files = { 'images/a.png': 'png', 'images/lonely.png': 'png', 'images/sub/alone.jpg': 'jpg', 'captions.json': '{"a.png": "a"}' };
    const err = await loadError(folder(files));
    expect(err.message).toMatch(/2 image\(s\) have no caption: lonely.png, sub\/alone.jpg/);
    expect(err.fix).toMatch(/skipUncaptioned/);
    const ds = await loadDataset(folder(files), { skipUncaptioned: true });
    expect(fileList(ds)).toEqual(['images/a.png']);
    expect(ds.uncaptioned).toEqual(['lonely.png', 'sub/alone.jpg']);

    const txt = await loadError(folder({ 'a.png': 'png', 'a.txt': 'a', 'b.png': 'png' }));
    expect(txt.message).toMatch(/1 image\(s\) have no caption: b.png/);
    expect(txt.fix).toMatch(/same-name .txt/);
  });

  test('validateImages: false skips the header reads (but not the existence check)', async () => {
    const ds = await loadDataset(folder({ 'x.png': Buffer.from('nope'), 'x.txt': 'x' }), { validateImages: false });
    expect(ds.items[0]).toMatchObject({ file: 'x.png', width: 0, height: 0, format: '' });
  });
});

describe('maxTrainSamples', () => {
  const many = (): Record<string, string> => {
    const files: Record<string, string> = {};
    for (let i = 0; i < 20; i++) {
      files[`i${String(i).padStart(2, '0')}.png`] = 'png';
      files[`i${String(i).padStart(2, '0')}.txt`] = `caption ${i}`;
    }
    return files;
  };

  test('keeps a seeded random subset, sorted, deterministic per seed', async () => {
    const dir = folder(many());
    const a = await loadDataset(dir, { maxTrainSamples: 5, seed: 1 });
    const b = await loadDataset(dir, { maxTrainSamples: 5, seed: 1 });
    const c = await loadDataset(dir, { maxTrainSamples: 5, seed: 2 });
    expect(fileList(a)).toEqual(fileList(b));
    expect(fileList(a)).not.toEqual(fileList(c));
    expect(a.items).toHaveLength(5);
    const files = fileList(a);
    expect([...files].sort()).toEqual(files);
    expect(fileList(a)).not.toEqual(['i00.png', 'i01.png', 'i02.png', 'i03.png', 'i04.png']);
    expect(a.counts.leftOut).toBe(15);
    expect((await loadDataset(dir, { maxTrainSamples: 50 })).items).toHaveLength(20);
    await expect(loadDataset(dir, { maxTrainSamples: 0 })).rejects.toThrow(RangeError);
  });

  test('with skipBadImages the subset is topped up to the requested size', async () => {
    const files: Record<string, Buffer | string> = many();
    for (let i = 0; i < 10; i++) files[`i${String(i).padStart(2, '0')}.png`] = Buffer.from('broken');
    const ds = await loadDataset(folder(files), { maxTrainSamples: 8, skipBadImages: true, seed: 3 });
    expect(ds.items).toHaveLength(8);
    expect(ds.items.every((it) => Number(it.file.slice(1, 3)) >= 10)).toBe(true);
  });
});

describe('datasetFingerprint', () => {
  const files = { 'images/a.png': 'png', 'images/b.jpg': 'jpg', 'captions.json': JSON.stringify({ 'a.png': 'a', 'b.jpg': ['b', 'bb'] }) };

  test('is stable across loads and copies of the folder, and sha256-shaped', async () => {
    const one = datasetFingerprint(await loadDataset(folder(files)));
    const two = datasetFingerprint(await loadDataset(folder(files)));
    expect(one).toMatch(/^[0-9a-f]{64}$/);
    expect(two).toBe(one);
  });

  test('changes when a caption, an image, or the item set changes', async () => {
    const ref = datasetFingerprint(await loadDataset(folder(files)));
    const changed = [
      { ...files, 'captions.json': JSON.stringify({ 'a.png': 'a!', 'b.jpg': ['b', 'bb'] }) },
      { ...files, 'captions.json': JSON.stringify({ 'a.png': 'a', 'b.jpg': ['bb', 'b'] }) },
      { ...files, 'images/b.jpg': 'png' },
      { 'images/a.png': 'png', 'captions.json': JSON.stringify({ 'a.png': 'a' }) },
    ];
    const prints = await Promise.all(changed.map(async (f) => datasetFingerprint(await loadDataset(folder(f)))));
    for (const p of prints) expect(p).not.toBe(ref);
    expect(new Set(prints).size).toBe(prints.length);
  });
});

describe('pickCaption', () => {
  test('single captions need no randomness; lists pick by (seed, epoch, index) only', () => {
    expect(pickCaption(['only'], 1, 2, 3)).toBe('only');
    const caps = ['a', 'b', 'c', 'd'];
    expect(pickCaption(caps, 5, 1, 7)).toBe(caps[derive(5, CAPTION_KEY, 1, 7).int(4)]);
    expect(pickCaption(caps, 5, 1, 7)).toBe(pickCaption(caps, 5, 1, 7));
    const byEpoch = new Set(Array.from({ length: 40 }, (_, e) => pickCaption(caps, 5, e, 7)));
    expect(byEpoch).toEqual(new Set(caps));
  });

  test('caption dropout empties about that fraction, by (seed, epoch, index) only, and leaves the rest as without it', () => {
    const caps = ['a', 'b', 'c'];
    let dropped = 0;
    for (let e = 0; e < 20; e++)
      for (let i = 0; i < 100; i++) {
        const c = pickCaption(caps, 5, e, i, 0.1);
        expect(c).toBe(pickCaption(caps, 5, e, i, 0.1));
        if (c === '') dropped++;
        else expect(c).toBe(pickCaption(caps, 5, e, i));
        expect(c === '').toBe(derive(5, CAPTION_DROPOUT_KEY, e, i).nextFloat() < 0.1);
      }
    expect(dropped).toBeGreaterThan(150);
    expect(dropped).toBeLessThan(250);
    expect(pickCaption(['only'], 1, 2, 3, 1)).toBe('');
    expect(pickCaption(['only'], 1, 2, 3, 0)).toBe('only');
  });
});
