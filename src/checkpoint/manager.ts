/**
 * Checkpoint folders that are either complete and verified, or do not exist.
 *
 *   OUT/checkpoints/checkpoint-<step>/   model.safetensors, optimizer.safetensors, optimizer.json, scheduler.json,
 *                                        scaler.json, random_states_0.json, trainer_state.json, manifest.json (LAST)
 *
 * A save writes into a temporary sibling folder (`.tmp-checkpoint-<step>-<pid>`), fsyncs every file and the folder,
 * writes manifest.json (size + sha256 of every file) and fsyncs it, then renames the folder into place and fsyncs
 * the parent. Old checkpoints are pruned only after the new one is in place. A folder without a valid manifest is
 * not a checkpoint: `latest` skips it (with the reason), `verify` reports it.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { native } from '../native';
import { dirSize, formatBytes, freeBytes, fsyncPath, renameDirReplacing, sha256File, writeJsonDurable } from './fsutil';

export const MANIFEST = 'manifest.json';
export const KEEP_MARKER = 'KEEP';
const CKPT_RE = /^checkpoint-(\d+)$/;
const TMP_PREFIX = '.tmp-';

export interface ManifestFile {
  size: number;
  sha256: string;
}

export interface Manifest {
  format: 'train-lora-checkpoint';
  version: 1;
  step: number;
  created: string;
  files: Record<string, ManifestFile>;
  /** Free-form labels: "final", "epoch-end", "signal", "interval". */
  reason?: string;
}

export interface CheckpointEntry {
  name: string;
  path: string;
  step: number;
  valid: boolean;
  /** Why it is not valid. */
  problem?: string;
  manifest?: Manifest;
  kept: boolean;
  size: number;
}

export interface BestRecord {
  step: number;
  metric: string;
  value: number;
  mode: 'min' | 'max';
}

export class CheckpointError extends Error {
  override name = 'CheckpointError';
  constructor(
    message: string,
    readonly code: string,
  ) {
    super(message);
  }
}

export interface SaveOptions {
  reason?: string;
  /** Bytes the new checkpoint will need (checked against free space first). */
  expectedBytes?: number;
}

/** Test-only fault injection: called at each stage of a save with the stage name. */
export type FaultHook = (stage: string) => void;

export class CheckpointManager {
  readonly dir: string;

  constructor(
    readonly outputDir: string,
    private readonly opts: { faultHook?: FaultHook } = {},
  ) {
    this.dir = path.join(outputDir, 'checkpoints');
  }

  static pathFor(dir: string, step: number): string {
    return path.join(dir, `checkpoint-${step}`);
  }

  /** Removes temporary folders left by a crash during a save. Returns their names. */
  cleanStale(): string[] {
    if (!fs.existsSync(this.dir)) return [];
    const removed: string[] = [];
    for (const name of fs.readdirSync(this.dir)) {
      if (!name.startsWith(TMP_PREFIX)) continue;
      const m = /-(\d+)$/.exec(name);
      const pid = m ? Number(m[1]) : NaN;
      if (pid && pid !== process.pid && processAlive(pid)) continue; // another live writer's save
      fs.rmSync(path.join(this.dir, name), { recursive: true, force: true });
      removed.push(name);
    }
    return removed;
  }

  /**
   * Writes a checkpoint: `write(tmpDir)` fills the folder; then the manifest is written and the folder renamed.
   * On any failure the partial folder is removed and every earlier checkpoint is left as it was.
   */
  async save(step: number, write: (tmpDir: string) => Promise<void>, opts: SaveOptions = {}): Promise<CheckpointEntry> {
    fs.mkdirSync(this.dir, { recursive: true });
    if (opts.expectedBytes) {
      const free = freeBytes(this.dir);
      if (free < opts.expectedBytes * 1.1 + 16 * 1024 * 1024)
        throw new CheckpointError(
          `not enough free space in ${this.dir} for checkpoint-${step}: ${formatBytes(free)} free, about ${formatBytes(opts.expectedBytes)} needed. ` +
            'Free some space (or lower --checkpoints-total-limit) and resume; earlier checkpoints are intact.',
          'ENOSPC',
        );
    }
    const tmp = path.join(this.dir, `${TMP_PREFIX}checkpoint-${step}-${process.pid}`);
    fs.rmSync(tmp, { recursive: true, force: true });
    fs.mkdirSync(tmp);
    const final = CheckpointManager.pathFor(this.dir, step);
    try {
      this.opts.faultHook?.('start');
      await write(tmp);
      this.opts.faultHook?.('files-written');
      const files: Record<string, ManifestFile> = {};
      for (const name of fs.readdirSync(tmp).sort()) {
        const p = path.join(tmp, name);
        if (!fs.statSync(p).isFile()) continue;
        fsyncPath(p);
        files[name] = { size: fs.statSync(p).size, sha256: sha256File(p) };
      }
      const manifest: Manifest = { format: 'train-lora-checkpoint', version: 1, step, created: new Date().toISOString(), files, reason: opts.reason };
      this.opts.faultHook?.('before-manifest');
      writeJsonDurable(path.join(tmp, MANIFEST), manifest);
      fsyncPath(tmp);
      this.opts.faultHook?.('before-rename');
      // Re-saving a step (e.g. the final save right after an interval save) swaps atomically, then drops the old.
      renameDirReplacing(tmp, final, path.join(this.dir, `${TMP_PREFIX}old-checkpoint-${step}-${process.pid}`));
      return this.entry(`checkpoint-${step}`, 'quick');
    } catch (e) {
      fs.rmSync(tmp, { recursive: true, force: true });
      const err = e as NodeJS.ErrnoException;
      if (err instanceof CheckpointError) throw err;
      const full = err.code === 'ENOSPC' || /No space left|disk is full/i.test(err.message);
      throw new CheckpointError(
        `saving checkpoint-${step} failed: ${err.message}. The partial folder was removed; earlier checkpoints are intact.` +
          (full ? ' The disk is full: free some space and resume with --resume-from-checkpoint latest.' : ''),
        full ? 'ENOSPC' : (err.code ?? 'ESAVE'),
      );
    }
  }

  /** Every checkpoint folder, newest step first, each checked ('quick': sizes; 'full': hashes and parsing too). */
  async list(level: 'quick' | 'full' = 'quick'): Promise<CheckpointEntry[]> {
    if (!fs.existsSync(this.dir)) return [];
    const names = fs.readdirSync(this.dir).filter((n) => CKPT_RE.test(n));
    const out: CheckpointEntry[] = [];
    for (const n of names) out.push(level === 'full' ? await this.verifyEntry(n) : this.entry(n, 'quick'));
    return out.sort((a, b) => b.step - a.step);
  }

  /** The highest-step checkpoint that verifies fully; invalid ones are reported through `onSkip`. */
  async latest(onSkip?: (e: CheckpointEntry) => void): Promise<CheckpointEntry | undefined> {
    for (const e of await this.list('quick')) {
      const full = e.valid ? await this.verifyEntry(e.name) : e;
      if (full.valid) return full;
      onSkip?.(full);
    }
    return undefined;
  }

  private entry(name: string, _level: 'quick'): CheckpointEntry {
    const p = path.join(this.dir, name);
    const step = Number(CKPT_RE.exec(name)?.[1] ?? NaN);
    const base: CheckpointEntry = { name, path: p, step, valid: false, kept: fs.existsSync(path.join(p, KEEP_MARKER)), size: safeSize(p) };
    const m = readManifest(p);
    if (typeof m === 'string') return { ...base, problem: m };
    if (m.step !== step) return { ...base, manifest: m, problem: `manifest says step ${m.step}, folder says ${step}` };
    for (const [f, info] of Object.entries(m.files)) {
      const fp = path.join(p, f);
      if (!fs.existsSync(fp)) return { ...base, manifest: m, problem: `${f} is missing` };
      const size = fs.statSync(fp).size;
      if (size !== info.size) return { ...base, manifest: m, problem: `${f} is ${size} bytes, the manifest says ${info.size} (truncated or changed)` };
    }
    return { ...base, manifest: m, valid: true };
  }

  /** Full verification: manifest, every file's size and sha256, every JSON parses, every safetensors header is valid. */
  async verifyEntry(name: string): Promise<CheckpointEntry> {
    const e = this.entry(name, 'quick');
    if (!e.valid || !e.manifest) return e;
    return verifyFolder(e);
  }

  /** Deletes regular checkpoints beyond the newest `limit`, never the best, the final, or kept ones. */
  /** Steps of the last checkpoint of every stage other than `current` (stage from trainer_state.json). */
  private stageEnds(entries: readonly CheckpointEntry[], current: string): number[] {
    const last = new Map<string, number>();
    for (const e of entries) {
      let stage: unknown;
      try {
        stage = (JSON.parse(fs.readFileSync(path.join(e.path, 'trainer_state.json'), 'utf8')) as { stage?: unknown }).stage;
      } catch {
        continue;
      }
      if (typeof stage !== 'string' || stage === current) continue;
      last.set(stage, Math.max(last.get(stage) ?? -1, e.step));
    }
    return [...last.values()];
  }

  prune(limit: number, protect: { best?: number; final?: number; extra?: number[]; stage?: string } = {}): string[] {
    if (limit <= 0 || !fs.existsSync(this.dir)) return [];
    const entries = fs
      .readdirSync(this.dir)
      .filter((n) => CKPT_RE.test(n))
      .map((n) => this.entry(n, 'quick'))
      .filter((e) => e.valid)
      .sort((a, b) => b.step - a.step);
    const keep = new Set<number>([protect.best, protect.final, ...(protect.extra ?? [])].filter((s): s is number => s !== undefined));
    // A training's final checkpoint is never pruned, nor the last checkpoint of each earlier stage.
    for (const e of entries) if (e.manifest?.reason === 'final') keep.add(e.step);
    if (protect.stage !== undefined) for (const s of this.stageEnds(entries, protect.stage)) keep.add(s);
    const regular = entries.filter((e) => !keep.has(e.step) && !e.kept);
    const removed: string[] = [];
    for (const e of regular.slice(limit)) {
      fs.rmSync(e.path, { recursive: true, force: true });
      removed.push(e.name);
    }
    if (removed.length) fsyncPath(this.dir);
    return removed;
  }

  readBest(): BestRecord | undefined {
    try {
      return JSON.parse(fs.readFileSync(path.join(this.dir, 'best.json'), 'utf8')) as BestRecord;
    } catch {
      return undefined;
    }
  }

  writeBest(best: BestRecord): void {
    fs.mkdirSync(this.dir, { recursive: true });
    writeJsonDurable(path.join(this.dir, 'best.json'), best);
  }
}

/** Marks a checkpoint so retention never deletes it (`train-lora checkpoints keep PATH`). */
export function markKeep(checkpointPath: string): void {
  if (!fs.existsSync(path.join(checkpointPath, MANIFEST))) throw new CheckpointError(`${checkpointPath}: not a checkpoint (no ${MANIFEST})`, 'ENOTCKPT');
  fs.writeFileSync(path.join(checkpointPath, KEEP_MARKER), `kept by the user on ${new Date().toISOString()}\n`);
  fsyncPath(checkpointPath);
}

function safeSize(p: string): number {
  try {
    return dirSize(p);
  } catch {
    return 0;
  }
}

function readManifest(dir: string): Manifest | string {
  const f = path.join(dir, MANIFEST);
  if (!fs.existsSync(f)) return `no ${MANIFEST} (the save did not finish)`;
  let m: Manifest;
  try {
    m = JSON.parse(fs.readFileSync(f, 'utf8')) as Manifest;
  } catch (e) {
    return `${MANIFEST} is not valid JSON (${(e as Error).message})`;
  }
  if (m.format !== 'train-lora-checkpoint' || typeof m.step !== 'number' || typeof m.files !== 'object' || m.files === null)
    return `${MANIFEST} is not a train-lora manifest`;
  return m;
}

/** Verifies a checkpoint folder by path (any run): used by `train-lora checkpoints verify`. */
export async function verifyCheckpoint(dir: string): Promise<CheckpointEntry> {
  const name = path.basename(dir);
  const mgr = new CheckpointManager(path.dirname(path.dirname(dir)));
  if (path.dirname(dir) === mgr.dir && CKPT_RE.test(name)) return mgr.verifyEntry(name);
  // A checkpoint folder outside the usual layout: verify it in place.
  const m = readManifest(dir);
  const base: CheckpointEntry = { name, path: dir, step: NaN, valid: false, kept: fs.existsSync(path.join(dir, KEEP_MARKER)), size: safeSize(dir) };
  if (typeof m === 'string') return { ...base, problem: m };
  return verifyFolder({ ...base, step: m.step, manifest: m, valid: true });
}

async function verifyFolder(e: CheckpointEntry): Promise<CheckpointEntry> {
  const m = e.manifest!;
  for (const [f, info] of Object.entries(m.files)) {
    const fp = path.join(e.path, f);
    if (!fs.existsSync(fp)) return { ...e, valid: false, problem: `${f} is missing` };
    const digest = sha256File(fp);
    if (digest !== info.sha256) return { ...e, valid: false, problem: `${f} does not match its sha256 in the manifest (corrupt)` };
    try {
      if (f.endsWith('.json')) JSON.parse(fs.readFileSync(fp, 'utf8'));
      if (f.endsWith('.safetensors')) await native().safetensorsHeader(fp);
    } catch (err) {
      return { ...e, valid: false, problem: `${f} does not parse: ${(err as Error).message}` };
    }
  }
  return e;
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** One trainer per output folder: a lock file naming the holder. */
export class RunLock {
  private held = false;
  readonly file: string;
  constructor(outputDir: string) {
    this.file = path.join(outputDir, 'train-lora.lock');
  }

  acquire(): void {
    fs.mkdirSync(path.dirname(this.file), { recursive: true });
    for (let attempt = 0; attempt < 2; attempt++) {
      try {
        const fd = fs.openSync(this.file, 'wx');
        fs.writeSync(fd, JSON.stringify({ pid: process.pid, host: os.hostname(), started: new Date().toISOString() }) + '\n');
        fs.fsyncSync(fd);
        fs.closeSync(fd);
        this.held = true;
        return;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
        let holder: { pid?: number; host?: string; started?: string } = {};
        try {
          holder = JSON.parse(fs.readFileSync(this.file, 'utf8'));
        } catch {
          /* unreadable: treat as stale */
        }
        const sameHost = !holder.host || holder.host === os.hostname();
        if (holder.pid && sameHost && processAlive(holder.pid) && holder.pid !== process.pid)
          throw new CheckpointError(
            `${path.dirname(this.file)} is in use by another train-lora process (pid ${holder.pid}, started ${holder.started ?? '?'}). ` +
              'Wait for it to finish, stop it, or choose another --output-dir.',
            'ELOCKED',
          );
        if (!sameHost)
          throw new CheckpointError(
            `${this.file} is held by pid ${holder.pid} on host ${holder.host}. If that run is gone, delete the lock file and try again.`,
            'ELOCKED',
          );
        fs.rmSync(this.file, { force: true }); // stale: its process is gone
      }
    }
  }

  release(): void {
    if (this.held) fs.rmSync(this.file, { force: true });
    this.held = false;
  }
}
