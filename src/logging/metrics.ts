/**
 * Append-only metrics.jsonl: one JSON object per optimizer step, each line written with a single
 * synchronous write (so it reaches the OS before append() returns; fsync is optional).
 *
 * Non-finite numbers (a NaN loss is exactly what one wants to see) are written as the strings
 * "NaN", "Infinity", "-Infinity" — JSON has no such numbers — and readMetrics turns them back.
 * After a crash the last line may be torn; the writer starts a fresh line and readMetrics skips it.
 * After resuming from a checkpoint a step can appear twice: the later line wins.
 */

import * as fs from 'node:fs';
import * as path from 'node:path';

export type MetricValue = number | string | boolean | null;

export interface StepMetrics {
  step: number;
  /** Absent on validation lines (which carry val_loss). */
  epoch?: number;
  loss?: number;
  lr?: number;
  grad_norm?: number | null;
  /** Smoothed optimizer steps per second. */
  it_per_sec?: number | null;
  /** Unix time in seconds; filled in by append() when absent. */
  time?: number;
  [extra: string]: MetricValue | undefined;
}

export interface MetricsWriterOptions {
  /** fsync after every line (default false: close() fsyncs). */
  fsyncEachLine?: boolean;
  /** Wall clock in ms (tests). */
  now?: () => number;
}

function encodeValue(v: MetricValue): MetricValue {
  if (typeof v === 'number' && !Number.isFinite(v)) return Number.isNaN(v) ? 'NaN' : v > 0 ? 'Infinity' : '-Infinity';
  return v;
}

const NON_FINITE: Record<string, number> = { NaN: NaN, Infinity: Infinity, '-Infinity': -Infinity };

export class MetricsWriter {
  readonly path: string;
  private fd: number | null;
  private readonly fsyncEachLine: boolean;
  private readonly now: () => number;

  constructor(file: string, o: MetricsWriterOptions = {}) {
    this.path = file;
    this.fsyncEachLine = o.fsyncEachLine ?? false;
    this.now = o.now ?? Date.now;
    fs.mkdirSync(path.dirname(file), { recursive: true });
    this.fd = fs.openSync(file, 'a+');
    // A previous run may have died mid-line: make sure our first record starts on its own line.
    const size = fs.fstatSync(this.fd).size;
    if (size > 0) {
      const last = Buffer.alloc(1);
      fs.readSync(this.fd, last, 0, 1, size - 1);
      if (last[0] !== 0x0a) this.writeAll('\n');
    }
  }

  append(m: StepMetrics): void {
    if (this.fd === null) throw new Error(`metrics writer for ${this.path} is closed`);
    if (!Number.isSafeInteger(m.step)) throw new RangeError(`metrics step must be an integer, got ${m.step}`);
    const rec: Record<string, MetricValue> = {};
    for (const [k, v] of Object.entries({ ...m, time: m.time ?? this.now() / 1000 })) {
      if (v !== undefined) rec[k] = encodeValue(v);
    }
    this.writeAll(`${JSON.stringify(rec)}\n`);
    if (this.fsyncEachLine) fs.fsyncSync(this.fd);
  }

  /** fsyncs and closes. Idempotent. */
  close(): void {
    if (this.fd === null) return;
    try {
      fs.fsyncSync(this.fd);
    } finally {
      fs.closeSync(this.fd);
      this.fd = null;
    }
  }

  private writeAll(s: string): void {
    const buf = Buffer.from(s, 'utf8');
    let off = 0;
    while (off < buf.length) off += fs.writeSync(this.fd as number, buf, off, buf.length - off);
  }
}

/**
 * Reads metrics.jsonl back: skips blank and torn (unparseable) lines, restores non-finite numbers,
 * and keeps only the last record per step (ordered by step).
 */
export function readMetrics(file: string): StepMetrics[] {
  const bySteps = new Map<number, StepMetrics>();
  for (const line of fs.readFileSync(file, 'utf8').split('\n')) {
    if (line.trim() === '') continue;
    let obj: unknown;
    try {
      obj = JSON.parse(line);
    } catch {
      continue;
    }
    if (typeof obj !== 'object' || obj === null || Array.isArray(obj)) continue;
    const rec = obj as Record<string, MetricValue>;
    if (typeof rec.step !== 'number') continue;
    for (const [k, v] of Object.entries(rec)) {
      if (typeof v === 'string' && Object.hasOwn(NON_FINITE, v)) rec[k] = NON_FINITE[v];
    }
    bySteps.set(rec.step, rec as StepMetrics);
  }
  return [...bySteps.values()].sort((a, b) => a.step - b.step);
}
