/**
 * Child processes for the benchmark and the device check: run one to the end (or to its time limit), sample the
 * GPU's memory meanwhile, read the JSON line it printed; and the python interpreter that runs the references.
 */
import { execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import { constants } from 'node:os';
import * as path from 'node:path';

export interface ChildResult {
  code: number | null;
  stdout: string;
  stderr: string;
  /** Peak GPU memory in use while the child ran, minus what was in use before it started (nvidia-smi, MB). */
  peakGpuMb?: number;
  /** It ran past `timeoutMs` and was killed. */
  timedOut: boolean;
  seconds: number;
  /** Seconds from the start until `firstMatch` first matched its stdout or stderr (undefined: never). */
  firstMatchSeconds?: number;
}

export interface ChildOptions {
  env?: NodeJS.ProcessEnv;
  /** Sample this GPU's used memory every 250 ms (nvidia-smi). */
  gpuIndex?: number;
  /** Kill the child's whole process group after this long. */
  timeoutMs?: number;
  /** Called with each chunk of stdout as it arrives (e.g. to signal the child at some point of its output). */
  onStdout?: (soFar: string, child: { pid?: number; kill: (sig: NodeJS.Signals) => void }) => void;
  /** Note when this first matches the output so far (stdout or stderr): e.g. a progress bar's first step. */
  firstMatch?: RegExp;
}

export function gpuUsedMb(index: number): Promise<number | undefined> {
  return new Promise((resolve) => {
    execFile('nvidia-smi', ['--query-gpu=memory.used', '--format=csv,noheader,nounits', '-i', String(index)], (err, out) => {
      const v = Number(out?.trim());
      resolve(err || !Number.isFinite(v) ? undefined : v);
    });
  });
}

/** Process groups of the children still running. */
const live = new Set<number>();

/** On Ctrl+C / SIGTERM: kill the running children's process groups (they are not in ours), then exit 128 + signal. */
export function stopChildrenOnSignal(): void {
  for (const sig of ['SIGINT', 'SIGTERM'] as const)
    process.once(sig, () => {
      for (const pid of live) {
        try {
          process.kill(-pid, 'SIGKILL');
        } catch {
          /* already gone */
        }
      }
      process.exit(128 + constants.signals[sig]);
    });
}

/** Runs a process to the end in its own process group (so a timeout stops its workers too). */
export async function runChild(cmd: string, args: string[], o: ChildOptions = {}): Promise<ChildResult> {
  const base = o.gpuIndex === undefined ? undefined : await gpuUsedMb(o.gpuIndex);
  const t0 = performance.now();
  let peak: number | undefined;
  const child = spawn(cmd, args, { env: o.env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
  if (child.pid !== undefined) live.add(child.pid);
  const killGroup = (sig: NodeJS.Signals): void => {
    try {
      if (child.pid !== undefined) process.kill(-child.pid, sig);
    } catch {
      /* already gone */
    }
  };
  const sample = async (): Promise<void> => {
    const v = base === undefined || o.gpuIndex === undefined ? undefined : await gpuUsedMb(o.gpuIndex);
    if (v !== undefined && base !== undefined) peak = Math.max(peak ?? 0, v - base);
  };
  const sampler = base === undefined ? undefined : setInterval(() => void sample(), 250);
  let timedOut = false;
  const limit = o.timeoutMs === undefined ? undefined : setTimeout(() => ((timedOut = true), killGroup('SIGKILL')), Math.max(0, o.timeoutMs));
  let stdout = '';
  let stderr = '';
  let firstMatchSeconds: number | undefined;
  const match = (text: string): void => {
    if (o.firstMatch && firstMatchSeconds === undefined && o.firstMatch.test(text)) firstMatchSeconds = (performance.now() - t0) / 1000;
  };
  child.stdout.on('data', (d: Buffer) => {
    stdout += d.toString();
    match(stdout);
    o.onStdout?.(stdout, { pid: child.pid, kill: (sig) => child.kill(sig) });
  });
  child.stderr.on('data', (d: Buffer) => {
    stderr += d.toString();
    match(stderr);
  });
  const code = await new Promise<number | null>((resolve) => {
    child.on('error', (e) => {
      stderr += e.message;
      resolve(null);
    });
    child.on('close', (c, sig) => resolve(c ?? (sig ? 128 + (constants.signals[sig] ?? 0) : null)));
  });
  if (child.pid !== undefined) live.delete(child.pid);
  if (sampler) clearInterval(sampler);
  if (limit) clearTimeout(limit);
  return { code, stdout, stderr, peakGpuMb: peak, timedOut, seconds: (performance.now() - t0) / 1000, firstMatchSeconds };
}

/** The last JSON object line a child printed. */
export function lastJson(stdout: string): Record<string, unknown> | undefined {
  const line = stdout.split('\n').reverse().find((l) => l.trim().startsWith('{'));
  if (!line) return undefined;
  try {
    return JSON.parse(line) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}

/** Why a child failed, in one line: its JSON error, the time limit, or its exit status and last stderr line. */
export function childError(r: ChildResult, json?: Record<string, unknown>): string {
  if (json && typeof json.error === 'string') return json.error;
  if (r.timedOut) return `stopped after ${r.seconds.toFixed(0)} s (time box)`;
  const tail = r.stderr.trim().split('\n').filter(Boolean).slice(-1)[0] ?? '';
  return `exit ${r.code}${tail ? `: ${tail}` : ''}`;
}

export const num = (v: unknown): number | undefined => (typeof v === 'number' && Number.isFinite(v) ? v : undefined);

/** The folder to put on PYTHONPATH for DIFFUSERS_SRC: the folder itself when it holds diffusers/, else its src/. */
export function diffusersLibDir(src: string): string | undefined {
  if (fs.existsSync(path.join(src, 'diffusers', '__init__.py'))) return src;
  if (fs.existsSync(path.join(src, 'src', 'diffusers', '__init__.py'))) return path.join(src, 'src');
  return undefined;
}

export interface Python {
  cmd: string;
  env: NodeJS.ProcessEnv;
  /** "python 3.x: torch ..., diffusers ..., peft ..., transformers ..." when it works. */
  versions?: string;
  /** Why it cannot be used. */
  reason?: string;
}

/**
 * The interpreter of the python references: $PYTHON or python3, with DIFFUSERS_SRC (a diffusers repository or its
 * `src` folder) on its path; `checkScript --check` must print {"ok": true, versions...}.
 */
export async function findPython(checkScript: string, threads: number): Promise<Python> {
  const cmd = process.env.PYTHON ?? 'python3';
  const env: NodeJS.ProcessEnv = { ...process.env, OMP_WAIT_POLICY: 'PASSIVE', OMP_NUM_THREADS: String(threads) };
  const src = process.env.DIFFUSERS_SRC;
  if (src) {
    const lib = diffusersLibDir(src);
    if (!lib) return { cmd, env, reason: `DIFFUSERS_SRC=${src} has neither diffusers/ nor src/diffusers/ (give a diffusers repository or its src folder)` };
    env.PYTHONPATH = [lib, process.env.PYTHONPATH].filter(Boolean).join(path.delimiter);
  }
  const r = await runChild(cmd, [checkScript, '--check'], { env, timeoutMs: 120_000 });
  const j = lastJson(r.stdout);
  if (r.code !== 0 || !j || j.ok !== true) {
    const why = childError(r, j);
    return { cmd, env, reason: /ENOENT/.test(why) ? `${cmd} not found` : why };
  }
  const versions = ['torch', 'diffusers', 'peft', 'transformers'].map((k) => `${k} ${String(j[k])}`).join(', ');
  return { cmd, env, versions: `python ${String(j.python)}: ${versions}` };
}

// ------------------------------------------------------------------ tables

export const fmt = (v: number | undefined, digits: number): string => (v === undefined ? '-' : v.toFixed(digits));

/** A markdown table, padded so that it also reads as plain text; columns from `rightFrom` on are right-aligned. */
export function markdownTable(head: string[], rows: string[][], rightFrom = head.length): string {
  const widths = head.map((h, i) => Math.max(h.length, 3, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]): string => `| ${cells.map((c, i) => (i >= rightFrom ? c.padStart(widths[i]) : c.padEnd(widths[i]))).join(' | ')} |`;
  const rule = `|${widths.map((w, i) => (i >= rightFrom ? `${'-'.repeat(w + 1)}:` : '-'.repeat(w + 2))).join('|')}|`;
  return [line(head), rule, ...rows.map((r) => line(head.map((_, i) => r[i] ?? '')))].join('\n');
}
