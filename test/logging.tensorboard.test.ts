import { spawnSync } from 'node:child_process';
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as zlib from 'node:zlib';

import { crc32c, decodeEvent, maskedCrc32c, pngInfo, TensorBoardWriter, tfRecord } from '../src/logging/tensorboard';

const tmp = (): string => fs.mkdtempSync(path.join(os.tmpdir(), 'tb-'));

// ---- a tiny PNG encoder (zlib CRC-32, not CRC-32C) so the test needs no image library
const CRC32_TABLE = Array.from({ length: 256 }, (_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
  return c >>> 0;
});
function crc32(b: Buffer): number {
  let c = 0xffffffff;
  for (const x of b) c = CRC32_TABLE[(c ^ x) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}
function pngChunk(type: string, data: Buffer): Buffer {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  const td = Buffer.concat([Buffer.from(type, 'latin1'), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(crc32(td));
  return Buffer.concat([len, td, crc]);
}
function makePng(width: number, height: number, channels: 3 | 4, seed: number): Buffer {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr[8] = 8;
  ihdr[9] = channels === 3 ? 2 : 6;
  const raw = Buffer.alloc(height * (1 + width * channels));
  for (let i = 0; i < raw.length; i++) raw[i] = i % (1 + width * channels) === 0 ? 0 : (i * 31 + seed) & 0xff;
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    pngChunk('IHDR', ihdr),
    pngChunk('IDAT', zlib.deflateSync(raw)),
    pngChunk('IEND', Buffer.alloc(0)),
  ]);
}

/** Splits a TFRecord file, checking both CRCs. */
function readRecords(file: string): Uint8Array[] {
  const b = fs.readFileSync(file);
  const out: Uint8Array[] = [];
  let off = 0;
  while (off < b.length) {
    const len = Number(b.readBigUInt64LE(off));
    expect(b.readUInt32LE(off + 8)).toBe(maskedCrc32c(b.subarray(off, off + 8)));
    const data = b.subarray(off + 12, off + 12 + len);
    expect(b.readUInt32LE(off + 12 + len)).toBe(maskedCrc32c(data));
    out.push(data);
    off += 16 + len;
  }
  expect(off).toBe(b.length);
  return out;
}

describe('CRC-32C', () => {
  test('known vectors (RFC 3720 B.4 and the check value)', () => {
    expect(crc32c(Buffer.from('123456789'))).toBe(0xe3069283);
    expect(crc32c(Buffer.alloc(0))).toBe(0);
    expect(crc32c(Buffer.alloc(32, 0))).toBe(0x8a9136aa);
    expect(crc32c(Buffer.alloc(32, 0xff))).toBe(0x62a8ab43);
    expect(crc32c(Buffer.from(Array.from({ length: 32 }, (_, i) => i)))).toBe(0x46dd794e);
    expect(crc32c(Buffer.from(Array.from({ length: 32 }, (_, i) => 31 - i)))).toBe(0x113fdb5c);
  });

  test('running checksum equals the one-shot checksum', () => {
    const a = Buffer.from('hello, ');
    const b = Buffer.from('tensorboard');
    expect(crc32c(b, crc32c(a))).toBe(crc32c(Buffer.concat([a, b])));
  });

  test('masking: rotate right by 15 then add 0xa282ead8', () => {
    const c = crc32c(Buffer.from('123456789'));
    expect(maskedCrc32c(Buffer.from('123456789'))).toBe(((((c >>> 15) | (c << 17)) >>> 0) + 0xa282ead8) % 2 ** 32);
  });
});

describe('TFRecord + Event encoding', () => {
  test('record framing', () => {
    const data = Buffer.from('abc');
    const r = tfRecord(data);
    expect(r.length).toBe(8 + 4 + 3 + 4);
    expect(Number(r.readBigUInt64LE(0))).toBe(3);
    expect(r.subarray(12, 15).toString()).toBe('abc');
    expect(r.readUInt32LE(15)).toBe(maskedCrc32c(data));
  });

  test('file starts with brain.Event:2 and events decode back', () => {
    const dir = tmp();
    const w = new TensorBoardWriter(dir, { now: () => 1_700_000_000_123 });
    expect(path.basename(w.path)).toBe(`events.out.tfevents.1700000000.${os.hostname()}.${process.pid}.${path.basename(w.path).split('.').pop()}`);
    w.addScalar('train_loss', 0.25, 3);
    w.addScalars({ a: 0, b: -1.5 }, 4);
    w.close();
    expect(w.closed).toBe(true);
    w.close(); // idempotent
    const ev = readRecords(w.path).map(decodeEvent);
    expect(ev[0]).toMatchObject({ file_version: 'brain.Event:2', wall_time: 1_700_000_000.123 });
    expect(ev[1]).toMatchObject({ step: 3, summary: { value: [{ tag: 'train_loss', simple_value: 0.25 }] } });
    // a zero inside the oneof must still be written, or TensorBoard drops the value
    expect(ev[2].summary?.value).toEqual([
      { tag: 'a', simple_value: 0 },
      { tag: 'b', simple_value: -1.5 },
    ]);
    expect(() => w.addScalar('x', 1, 1)).toThrow(/closed/);
  });

  test('events are queued until maxQueue, flush() writes them', () => {
    const w = new TensorBoardWriter(tmp(), { maxQueue: 3, flushIntervalMs: 1e9 });
    const size0 = fs.statSync(w.path).size;
    w.addScalar('x', 1, 1);
    w.addScalar('x', 2, 2);
    expect(fs.statSync(w.path).size).toBe(size0);
    w.addScalar('x', 3, 3);
    const size1 = fs.statSync(w.path).size;
    expect(size1).toBeGreaterThan(size0);
    w.addScalar('x', 4, 4);
    w.flush();
    expect(fs.statSync(w.path).size).toBeGreaterThan(size1);
    w.close();
    expect(readRecords(w.path)).toHaveLength(5);
  });

  test('PNG header parsing', () => {
    expect(pngInfo(makePng(7, 5, 3, 1))).toEqual({ width: 7, height: 5, colorspace: 3 });
    expect(pngInfo(makePng(2, 9, 4, 1))).toEqual({ width: 2, height: 9, colorspace: 4 });
    expect(() => pngInfo(Buffer.from('GIF89a, definitely not a png....'))).toThrow(/not a PNG/);
    const w = new TensorBoardWriter(tmp());
    expect(() => w.addImage('x', Buffer.alloc(30), 0)).toThrow(/not a PNG/);
    expect(() => w.addScalar('x', 1, 1.5)).toThrow(/integer/);
    w.close();
  });
});

// ---- the real reader: Python's tensorboard
const PY_READER = `
import hashlib, json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow as pw
from tensorboard.compat.tensorflow_stub import errors
path = sys.argv[1]
out = {"records": 0, "error": None}
r = pw.PyRecordReader_New(path, 0, None)
while True:
    try:
        r.GetNext()
        out["records"] += 1
    except errors.OutOfRangeError:
        break
    except errors.DataLossError as e:
        out["error"] = str(e)
        break
ea = EventAccumulator(path, size_guidance={"scalars": 0, "images": 0})
ea.Reload()
out["file_version"] = ea.file_version
out["scalars"] = {t: [[e.wall_time, e.step, e.value] for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
out["images"] = {t: [[e.wall_time, e.step, e.width, e.height, hashlib.sha256(e.encoded_image_string).hexdigest()] for e in ea.Images(t)] for t in ea.Tags()["images"]}
out["masked_crc"] = [pw.masked_crc32c(bytes.fromhex(h)) for h in sys.argv[2:]]
print(json.dumps(out))
`;

interface PyResult {
  records: number;
  error: string | null;
  file_version: number | null;
  scalars: Record<string, [number, number, number][]>;
  images: Record<string, [number, number, number, number, string][]>;
  masked_crc: number[];
}

const probe = spawnSync('python3', ['-c', 'import tensorboard.backend.event_processing.event_accumulator'], { encoding: 'utf8' });
const haveTensorboard = probe.status === 0;
if (!haveTensorboard) {
  // eslint-disable-next-line no-console
  console.warn(
    'SKIPPING the TensorBoard round trip: python3 cannot import tensorboard ' +
      `(${(probe.stderr || String(probe.error)).trim().split('\n').pop()}). Install it with: python3 -m pip install tensorboard`,
  );
}
const pyTest = haveTensorboard ? test : test.skip;

function readWithPython(file: string, crcInputs: string[] = []): PyResult {
  const r = spawnSync('python3', ['-c', PY_READER, file, ...crcInputs], { encoding: 'utf8', timeout: 120_000 });
  if (r.status !== 0) throw new Error(`python reader failed: ${r.stderr}`);
  return JSON.parse(r.stdout.trim().split('\n').pop() as string) as PyResult;
}

describe("round trip through Python's tensorboard", () => {
  pyTest('scalars and images read back exactly; CRCs agree with tensorboard.masked_crc32c', () => {
    const dir = tmp();
    let clock = 1_700_000_000_000;
    const w = new TensorBoardWriter(dir, { now: () => (clock += 250) });
    const losses: [number, number][] = [];
    for (let step = 1; step <= 25; step++) {
      const loss = step === 7 ? 0 : 1 / step - 0.03;
      losses.push([step, loss]);
      w.addScalars({ train_loss: loss, lr: 1e-4 * step }, step);
    }
    const img1 = makePng(8, 6, 3, 1);
    const img2 = makePng(5, 4, 4, 2);
    w.addImage('validation/0', img1, 10);
    w.addImage('validation/0', img2, 20);
    w.addImage('validation/1', img2, 20);
    w.close();

    const crcInputs = ['', '313233343536373839', 'deadbeef', Buffer.from('brain.Event:2').toString('hex')];
    const py = readWithPython(w.path, crcInputs);
    expect(py.error).toBeNull();
    expect(py.records).toBe(1 + 25 + 3);
    expect(py.file_version).toBe(2);
    expect(Object.keys(py.scalars).sort()).toEqual(['lr', 'train_loss']);
    expect(py.scalars.train_loss.map(([, step, v]) => [step, v])).toEqual(losses.map(([s, l]) => [s, Math.fround(l)]));
    expect(py.scalars.lr.map(([, s, v]) => [s, v])).toEqual(losses.map(([s]) => [s, Math.fround(1e-4 * s)]));
    py.scalars.train_loss.forEach(([wt]) => expect(wt).toBeGreaterThan(1_700_000_000));
    const sha = (b: Buffer): string => crypto.createHash('sha256').update(b).digest('hex');
    expect(py.images['validation/0'].map(([, ...rest]) => rest)).toEqual([
      [10, 8, 6, sha(img1)],
      [20, 5, 4, sha(img2)],
    ]);
    expect(py.images['validation/1']).toHaveLength(1);
    expect(py.masked_crc).toEqual(crcInputs.map((h) => maskedCrc32c(Buffer.from(h, 'hex'))));
  });

  pyTest('a corrupted CRC is detected by the Python reader', () => {
    const w = new TensorBoardWriter(tmp());
    for (let s = 1; s <= 5; s++) w.addScalar('x', s, s);
    w.close();
    const b = fs.readFileSync(w.path);
    // third record (step 2): skip the first two records, then flip a bit in its data CRC
    let off = 0;
    for (let i = 0; i < 2; i++) off += 16 + Number(b.readBigUInt64LE(off));
    const len = Number(b.readBigUInt64LE(off));
    b[off + 12 + len] ^= 1;
    const bad = `${w.path}.corrupt`;
    fs.writeFileSync(bad, b);
    const py = readWithPython(bad);
    expect(py.error).toMatch(/crc32/);
    expect(py.records).toBe(2);
  });
});
