/**
 * Captioned image datasets on disk. Three layouts, detected automatically:
 *
 *  (a) 'captions.json': `<root>/captions.json` + `<root>/images/`. The JSON is either an object
 *      `{ "<file in images/>": caption }` or an array of `{ file_name | image, text | caption }`.
 *  (b) 'metadata.jsonl': a Hugging Face imagefolder, `<root>/metadata.jsonl` (or
 *      `<root>/train/metadata.jsonl`), one JSON object per line with the image path relative to
 *      that file (column `file_name`, else `image`) and a caption column (`text`, else `caption`).
 *  (c) 'txt': images with a same-name `.txt` beside them (`cat.png` + `cat.txt`), in any subfolder.
 *      Each non-empty line of the `.txt` is one caption variant; an empty file is the empty caption.
 *
 * A caption may be a list of strings: one is picked per (epoch, sample) with `pickCaption`.
 * Items are sorted by relative path (code-unit order, locale-independent), so the same folder
 * always gives the same indices and the same `datasetFingerprint`.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';

import { decodeRgb, readImageHeader } from './images';
import { mapLimit } from './limit';
import { derive } from './prng';

export type DatasetLayout = 'captions.json' | 'metadata.jsonl' | 'txt';
export const DATASET_LAYOUTS: readonly DatasetLayout[] = ['captions.json', 'metadata.jsonl', 'txt'];

/** File extensions treated as images (lower case). Formats sharp cannot decode are reported as unreadable. */
export const IMAGE_EXTENSIONS: readonly string[] = ['.png', '.jpg', '.jpeg', '.webp', '.gif', '.tif', '.tiff', '.avif', '.heic', '.heif', '.bmp'];

/** derive() keys used by this module (distinct from the sampler's and the loader's). */
export const CAPTION_KEY = 0xca9;
/** derive() key for caption dropout (`--caption-dropout-rate`). */
export const CAPTION_DROPOUT_KEY = 0xcd0;
const SUBSET_KEY = 0x5b5e7;

export interface DatasetOptions {
  /** Force a layout instead of detecting it. */
  layout?: DatasetLayout;
  /** metadata.jsonl caption field (default `text`, falling back to `caption`). */
  captionColumn?: string;
  /** metadata.jsonl image field (default `file_name`, falling back to `image`). */
  imageColumn?: string;
  /**
   * Skip missing/unreadable images (listed in `skipped`, in file order) instead of failing. Default false: the first
   * load fails with a DatasetError listing every bad image. Which images are bad depends only on their bytes, so every
   * load (a resume too) skips the same ones.
   */
  skipBadImages?: boolean;
  /** Skip images that have no caption (listed in `uncaptioned`) instead of failing. Default false. */
  skipUncaptioned?: boolean;
  /** Keep a seeded random subset of this many items (diffusers' --max_train_samples). */
  maxTrainSamples?: number;
  /** Seed for the maxTrainSamples subset (default 0). */
  seed?: number;
  /**
   * How far each image is checked before it is trusted. 'decode' (default; `true` too): decoded completely, as
   * training will decode it, so damaged pixel data (a PNG with a corrupt IDAT stream, a truncated JPEG) is found here
   * and not at some step of the run. 'header': the header only (format and size; faster, misses damaged pixel data).
   * false: existence only (width/height are 0).
   */
  validateImages?: boolean | 'header' | 'decode';
  /** Header reads in flight (default 8). */
  concurrency?: number;
  /** Extension of the caption files of the 'txt' layout (default '.txt'; kohya's --caption_extension). */
  captionExtension?: string;
}

export interface DatasetItem {
  /** Path relative to the dataset root, '/'-separated. */
  file: string;
  /** Absolute path. */
  path: string;
  /** One or more caption variants. */
  captions: string[];
  /** File size in bytes. */
  bytes: number;
  /** Size after EXIF orientation (0 when not validated). */
  width: number;
  height: number;
  /** Decoder name from sharp ('png', 'jpeg', ...; '' when not validated). */
  format: string;
}

export interface BadImage {
  /** Relative path as listed. */
  file: string;
  reason: string;
}

export interface DatasetCounts {
  /** Usable items. */
  images: number;
  /** Caption strings over all items. */
  captions: number;
  /** Items with more than one caption variant. */
  multiCaption: number;
  skippedBad: number;
  skippedUncaptioned: number;
  /** Items left out by maxTrainSamples. */
  leftOut: number;
}

export interface Dataset {
  /** Absolute dataset root; item paths are relative to it. */
  root: string;
  layout: DatasetLayout;
  /** Where the captions came from (absolute path of captions.json / metadata.jsonl, or the root for 'txt'). */
  captionSource: string;
  /** Usable items, sorted by `file`. */
  items: readonly DatasetItem[];
  /** Bad images skipped because of skipBadImages. */
  skipped: readonly BadImage[];
  /** Uncaptioned images skipped because of skipUncaptioned. */
  uncaptioned: readonly string[];
  /** Non-fatal findings (e.g. .txt files with no image). */
  warnings: readonly string[];
  counts: DatasetCounts;
}

/** A malformed dataset: `file` is what to look at, `fix` what to do. */
export class DatasetError extends Error {
  constructor(
    readonly file: string,
    problem: string,
    readonly fix: string,
    readonly badImages: readonly BadImage[] = [],
  ) {
    super(`${file}: ${problem}\nFix: ${fix}`);
    this.name = 'DatasetError';
  }
}

// ---------------------------------------------------------------------------------------------

interface Entry {
  file: string;
  captions: string[];
  /** Where it was declared, for error messages ("line 3", "entry 2", "key 'x'"). */
  where: string;
}

const isImageName = (name: string): boolean => IMAGE_EXTENSIONS.includes(path.extname(name).toLowerCase());
const byCodeUnits = (a: string, b: string): number => (a < b ? -1 : a > b ? 1 : 0);

/** Relative '/'-separated paths of all files under `dir` (hidden files and folders skipped). */
function listFiles(dir: string): string[] {
  const out: string[] = [];
  const walk = (rel: string): void => {
    for (const ent of fs.readdirSync(path.join(dir, rel), { withFileTypes: true })) {
      if (ent.name.startsWith('.') || ent.name === '__MACOSX') continue;
      const child = rel ? `${rel}/${ent.name}` : ent.name;
      if (ent.isDirectory()) walk(child);
      else if (ent.isFile() || ent.isSymbolicLink()) out.push(child);
    }
  };
  walk('');
  return out.sort(byCodeUnits);
}

/** A listed file name as a clean relative path, or null when it escapes the folder. */
function cleanRelative(name: string): string | null {
  const norm = path.posix.normalize(name.replace(/\\/g, '/'));
  if (norm.startsWith('/') || norm === '..' || norm.startsWith('../') || norm === '.' || /^[A-Za-z]:/.test(norm)) return null;
  return norm.replace(/^\.\//, '');
}

/** Offset of the first JSON syntax error in `text` (a validating scan; only used after JSON.parse failed). */
function jsonErrorOffset(text: string): number {
  let i = 0;
  const ws = (): void => {
    while (i < text.length && ' \t\n\r'.includes(text[i])) i++;
  };
  const fail = (): never => {
    throw i;
  };
  const value = (): void => {
    ws();
    const c = text[i];
    if (c === '{' || c === '[') {
      const close = c === '{' ? '}' : ']';
      i++;
      ws();
      if (text[i] === close) {
        i++;
        return;
      }
      for (;;) {
        if (c === '{') {
          ws();
          if (text[i] !== '"') fail();
          value();
          ws();
          if (text[i] !== ':') fail();
          i++;
        }
        value();
        ws();
        if (text[i] === ',') i++;
        else if (text[i] === close) {
          i++;
          return;
        } else fail();
      }
    }
    if (c === '"') {
      for (i++; i < text.length && text[i] !== '"'; i++) {
        if (text[i] === '\\') i++;
        else if (text.charCodeAt(i) < 0x20) fail();
      }
      if (i >= text.length) fail();
      i++;
      return;
    }
    const m = /^(?:-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?|true|false|null)/.exec(text.slice(i, i + 400));
    if (!m) fail();
    i += (m as RegExpExecArray)[0].length;
  };
  try {
    value();
    ws();
    return i < text.length ? i : -1;
  } catch (pos) {
    return pos as number;
  }
}

/** JSON.parse's message plus the line and column of the error. */
function describeJsonError(text: string, err: unknown): string {
  const msg = err instanceof Error ? err.message : String(err);
  const pos = jsonErrorOffset(text);
  if (pos < 0) return msg;
  const before = text.slice(0, pos);
  const line = before.split('\n').length;
  const col = pos - before.lastIndexOf('\n');
  return text.includes('\n') ? `${msg} (line ${line}, column ${col})` : `${msg} (column ${col})`;
}

/** A caption value (string or non-empty list of strings), or an error string. */
function parseCaption(value: unknown): string[] | string {
  if (typeof value === 'string') return [value];
  if (Array.isArray(value)) {
    if (value.length === 0) return 'an empty caption list';
    if (value.every((v): v is string => typeof v === 'string')) return value.slice();
    return 'a caption list with non-string items';
  }
  return `a caption of type ${value === null ? 'null' : typeof value} (expected a string or a list of strings)`;
}

function pick(obj: Record<string, unknown>, keys: readonly string[]): string | undefined {
  return keys.find((k) => Object.prototype.hasOwnProperty.call(obj, k));
}

// ---- layout (a): captions.json -------------------------------------------------------------------

function readCaptionsJson(file: string): Entry[] {
  const text = fs.readFileSync(file, 'utf8').replace(/^\uFEFF/, '');
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch (err) {
    throw new DatasetError(file, `is not valid JSON: ${describeJsonError(text, err)}`, 'repair the JSON syntax (a validator such as `python -m json.tool` shows where)');
  }
  const shapeFix =
    'use {"cat.png": "a photo of a cat", ...} or [{"file_name": "cat.png", "text": "a photo of a cat"}, ...] (a caption may be a list of strings)';
  const entries: Entry[] = [];
  if (Array.isArray(data)) {
    data.forEach((row: unknown, i) => {
      if (row === null || typeof row !== 'object' || Array.isArray(row)) {
        throw new DatasetError(file, `entry ${i} is not an object`, shapeFix);
      }
      const obj = row as Record<string, unknown>;
      const fk = pick(obj, ['file_name', 'image']);
      const ck = pick(obj, ['text', 'caption']);
      if (!fk || typeof obj[fk] !== 'string') throw new DatasetError(file, `entry ${i} has no "file_name" (or "image") string`, shapeFix);
      if (!ck) throw new DatasetError(file, `entry ${i} (${String(obj[fk])}) has no "text" (or "caption") field`, shapeFix);
      const captions = parseCaption(obj[ck]);
      if (typeof captions === 'string') throw new DatasetError(file, `entry ${i} (${String(obj[fk])}) has ${captions}`, shapeFix);
      entries.push({ file: obj[fk] as string, captions, where: `entry ${i}` });
    });
  } else if (data !== null && typeof data === 'object') {
    for (const [name, value] of Object.entries(data as Record<string, unknown>)) {
      const captions = parseCaption(value);
      if (typeof captions === 'string') throw new DatasetError(file, `"${name}" has ${captions}`, shapeFix);
      entries.push({ file: name, captions, where: `key "${name}"` });
    }
  } else {
    throw new DatasetError(file, 'must hold an object or an array', shapeFix);
  }
  return entries;
}

// ---- layout (b): metadata.jsonl ------------------------------------------------------------------

function readMetadataJsonl(file: string, options: DatasetOptions): Entry[] {
  const lines = fs.readFileSync(file, 'utf8').replace(/^\uFEFF/, '').split(/\r?\n/);
  const entries: Entry[] = [];
  let imageKey: string | undefined;
  let captionKey: string | undefined;
  lines.forEach((line, i) => {
    if (line.trim() === '') return;
    const where = `line ${i + 1}`;
    let row: unknown;
    try {
      row = JSON.parse(line);
    } catch (err) {
      throw new DatasetError(file, `${where} is not valid JSON: ${describeJsonError(line, err)}`, 'write one JSON object per line, e.g. {"file_name": "cat.png", "text": "a photo of a cat"}');
    }
    if (row === null || typeof row !== 'object' || Array.isArray(row)) {
      throw new DatasetError(file, `${where} is not a JSON object`, 'write one JSON object per line, e.g. {"file_name": "cat.png", "text": "a photo of a cat"}');
    }
    const obj = row as Record<string, unknown>;
    const fields = Object.keys(obj).join(', ') || 'none';
    // Columns are decided by the first row (explicit options win), like a table's column names.
    imageKey ??= options.imageColumn ?? pick(obj, ['file_name', 'image']);
    captionKey ??= options.captionColumn ?? pick(obj, ['text', 'caption']);
    if (!imageKey || typeof obj[imageKey] !== 'string') {
      const col = imageKey ?? 'file_name';
      throw new DatasetError(file, `${where} has no "${col}" string (fields: ${fields})`, `add "${col}" to every line, or pass imageColumn (--image-column) naming the field that holds the image path`);
    }
    if (!captionKey || !(captionKey in obj)) {
      const col = captionKey ?? 'text';
      throw new DatasetError(file, `${where} has no "${col}" field (fields: ${fields})`, `add "${col}" to every line, or pass captionColumn (--caption-column) naming the caption field`);
    }
    const captions = parseCaption(obj[captionKey]);
    if (typeof captions === 'string') {
      throw new DatasetError(file, `${where} (${String(obj[imageKey])}) has ${captions}`, `make "${captionKey}" a string or a list of strings`);
    }
    entries.push({ file: obj[imageKey] as string, captions, where });
  });
  return entries;
}

// ---- layout (c): .txt beside each image ----------------------------------------------------------

function readTxtCaptions(root: string, files: readonly string[], warnings: string[], ext = '.txt'): { entries: Entry[]; uncaptioned: string[] } {
  const present = new Set(files);
  const entries: Entry[] = [];
  const uncaptioned: string[] = [];
  const usedTxt = new Set<string>();
  for (const f of files) {
    if (!isImageName(f)) continue;
    const txt = f.slice(0, f.length - path.extname(f).length) + ext;
    if (!present.has(txt)) {
      uncaptioned.push(f);
      continue;
    }
    usedTxt.add(txt);
    const lines = fs
      .readFileSync(path.join(root, txt), 'utf8')
      .split(/\r?\n/)
      .map((l) => l.trim())
      .filter((l) => l !== '');
    entries.push({ file: f, captions: lines.length > 0 ? lines : [''], where: txt });
  }
  const orphans = files.filter((f) => f.toLowerCase().endsWith(ext.toLowerCase()) && !isImageName(f) && !usedTxt.has(f));
  if (orphans.length > 0) {
    warnings.push(`${orphans.length} ${ext} file(s) have no same-name image and were ignored: ${orphans.join(', ')}`);
  }
  return { entries, uncaptioned };
}

// ---------------------------------------------------------------------------------------------

interface Detected {
  layout: DatasetLayout;
  /** Folder the listed image paths are relative to. */
  imageRoot: string;
  captionSource: string;
}

const LAYOUT_HELP =
  'lay the folder out as one of: (a) captions.json + images/, (b) metadata.jsonl with "file_name" and "text" per line, ' +
  '(c) image files each with a same-name .txt caption (cat.png + cat.txt)';

function detectLayout(root: string, forced: DatasetLayout | undefined): Detected {
  const captionsJson = path.join(root, 'captions.json');
  const metaCandidates = [path.join(root, 'metadata.jsonl'), path.join(root, 'train', 'metadata.jsonl')];
  const metadata = metaCandidates.find((f) => fs.existsSync(f));
  const hasCaptionsJson = fs.existsSync(captionsJson);

  const asCaptionsJson = (): Detected => {
    if (!hasCaptionsJson) throw new DatasetError(captionsJson, 'does not exist', `create it, or ${LAYOUT_HELP}`);
    const images = path.join(root, 'images');
    if (!fs.existsSync(images) || !fs.statSync(images).isDirectory()) {
      throw new DatasetError(images, 'is missing: captions.json names files inside an images/ folder next to it', `put the images in ${images}`);
    }
    return { layout: 'captions.json', imageRoot: images, captionSource: captionsJson };
  };
  const asMetadata = (): Detected => {
    if (!metadata) throw new DatasetError(metaCandidates[0], 'does not exist', `create it, or ${LAYOUT_HELP}`);
    return { layout: 'metadata.jsonl', imageRoot: path.dirname(metadata), captionSource: metadata };
  };
  const asTxt = (): Detected => ({ layout: 'txt', imageRoot: root, captionSource: root });

  switch (forced) {
    case 'captions.json':
      return asCaptionsJson();
    case 'metadata.jsonl':
      return asMetadata();
    case 'txt':
      return asTxt();
    case undefined:
      break;
    default:
      throw new DatasetError(root, `unknown layout '${String(forced)}'`, `use one of ${DATASET_LAYOUTS.join(', ')}`);
  }
  if (hasCaptionsJson && metadata) {
    throw new DatasetError(root, `has both captions.json and ${path.relative(root, metadata)}, so the layout is ambiguous`, 'remove one of them, or choose with the layout option (--dataset-layout)');
  }
  if (hasCaptionsJson) return asCaptionsJson();
  if (metadata) return asMetadata();
  return asTxt();
}

/** Loads, checks and indexes a dataset folder. Throws DatasetError (naming the file and the fix) when malformed. */
export async function loadDataset(dir: string, options: DatasetOptions = {}): Promise<Dataset> {
  const root = path.resolve(dir);
  if (!fs.existsSync(root)) {
    throw new DatasetError(root, 'does not exist', 'pass the folder that holds your training images (--train-data-dir)');
  }
  if (!fs.statSync(root).isDirectory()) {
    throw new DatasetError(root, 'is not a folder', 'pass the folder that holds your training images, not a file');
  }
  const detected = detectLayout(root, options.layout);
  const { layout, imageRoot, captionSource } = detected;
  const files = listFiles(imageRoot);
  const warnings: string[] = [];

  let entries: Entry[];
  let uncaptioned: string[];
  const ext = options.captionExtension ?? '.txt';
  if (options.captionExtension !== undefined && !/^\.?[^/\\]+$/.test(ext))
    throw new DatasetError(root, `--caption-extension "${ext}" is not a file extension`, 'pass an extension such as .txt or .caption');
  if (options.captionExtension !== undefined && layout !== 'txt')
    throw new DatasetError(captionSource, `--caption-extension ${ext} applies to captions in files beside the images, but this folder uses ${layout}`, 'drop --caption-extension, or pass --dataset-layout txt');
  if (layout === 'txt') {
    ({ entries, uncaptioned } = readTxtCaptions(imageRoot, files, warnings, ext.startsWith('.') ? ext : `.${ext}`));
    if (entries.length === 0) {
      const images = files.filter(isImageName).length;
      throw new DatasetError(
        root,
        images > 0 ? `has ${images} image(s) but no captions (no captions.json, no metadata.jsonl, no same-name .txt files)` : 'contains no images and no captions',
        LAYOUT_HELP,
      );
    }
  } else {
    entries = layout === 'captions.json' ? readCaptionsJson(captionSource) : readMetadataJsonl(captionSource, options);
    const seen = new Map<string, string>();
    for (const e of entries) {
      const clean = cleanRelative(e.file);
      if (clean === null) {
        throw new DatasetError(captionSource, `${e.where} names "${e.file}", which is outside ${imageRoot}`, 'use paths relative to the folder of the images');
      }
      const prev = seen.get(clean);
      if (prev !== undefined) throw new DatasetError(captionSource, `"${clean}" is listed twice (${prev} and ${e.where})`, 'keep one entry per image (a caption may be a list of strings)');
      seen.set(clean, e.where);
      e.file = clean;
    }
    uncaptioned = files.filter((f) => isImageName(f) && !seen.has(f));
  }

  if (uncaptioned.length > 0 && !options.skipUncaptioned) {
    throw new DatasetError(
      captionSource,
      `${uncaptioned.length} image(s) have no caption: ${uncaptioned.join(', ')}`,
      layout === 'txt'
        ? 'add a same-name .txt caption file for each, remove the images, or pass skipUncaptioned (--skip-uncaptioned)'
        : `add an entry for each to ${path.basename(captionSource)}, remove the images, or pass skipUncaptioned (--skip-uncaptioned)`,
    );
  }
  if (entries.length === 0) {
    throw new DatasetError(captionSource, 'lists no images', LAYOUT_HELP);
  }

  // Sorted candidates; with maxTrainSamples, a seeded subset is validated and kept (topped up
  // from further seeded picks when bad images are skipped).
  entries.sort((a, b) => byCodeUnits(a.file, b.file));
  const max = options.maxTrainSamples;
  if (max !== undefined && (!Number.isInteger(max) || max < 1)) throw new RangeError(`maxTrainSamples must be a positive integer, got ${max}`);
  let order: number[] = entries.map((_, i) => i);
  if (max !== undefined && max < entries.length) order = derive(options.seed ?? 0, SUBSET_KEY).shuffle(order);
  const want = Math.min(max ?? entries.length, entries.length);

  const validate = options.validateImages === false ? false : options.validateImages === 'header' ? 'header' : 'decode';
  const concurrency = options.concurrency ?? 8;
  const good: DatasetItem[] = [];
  const bad: BadImage[] = [];
  let next = 0;
  while (good.length < want && next < order.length) {
    // Without skipping, the first `want` candidates are all we ever check.
    const batch = order.slice(next, next + (options.skipBadImages ? want - good.length : want));
    next += batch.length;
    const results = await mapLimit(batch, concurrency, (i) => checkImage(imageRoot, root, entries[i], validate));
    for (const r of results) {
      if ('reason' in r) bad.push(r);
      else good.push(r);
    }
    if (!options.skipBadImages) break;
  }
  if (bad.length > 0 && !options.skipBadImages) {
    throw new DatasetError(
      captionSource,
      `${bad.length} listed image(s) are missing or unreadable:\n${bad.map((b) => `  ${b.file}: ${b.reason}`).join('\n')}`,
      'restore or re-export those files, remove their captions, or pass skipBadImages (--skip-bad-images) to train without them',
      bad,
    );
  }
  if (good.length === 0) {
    throw new DatasetError(captionSource, 'has no usable images (all listed images are missing or unreadable)', 'check the image paths and files');
  }
  good.sort((a, b) => byCodeUnits(a.file, b.file));

  const counts: DatasetCounts = {
    images: good.length,
    captions: good.reduce((n, it) => n + it.captions.length, 0),
    multiCaption: good.filter((it) => it.captions.length > 1).length,
    skippedBad: bad.length,
    skippedUncaptioned: uncaptioned.length,
    leftOut: entries.length - good.length - bad.length,
  };
  return { root, layout, captionSource, items: good, skipped: bad, uncaptioned, warnings, counts };
}

async function checkImage(imageRoot: string, root: string, e: Entry, validate: false | 'header' | 'decode'): Promise<DatasetItem | BadImage> {
  const abs = path.join(imageRoot, e.file);
  const file = path.relative(root, abs).split(path.sep).join('/');
  let bytes: number;
  try {
    const st = await fs.promises.stat(abs);
    if (!st.isFile()) return { file, reason: 'not a file' };
    bytes = st.size;
  } catch {
    return { file, reason: 'file not found' };
  }
  if (bytes === 0) return { file, reason: 'empty file' };
  let width = 0;
  let height = 0;
  let format = '';
  if (validate) {
    let src: string | Buffer = abs;
    try {
      if (validate === 'decode') src = await fs.promises.readFile(abs);
      ({ width, height, format } = await readImageHeader(src));
    } catch (err) {
      return { file, reason: `unreadable image (${err instanceof Error ? err.message : String(err)})` };
    }
    if (validate === 'decode') {
      // The whole image, decoded as training decodes it (the pixels are dropped): a header can be fine while the
      // pixel data is damaged, which would otherwise surface at some step of the run, and again at every resume.
      try {
        await decodeRgb(src);
      } catch (err) {
        return { file, reason: `damaged pixel data: the ${format} header reads as ${width}x${height}, but decoding fails (${err instanceof Error ? err.message : String(err)})` };
      }
    }
  }
  return { file, path: abs, captions: e.captions, bytes, width, height, format };
}

/**
 * sha256 (hex) identifying a dataset's content for checkpoint compatibility: over each item's
 * relative path, byte size, oriented width x height and caption list, in item order. Not hashed:
 * the root folder (a dataset may move), mtimes (copies change them), the layout, and the image
 * bytes themselves (too slow for large sets), so an in-place edit that keeps the file size is not
 * noticed. Loading the same folder with the same options always gives the same fingerprint.
 */
export function datasetFingerprint(ds: Pick<Dataset, 'items'>): string {
  const h = createHash('sha256');
  h.update('train-lora dataset v1\n');
  for (const it of ds.items) h.update(`${JSON.stringify([it.file, it.bytes, it.width, it.height, it.captions])}\n`);
  return h.digest('hex');
}

/**
 * The caption for dataset item `index` in `epoch`: the only one, or a seeded uniform choice among
 * the variants that depends on (seed, epoch, index) alone. With `dropoutRate` > 0 the caption is
 * the empty string with that probability (also a function of (seed, epoch, index) alone), which
 * trains the unconditional prediction that classifier-free guidance subtracts.
 */
export function pickCaption(captions: readonly string[], seed: number, epoch: number, index: number, dropoutRate = 0): string {
  if (dropoutRate > 0 && derive(seed, CAPTION_DROPOUT_KEY, epoch, index).nextFloat() < dropoutRate) return '';
  if (captions.length === 1) return captions[0];
  return derive(seed, CAPTION_KEY, epoch, index).choice(captions);
}

/** One-line summary for logs, e.g. "48 images, 61 captions (12 with variants), layout captions.json". */
export function describeDataset(ds: Dataset): string {
  const c = ds.counts;
  const parts = [`${c.images} images`, `${c.captions} captions (${c.multiCaption} with variants)`, `layout ${ds.layout}`];
  if (c.skippedBad) parts.push(`${c.skippedBad} bad images skipped`);
  if (c.skippedUncaptioned) parts.push(`${c.skippedUncaptioned} uncaptioned skipped`);
  if (c.leftOut) parts.push(`${c.leftOut} left out by maxTrainSamples`);
  return parts.join(', ');
}
