/**
 * TensorBoard event-file writer (what torch.utils.tensorboard.SummaryWriter writes for add_scalar
 * and add_image): a TFRecord file of `Event` protobufs.
 *
 * TFRecord framing, per record:  uint64le length | uint32le masked_crc32c(length bytes)
 *                                | data | uint32le masked_crc32c(data)
 * with masked_crc = ((crc >>> 15) | (crc << 17)) + 0xa282ead8 (mod 2^32), CRC-32C (Castagnoli).
 * The first event carries file_version "brain.Event:2".
 */

import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import * as protobuf from 'protobufjs';

// ------------------------------------------------------------------ CRC-32C
const CRC32C_TABLE: Uint32Array = (() => {
  const poly = 0x82f63b78; // reflected Castagnoli polynomial
  const t = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ poly : c >>> 1;
    t[i] = c >>> 0;
  }
  return t;
})();

/** CRC-32C of `data`; pass a previous result as `crc` to continue a running checksum. */
export function crc32c(data: Uint8Array, crc = 0): number {
  let c = ~crc >>> 0;
  for (let i = 0; i < data.length; i++) c = CRC32C_TABLE[(c ^ data[i]) & 0xff] ^ (c >>> 8);
  return ~c >>> 0;
}

/** TFRecord's masked CRC-32C. */
export function maskedCrc32c(data: Uint8Array): number {
  const c = crc32c(data);
  return ((((c >>> 15) | (c << 17)) >>> 0) + 0xa282ead8) >>> 0;
}

/** One TFRecord: header, payload, CRCs. */
export function tfRecord(data: Uint8Array): Buffer {
  const out = Buffer.alloc(8 + 4 + data.length + 4);
  out.writeBigUInt64LE(BigInt(data.length), 0);
  out.writeUInt32LE(maskedCrc32c(out.subarray(0, 8)), 8);
  out.set(data, 12);
  out.writeUInt32LE(maskedCrc32c(data), 12 + data.length);
  return out;
}

// ------------------------------------------------------------------ protobuf messages
// The subset of tensorflow/core/util/event.proto and framework/summary.proto that we write
// (field numbers as upstream).
const PROTO = `
syntax = "proto3";
package tensorboard;
message Event {
  double wall_time = 1;
  int64 step = 2;
  oneof what {
    string file_version = 3;
    Summary summary = 5;
  }
}
message Summary {
  message Image {
    int32 height = 1;
    int32 width = 2;
    int32 colorspace = 3;
    bytes encoded_image_string = 4;
  }
  message Value {
    string tag = 1;
    oneof value {
      float simple_value = 2;
      Image image = 4;
    }
  }
  repeated Value value = 1;
}
`;

let eventType: protobuf.Type | null = null;
function EventType(): protobuf.Type {
  eventType ??= protobuf.parse(PROTO, { keepCase: true }).root.lookupType('tensorboard.Event');
  return eventType;
}

interface ImageProto {
  height: number;
  width: number;
  colorspace: number;
  encoded_image_string: Uint8Array;
}
interface ValueProto {
  tag: string;
  simple_value?: number;
  image?: ImageProto;
}
interface EventProto {
  wall_time: number;
  step: number;
  file_version?: string;
  summary?: { value: ValueProto[] };
}

export function encodeEvent(e: EventProto): Uint8Array {
  const T = EventType();
  return T.encode(T.fromObject(e)).finish();
}

/** Decodes an Event (tests / tooling); int64 step comes back as a number. */
export function decodeEvent(bytes: Uint8Array): EventProto {
  const T = EventType();
  return T.toObject(T.decode(bytes), { longs: Number, bytes: Uint8Array, oneofs: false }) as EventProto;
}

// ------------------------------------------------------------------ PNG header
export interface PngInfo {
  width: number;
  height: number;
  /** TensorBoard colorspace: 1 grayscale, 2 grayscale+alpha, 3 RGB, 4 RGBA. */
  colorspace: number;
}

const PNG_SIGNATURE = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);

/** Width, height and channel layout from a PNG's IHDR chunk; throws if `png` is not a PNG. */
export function pngInfo(png: Uint8Array): PngInfo {
  const b = Buffer.from(png.buffer, png.byteOffset, png.byteLength);
  if (b.length < 26 || !b.subarray(0, 8).equals(PNG_SIGNATURE) || b.toString('latin1', 12, 16) !== 'IHDR') {
    throw new Error('not a PNG image (bad signature or missing IHDR)');
  }
  const colorType = b[25];
  const colorspace = ({ 0: 1, 2: 3, 3: 3, 4: 2, 6: 4 } as Record<number, number>)[colorType];
  if (colorspace === undefined) throw new Error(`PNG has an invalid color type ${colorType}`);
  return { width: b.readUInt32BE(16), height: b.readUInt32BE(20), colorspace };
}

// ------------------------------------------------------------------ writer
export interface TensorBoardWriterOptions {
  /** Appended to the file name (like SummaryWriter's filename_suffix). */
  filenameSuffix?: string;
  /** Events are buffered; they are written once this many are queued (default 10)... */
  maxQueue?: number;
  /** ...or when a new event arrives this long after the last write (default 2000 ms). */
  flushIntervalMs?: number;
  /** Wall clock in ms (tests). */
  now?: () => number;
}

let globalUid = 0;

export class TensorBoardWriter {
  /** Full path of the event file. */
  readonly path: string;
  private fd: number | null;
  private queue: Buffer[] = [];
  private lastFlushMs: number;
  private readonly maxQueue: number;
  private readonly flushIntervalMs: number;
  private readonly now: () => number;

  constructor(logDir: string, o: TensorBoardWriterOptions = {}) {
    this.now = o.now ?? Date.now;
    this.maxQueue = Math.max(1, o.maxQueue ?? 10);
    this.flushIntervalMs = o.flushIntervalMs ?? 2000;
    fs.mkdirSync(logDir, { recursive: true });
    const t = this.now();
    const name = `events.out.tfevents.${String(Math.floor(t / 1000)).padStart(10, '0')}.${os.hostname()}.${process.pid}.${globalUid++}${o.filenameSuffix ?? ''}`;
    this.path = path.join(logDir, name);
    this.fd = fs.openSync(this.path, 'wx');
    this.lastFlushMs = t;
    this.push({ wall_time: t / 1000, step: 0, file_version: 'brain.Event:2' });
    this.flush();
  }

  /** One scalar (stored as float32, like TensorBoard's simple_value). */
  addScalar(tag: string, value: number, step: number, wallTimeMs?: number): void {
    this.addScalars({ [tag]: value }, step, wallTimeMs);
  }

  /** Several scalars at one step, in one event. */
  addScalars(values: Record<string, number>, step: number, wallTimeMs?: number): void {
    const value = Object.entries(values).map(([tag, v]) => ({ tag, simple_value: v }));
    if (value.length === 0) return;
    this.pushSummary(value, step, wallTimeMs);
  }

  /** A PNG image (width/height/colorspace read from its header unless given). */
  addImage(tag: string, png: Uint8Array, step: number, info?: Partial<PngInfo>, wallTimeMs?: number): void {
    const hdr = { ...pngInfo(png), ...info };
    const image: ImageProto = { height: hdr.height, width: hdr.width, colorspace: hdr.colorspace, encoded_image_string: png };
    this.pushSummary([{ tag, image }], step, wallTimeMs);
  }

  /** Writes queued events to the file (no fsync). */
  flush(): void {
    if (this.fd === null) throw new Error(`TensorBoard writer for ${this.path} is closed`);
    if (this.queue.length > 0) {
      const buf = this.queue.length === 1 ? this.queue[0] : Buffer.concat(this.queue);
      this.queue = [];
      let off = 0;
      while (off < buf.length) off += fs.writeSync(this.fd, buf, off, buf.length - off);
    }
    this.lastFlushMs = this.now();
  }

  /** Flushes, fsyncs and closes the file. Idempotent. */
  close(): void {
    if (this.fd === null) return;
    this.flush();
    try {
      fs.fsyncSync(this.fd);
    } finally {
      fs.closeSync(this.fd);
      this.fd = null;
    }
  }

  get closed(): boolean {
    return this.fd === null;
  }

  private pushSummary(value: ValueProto[], step: number, wallTimeMs?: number): void {
    if (!Number.isSafeInteger(step)) throw new RangeError(`TensorBoard step must be an integer, got ${step}`);
    this.push({ wall_time: (wallTimeMs ?? this.now()) / 1000, step, summary: { value } });
  }

  private push(e: EventProto): void {
    if (this.fd === null) throw new Error(`TensorBoard writer for ${this.path} is closed`);
    this.queue.push(tfRecord(encodeEvent(e)));
    if (this.queue.length >= this.maxQueue || this.now() - this.lastFlushMs >= this.flushIntervalMs) this.flush();
  }
}
