/**
 * Checkpoint folders that are either complete and verified, or do not exist.
 *
 *   OUT/checkpoints/checkpoint-<step>/   model.safetensors, optimizer.safetensors, optimizer.json, scheduler.json,
 *                                        scaler.json, random_states_0.json, trainer_state.json, manifest.json (LAST)
 *
 * A save writes into a temporary sibling folder (`.tmp-checkpoint-<step>-<pid>`), fsyncs every file and the folder,
 * writes manifest.json (size + sha256 of every file) and fsyncs it, then renames the folder into place and fsyncs
 * the parent. Old checkpoints are pruned only after the new one is in place. A folder without a valid manifest is
 * not a checkpoint: `latest` skips it (with the reason), `verify` reports it. Full verification also checks every state
 * file's content against its schema (src/checkpoint/state.ts, schema.ts), so a complete-looking folder with a damaged state file
 * is not a checkpoint either.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { native } from '../native';
import { dirSize, formatBytes, freeBytes, fsyncPath, renameDirReplacing, sha256File, writeJsonDurable } from './fsutil';
import { describeIssues, ManifestSchema } from './schema';
import { crossFileProblem, MANIFEST_FILE as MANIFEST, stateFileProblem, TRAINER_STATE_FILE } from './state';

/** manifest.json (its name is defined with every other state file's in state.ts). */
export { MANIFEST };
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
  /** Called with the milliseconds the save's last part (fsync, hashes, manifest, rename) held the JS thread. */
  onBlocked?: (ms: number) => void;
}

/** Files the writer already knows the size and SHA-256 of (hashed as they were written, off the JS thread). */
export type KnownFiles = Record<string, ManifestFile>;

/** Test-only fault injection: called at each stage of a save with the stage name. */
export type FaultHook = (stage: string) => void;

export interface CheckpointManagerOptions {
  faultHook?: FaultHook;
  /** Free bytes on the checkpoint folder's file system (default: statfs); tests give a small disk. */
  freeBytes?: (dir: string) => number;
}

/** Safety margin of the free-space check: 10 % of the checkpoint's size plus 64 KiB (file-system blocks, manifest). */
export const SPACE_MARGIN_FRACTION = 0.1;
export const SPACE_MARGIN_BYTES = 64 * 1024;

/** Free bytes a checkpoint of about `expectedBytes` needs before its save starts. */
export function spaceNeeded(expectedBytes: number): number {
  return Math.ceil(expectedBytes * (1 + SPACE_MARGIN_FRACTION)) + SPACE_MARGIN_BYTES;
}

export class CheckpointManager {
  readonly dir: string;

  constructor(
    readonly outputDir: string,
    private readonly opts: CheckpointManagerOptions = {},
  ) {
    this.dir = path.join(outputDir, 'checkpoints');
  }

  /**
   * The free-space pre-check of a save, synchronous so that a caller can run it before it trains on (a refused save
   * then loses no step). `expectedBytes`: the size of the last checkpoint (the new one is about as large); nothing is
   * checked without it. Throws CheckpointError ENOSPC stating the rule.
   */
  checkFreeSpace(step: number, expectedBytes: number | undefined): void {
    if (!expectedBytes) return;
    fs.mkdirSync(this.dir, { recursive: true });
    const free = (this.opts.freeBytes ?? freeBytes)(this.dir);
    const need = spaceNeeded(expectedBytes);
    if (free < need)
      throw new CheckpointError(
        `not enough free space in ${this.dir} for checkpoint-${step}: ${formatBytes(free)} free, ${formatBytes(need)} needed ` +
          `(the last checkpoint's size, ${formatBytes(expectedBytes)}, plus ${SPACE_MARGIN_FRACTION * 100} % and ${formatBytes(SPACE_MARGIN_BYTES)} margin; ` +
          'old checkpoints are deleted only after a new one is complete). ' +
          'Free some space (or lower --checkpoints-total-limit) and resume with --resume-from-checkpoint latest; earlier checkpoints are intact.',
        'ENOSPC',
      );
  }

  static pathFor(dir: string, step: number): string {
    return path.join(dir, `checkpoint-${step}`);
  }

  /** Removes temporary folders left by a crash during a save. Returns their names. */
  cleanStale(): string[] {
    if (!fs.existsSync(this.dir)) return [];
    const removed: string[] = [];
    for (const name of fs.readdirSync(this.dir)) {
      // .tmp-checkpoint-<step>-<pid>, .tmp-old-checkpoint-..., .tmp-rank<r>-...; best.json.tmp-<pid> (writeJsonDurable).
      if (!name.startsWith(TMP_PREFIX) && !/^best\.json\.tmp-\d+$/.test(name)) continue;
      const m = /-(\d+)$/.exec(name);
      const pid = m ? Number(m[1]) : NaN;
      if (pid && !writerGone(pid, mtimeOf(path.join(this.dir, name)))) continue; // another live writer's save
      // A re-saved checkpoint set aside whose replacement never arrived (killed between the two renames): put it back.
      const old = /^\.tmp-old-(checkpoint-\d+)-\d+$/.exec(name);
      if (old && !fs.existsSync(path.join(this.dir, old[1]))) {
        fs.renameSync(path.join(this.dir, name), path.join(this.dir, old[1]));
        continue;
      }
      fs.rmSync(path.join(this.dir, name), { recursive: true, force: true });
      removed.push(name);
    }
    return removed;
  }

  /**
   * Writes a checkpoint: `write(tmpDir)` fills the folder; then the manifest is written and the folder renamed.
   * On any failure the partial folder is removed and every earlier checkpoint is left as it was.
   */
  /**
   * `write` fills the temporary folder; it may return the size and SHA-256 of files it wrote (the addon hashes weight
   * files while writing them), which are then not read back here: a full-model checkpoint is gigabytes, and hashing it
   * on the JS thread would stall training for seconds.
   */
  async save(step: number, write: (tmpDir: string) => Promise<KnownFiles | void>, opts: SaveOptions = {}): Promise<CheckpointEntry> {
    fs.mkdirSync(this.dir, { recursive: true });
    this.checkFreeSpace(step, opts.expectedBytes);
    const tmp = path.join(this.dir, `${TMP_PREFIX}checkpoint-${step}-${process.pid}`);
    fs.rmSync(tmp, { recursive: true, force: true });
    fs.mkdirSync(tmp);
    const final = CheckpointManager.pathFor(this.dir, step);
    try {
      this.opts.faultHook?.('start');
      const known = (await write(tmp)) ?? {};
      const t0 = Date.now();
      this.opts.faultHook?.('files-written');
      const files: Record<string, ManifestFile> = {};
      for (const name of fs.readdirSync(tmp).sort()) {
        const p = path.join(tmp, name);
        if (!fs.statSync(p).isFile()) continue;
        fsyncPath(p);
        const size = fs.statSync(p).size;
        // A known hash counts only for the bytes it was computed from.
        files[name] = known[name]?.size === size ? { size, sha256: known[name].sha256 } : { size, sha256: sha256File(p) };
      }
      const manifest: Manifest = { format: 'train-lora-checkpoint', version: 1, step, created: new Date().toISOString(), files, reason: opts.reason };
      this.opts.faultHook?.('before-manifest');
      writeJsonDurable(path.join(tmp, MANIFEST), manifest);
      fsyncPath(tmp);
      this.opts.faultHook?.('before-rename');
      // Re-saving a step (e.g. the final save right after an interval save) swaps atomically, then drops the old.
      renameDirReplacing(tmp, final, path.join(this.dir, `${TMP_PREFIX}old-checkpoint-${step}-${process.pid}`));
      const entry = this.entry(`checkpoint-${step}`, 'quick');
      opts.onBlocked?.(Date.now() - t0);
      return entry;
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

  /** Every checkpoint folder, newest step first, each checked ('quick': the files exist with the manifest's sizes; 'full': hashes, parsing and content too). */
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

  /** Full verification: manifest, every file's size and sha256, every safetensors header and JSON parses, every state file's content (schema.ts). */
  async verifyEntry(name: string): Promise<CheckpointEntry> {
    const e = this.entry(name, 'quick');
    if (!e.valid || !e.manifest) return e;
    return verifyFolder(e);
  }

  /** Steps of the last checkpoint of every stage other than `current` (stage from trainer_state.json). */
  private stageEnds(entries: readonly CheckpointEntry[], current: string): number[] {
    const last = new Map<string, number>();
    for (const e of entries) {
      let stage: unknown;
      try {
        stage = (JSON.parse(fs.readFileSync(path.join(e.path, TRAINER_STATE_FILE), 'utf8')) as { stage?: unknown }).stage;
      } catch {
        continue;
      }
      if (typeof stage !== 'string' || stage === current) continue;
      last.set(stage, Math.max(last.get(stage) ?? -1, e.step));
    }
    return [...last.values()];
  }

  /**
   * `--checkpoints-total-limit N`, as diffusers and accelerate count it: the newest N checkpoints stay, the final one
   * counting among them (limit 5, 3000 steps, one every 500 keeps 1000, 1500, 2000, 2500, 3000). Older ones are deleted,
   * except the best (`protect.best`, when it is not among the newest N), checkpoints marked keep, `protect.extra`, and
   * the last checkpoint of every stage other than `protect.stage`. Only valid checkpoints count and are deleted.
   * `protect.final` is accepted for compatibility and changes nothing: the final checkpoint is the newest one.
   */
  prune(limit: number, protect: { best?: number; final?: number; extra?: number[]; stage?: string; otherRuns?: number[] } = {}): string[] {
    if (limit <= 0 || !fs.existsSync(this.dir)) return [];
    const entries = fs
      .readdirSync(this.dir)
      .filter((n) => CKPT_RE.test(n))
      .map((n) => this.entry(n, 'quick'))
      .filter((e) => e.valid && !protect.otherRuns?.includes(e.step)) // another run's checkpoints: neither counted nor deleted
      .sort((a, b) => b.step - a.step);
    const beyond = new Set<number>([protect.best, ...(protect.extra ?? [])].filter((s): s is number => s !== undefined));
    if (protect.stage !== undefined) for (const s of this.stageEnds(entries, protect.stage)) beyond.add(s);
    const removed: string[] = [];
    for (const e of entries.slice(limit)) {
      if (beyond.has(e.step) || e.kept) continue;
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
  let m: unknown;
  try {
    m = JSON.parse(fs.readFileSync(f, 'utf8'));
  } catch (e) {
    return `${MANIFEST} is not valid JSON (${(e as Error).message})`;
  }
  if ((m as { format?: unknown } | null)?.format !== 'train-lora-checkpoint') return `${MANIFEST} is not a train-lora manifest`;
  const r = ManifestSchema.safeParse(m);
  if (!r.success) return `${MANIFEST} is not a valid train-lora manifest (${describeIssues(r.error)})`;
  return m as Manifest;
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

/**
 * Full verification: every file of the manifest is there with its sha256, every safetensors header parses, every JSON
 * state file parses and holds what its schema says (src/checkpoint/schema.ts), and the files agree with each other.
 */
async function verifyFolder(e: CheckpointEntry): Promise<CheckpointEntry> {
  const m = e.manifest!;
  const json = new Map<string, unknown>();
  for (const [f, info] of Object.entries(m.files)) {
    const fp = path.join(e.path, f);
    if (!fs.existsSync(fp)) return { ...e, valid: false, problem: `${f} is missing` };
    const digest = sha256File(fp);
    if (digest !== info.sha256) return { ...e, valid: false, problem: `${f} does not match its sha256 in the manifest (corrupt)` };
    try {
      if (f.endsWith('.json')) json.set(f, JSON.parse(fs.readFileSync(fp, 'utf8')));
      if (f.endsWith('.safetensors')) await native().safetensorsHeader(fp);
    } catch (err) {
      return { ...e, valid: false, problem: `${f} does not parse: ${(err as Error).message}` };
    }
  }
  for (const [f, value] of json) {
    const problem = stateFileProblem(f, value);
    if (problem) return { ...e, valid: false, problem };
  }
  const problem = crossFileProblem(m.step, Object.keys(m.files), (f) => json.get(f));
  if (problem) return { ...e, valid: false, problem };
  return e;
}

export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Last modification time of a path in ms (now when it cannot be read: then nothing is judged stale by it). */
export function mtimeOf(p: string): number {
  try {
    return fs.statSync(p).mtimeMs;
  } catch {
    return Date.now();
  }
}

/** When a running process started (ms since the epoch, 1 s resolution, from `ps -o lstart=`), or undefined. */
export function processStartedAt(pid: number): number | undefined {
  const r = spawnSync('ps', ['-o', 'lstart=', '-p', String(pid)], { encoding: 'utf8', timeout: 5000, env: { ...process.env, LC_ALL: 'C' } });
  const t = r.status === 0 ? Date.parse(r.stdout.trim()) : NaN;
  return Number.isFinite(t) ? t : undefined;
}

/**
 * Whether the process that wrote a temporary file or folder named with `pid` (last modified at `mtimeMs`) is gone: no
 * such process, or the pid now belongs to a process that started after the file was last written (a reused pid). This
 * process's own pid counts as gone: at the start nothing of ours is being written yet.
 */
export function writerGone(pid: number, mtimeMs: number): boolean {
  if (pid === process.pid || !processAlive(pid)) return true;
  const started = processStartedAt(pid);
  return started !== undefined && started > mtimeMs + 2000;
}

/** What tells a running process from a later one that got the same pid: its start time and its command line. */
export interface ProcessIdentity {
  /** Linux: `<boot id>:<start time in clock ticks after boot>` (field 22 of /proc/<pid>/stat); elsewhere `ps -o lstart=`. */
  start?: string;
  /** The command line, arguments joined by spaces. */
  command?: string;
}

/** The identity of a running process, or undefined when no process has that pid. */
export function processIdentity(pid: number): ProcessIdentity | undefined {
  if (!Number.isInteger(pid) || pid <= 0 || !processAlive(pid)) return undefined;
  if (process.platform === 'linux' && fs.existsSync(`/proc/${pid}`)) {
    const id: ProcessIdentity = {};
    try {
      const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
      // "pid (comm) state ppid ...": comm may hold spaces and parentheses, so count the fields after the last ')'.
      const ticks = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19]; // field 22 (the first one here is field 3)
      let boot = '';
      try {
        boot = fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
      } catch {
        /* no boot id: the start time alone */
      }
      if (ticks && /^\d+$/.test(ticks)) id.start = `${boot}:${ticks}`;
    } catch {
      /* exited meanwhile */
    }
    try {
      id.command = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').filter(Boolean).join(' ') || undefined;
    } catch {
      /* exited meanwhile, or hidden */
    }
    return id;
  }
  const ps = (field: string): string | undefined => {
    const r = spawnSync('ps', ['-o', `${field}=`, '-p', String(pid)], { encoding: 'utf8', timeout: 5000, env: { ...process.env, LC_ALL: 'C' } });
    return (r.status === 0 && r.stdout.trim()) || undefined;
  };
  return { start: ps('lstart'), command: ps('command') };
}

let ownIdentity: ProcessIdentity | undefined;
const selfIdentity = (): ProcessIdentity => (ownIdentity ??= processIdentity(process.pid) ?? {});

/** What a lock file records about the process that holds it. */
export interface LockHolder {
  pid?: number;
  host?: string;
  /** ISO time the lock was taken. */
  started?: string;
  /** ProcessIdentity.start of the holder (absent in locks of train-lora before 0.3). */
  process_start?: string;
  /** ProcessIdentity.command of the holder. */
  command?: string;
  output_dir?: string;
}

export interface LockInspection {
  /**
   * 'none': no lock file. 'live': a running process holds it. 'stale': its process is gone, or the pid now belongs to
   * another process. 'unknown': held on another host, which cannot be checked from here.
   */
  status: 'none' | 'live' | 'stale' | 'unknown';
  holder?: LockHolder;
  /** Why, in words. */
  reason: string;
  /** For 'live': true when the holder's start time (or command line) matched, false when the lock records neither. */
  verified?: boolean;
  /** The lock file's text as read (a stale one is removed only while it still reads the same). */
  text?: string;
}

/** Lock files held by this process (a second train() in the same process on the same folder is refused too). */
const HELD_HERE = new Set<string>();

/** Whether the lock file is held, and by whom: the pid must still be the process that took it. */
export function inspectLock(file: string): LockInspection {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return { status: 'none', reason: 'no lock file' };
    throw e;
  }
  let holder: LockHolder;
  try {
    holder = JSON.parse(text) as LockHolder;
    if (typeof holder !== 'object' || holder === null) throw new Error('not an object');
  } catch {
    // Created and not yet written (a moment), or cut by a crash.
    let age = Infinity;
    try {
      age = Date.now() - fs.statSync(file).mtimeMs;
    } catch {
      /* gone meanwhile */
    }
    if (age < 10_000) return { status: 'unknown', reason: 'another process is writing it right now', text };
    return { status: 'stale', reason: 'it is unreadable (cut by a crash)', text };
  }
  const pid = holder.pid;
  if (typeof pid !== 'number' || !Number.isInteger(pid) || pid <= 0) return { status: 'stale', holder, reason: 'it names no process', text };
  if (holder.host && holder.host !== os.hostname())
    return { status: 'unknown', holder, reason: `it was taken on host ${holder.host}, which cannot be checked from here`, text };
  if (pid === process.pid)
    return HELD_HERE.has(path.resolve(file))
      ? { status: 'live', holder, verified: true, reason: 'another training in this same process holds it', text }
      : { status: 'stale', holder, reason: `it names this process's pid ${pid}, left by an earlier process that had the same pid`, text };
  const now = processIdentity(pid);
  if (!now) return { status: 'stale', holder, reason: `process ${pid} is gone`, text };
  if (holder.process_start && now.start) {
    if (holder.process_start === now.start) return { status: 'live', holder, verified: true, reason: `process ${pid} is running`, text };
    return { status: 'stale', holder, reason: `pid ${pid} now belongs to another process (started later${now.command ? `: ${now.command}` : ''})`, text };
  }
  if (holder.command && now.command) {
    if (holder.command === now.command) return { status: 'live', holder, verified: true, reason: `process ${pid} is running the same command`, text };
    return { status: 'stale', holder, reason: `pid ${pid} now runs another command (${now.command})`, text };
  }
  return { status: 'live', holder, verified: false, reason: `process ${pid} is running, and the lock records nothing that tells whether it is still the train-lora run`, text };
}

/** One trainer per output folder: a lock file naming the holder (pid, host, process start time, command line). */
export class RunLock {
  private held = false;
  readonly file: string;
  /** Set by acquire() when it removed a stale lock: why it was stale. */
  staleRemoved?: string;
  constructor(outputDir: string) {
    this.file = path.join(outputDir, 'train-lora.lock');
  }

  acquire(): void {
    fs.mkdirSync(path.dirname(this.file), { recursive: true });
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        const fd = fs.openSync(this.file, 'wx');
        const me = selfIdentity();
        const record: LockHolder = {
          pid: process.pid,
          host: os.hostname(),
          started: new Date().toISOString(),
          process_start: me.start,
          command: me.command,
          output_dir: path.dirname(path.resolve(this.file)),
        };
        fs.writeSync(fd, JSON.stringify(record) + '\n');
        fs.fsyncSync(fd);
        fs.closeSync(fd);
        HELD_HERE.add(path.resolve(this.file));
        this.held = true;
        return;
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
        const ins = inspectLock(this.file);
        if (ins.status === 'none') continue; // released meanwhile
        if (ins.status === 'stale') {
          // Remove it only while it still reads the same (not a fresh lock another starting trainer just wrote).
          let again: string | undefined;
          try {
            again = fs.readFileSync(this.file, 'utf8');
          } catch {
            /* gone meanwhile */
          }
          if (again === ins.text) fs.rmSync(this.file, { force: true });
          this.staleRemoved = ins.reason;
          continue;
        }
        throw new CheckpointError(lockedMessage(this.file, ins), 'ELOCKED');
      }
    }
    throw new CheckpointError(`${this.file}: could not take the lock (another train-lora process keeps taking it)`, 'ELOCKED');
  }

  release(): void {
    if (this.held) {
      HELD_HERE.delete(path.resolve(this.file));
      try {
        // Only our own lock (a stale-lock cleanup by someone else may have replaced it).
        if ((JSON.parse(fs.readFileSync(this.file, 'utf8')) as LockHolder).pid === process.pid) fs.rmSync(this.file, { force: true });
      } catch {
        /* already gone */
      }
    }
    this.held = false;
  }
}

function lockedMessage(file: string, ins: LockInspection): string {
  const h = ins.holder ?? {};
  const dir = path.dirname(file);
  const who = [`pid ${h.pid ?? '?'}`, h.host ? `host ${h.host}` : '', `started ${h.started ?? '?'}`, h.command ? `command: ${h.command}` : ''].filter(Boolean).join(', ');
  const clear = `If no train-lora run is using ${dir}, the lock is stale: delete ${file} and start again.`;
  if (ins.status === 'unknown')
    return `${dir} is locked by ${file} (${who}): ${ins.reason}. Wait for that run, stop it, or choose another --output-dir. ${clear}`;
  if (h.pid === process.pid) return `${dir} is in use by another training in this process (lock file ${file}).`;
  return (
    `${dir} is in use by another train-lora process (${who}; lock file ${file}). Wait for it to finish, stop it, or choose another --output-dir. ` +
    (ins.verified
      ? `${clear}`
      : `${clear} (This lock was written by an older train-lora and does not record the process start time, so a pid reused by another program cannot be told apart.)`)
  );
}
