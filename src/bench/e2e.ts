/**
 * `npm run bench -- --e2e` (and `--e2e --quick`): the user's view. The train-lora CLI and diffusers' own
 * examples/text_to_image/train_text_to_image_lora.py train the same model folder on the same images with the same
 * flags (LoRA rank 4 on to_q/to_k/to_v/to_out.0, constant LR 1e-4, center crop, no flip, fp32, accumulation 1, no
 * validation, one save at the end), each as its own process, as a user starts them.
 *
 * Per-step time is the slope between two run lengths of the same case ((wall(n2) - wall(n1)) / (n2 - n1)), so
 * start-up, model loading and the final save cancel out. Also per case: time to the first step (ours: the first
 * line of OUT/logs/metrics.jsonl; diffusers: tqdm's "1/N"), cores used in the steady state ((cpu(n2) - cpu(n1)) /
 * (wall(n2) - wall(n1)), user + system time of the process and its children) and the peak RSS (GNU time's maximum
 * resident set size, the larger of the two runs). Runs of a case alternate sides (ours n1, diffusers n1, ours n2,
 * diffusers n2) so that a change in the machine's load falls on both.
 *
 * diffusers: the library from DIFFUSERS_SRC (a diffusers repository or its src folder) or the installed package,
 * PYTHON's interpreter; the training script from DIFFUSERS_SCRIPT, else DIFFUSERS_SRC/examples/... (a repository),
 * else DIFFUSERS_SRC/../examples/... (a src folder inside a repository). It runs through
 * scripts/bench/run_diffusers_script.py, which stands a PIL version of torchvision.transforms in when torchvision
 * does not import. Both sides run with the environment as given minus OMP_WAIT_POLICY, GOMP_SPINCOUNT and
 * OMP_NUM_THREADS, so each uses its own default thread policy (the `passive` row sets train-lora's old one).
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import sharp from 'sharp';

import { modelFor } from './run';
import { diffusersLibDir, findPython, fmt, markdownTable, runChild, type Python } from './proc';
import type { ModelPreset } from '../model-folders/model-folder';

const ROOT = path.resolve(__dirname, '..', '..');
const CLI = path.join(ROOT, 'dist', 'cli.js');
export const RUN_SCRIPT = path.join(ROOT, 'scripts', 'bench', 'run_diffusers_script.py');
const EXAMPLE = path.join('examples', 'text_to_image', 'train_text_to_image_lora.py');
const CACHE = path.join(os.tmpdir(), 'train-lora-bench');
/** Images per dataset (distinct captions): an epoch is 8 steps at batch 2, so the image cache is warm after 8. */
export const E2E_IMAGES = 16;
const THREAD_ENV = ['OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'OMP_NUM_THREADS'];

export interface E2eCase {
  name: string;
  preset: ModelPreset;
  resolution: number;
  batch: number;
  /** The two run lengths (optimizer steps) of the slope. */
  steps: [number, number];
  /** Extra environment of our side (e.g. the old thread policy). */
  oursEnv?: Record<string, string>;
  /** Run diffusers for this case (a row that varies only our side reuses another row's diffusers numbers). */
  python: boolean;
}

export function e2eCases(quick: boolean): E2eCase[] {
  if (quick) return [{ name: 'tiny 64px b2', preset: 'tiny', resolution: 64, batch: 2, steps: [10, 60], python: true }];
  return [
    { name: 'tiny 64px b2', preset: 'tiny', resolution: 64, batch: 2, steps: [20, 220], python: true },
    { name: 'tiny 64px b2, OMP_WAIT_POLICY=PASSIVE (the old policy)', preset: 'tiny', resolution: 64, batch: 2, steps: [20, 220], oursEnv: { OMP_WAIT_POLICY: 'PASSIVE' }, python: false },
    { name: 'tiny 64px b2, GOMP_SPINCOUNT=10000 (bounded spin forced)', preset: 'tiny', resolution: 64, batch: 2, steps: [20, 220], oursEnv: { GOMP_SPINCOUNT: '10000' }, python: false },
    { name: 'sd15 128px b1', preset: 'sd15', resolution: 128, batch: 1, steps: [5, 45], python: true },
    { name: 'sd15 256px b1', preset: 'sd15', resolution: 256, batch: 1, steps: [3, 19], python: true },
  ];
}

/** One process's run. */
export interface E2eRun {
  steps: number;
  wall?: number;
  cpu?: number;
  peakRssMb?: number;
  firstStep?: number;
  error?: string;
}

export interface E2eSide {
  runs: E2eRun[];
  secPerStep?: number;
  /** wall(n1) - n1 * secPerStep: start-up, loading and the final save. */
  fixedSeconds?: number;
  firstStep?: number;
  cores?: number;
  peakRssMb?: number;
  error?: string;
}

export interface E2eRow {
  case: E2eCase;
  ours: E2eSide;
  diffusers?: E2eSide;
  /** diffusers s/step / ours s/step (> 1: ours is faster). */
  speedup?: number;
}

/** Slope, fixed cost, steady-state cores and peak RSS of two runs of different lengths. */
export function summarize(runs: E2eRun[]): E2eSide {
  const bad = runs.find((r) => r.error || r.wall === undefined);
  if (bad) return { runs, error: bad.error ?? 'no time measured' };
  const [a, b] = [...runs].sort((x, y) => x.steps - y.steps);
  const dt = b.wall! - a.wall!;
  const side: E2eSide = { runs, firstStep: a.firstStep ?? b.firstStep };
  const rss = runs.map((r) => r.peakRssMb).filter((v): v is number => v !== undefined);
  if (rss.length) side.peakRssMb = Math.max(...rss);
  if (b.steps > a.steps && dt > 0) {
    side.secPerStep = dt / (b.steps - a.steps);
    side.fixedSeconds = a.wall! - a.steps * side.secPerStep;
    if (a.cpu !== undefined && b.cpu !== undefined) side.cores = (b.cpu - a.cpu) / dt;
  } else side.error = `the longer run was not slower (${a.wall!.toFixed(1)} s for ${a.steps} steps, ${b.wall!.toFixed(1)} s for ${b.steps}): too noisy`;
  return side;
}

/** GNU time's "%e %U %S %M" line (wall s, user s, system s, max RSS KiB). */
export function parseTimeFile(text: string): { wall: number; cpu: number; peakRssMb: number } | undefined {
  const line = text.trim().split('\n').reverse().find((l) => /^[\d.]+ [\d.]+ [\d.]+ \d+$/.test(l.trim()));
  if (!line) return undefined;
  const [e, u, s, m] = line.trim().split(' ').map(Number);
  return { wall: e, cpu: u + s, peakRssMb: m / 1024 };
}

const GNU_TIME = '/usr/bin/time';
const hasGnuTime = (): boolean => {
  try {
    return /GNU/.test(execFileSync(GNU_TIME, ['--version'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] }));
  } catch {
    return false;
  }
};

/** Runs cmd under GNU time (when there is one) and returns its run. */
async function timed(cmd: string, args: string[], env: NodeJS.ProcessEnv, steps: number, firstMatch: RegExp | undefined, timeoutMs: number | undefined): Promise<E2eRun & { stdout: string; stderr: string }> {
  const timeFile = path.join(os.tmpdir(), `train-lora-e2e-time-${process.pid}-${Date.now()}`);
  const useTime = hasGnuTime();
  const [c, a] = useTime ? [GNU_TIME, ['-f', '%e %U %S %M', '-o', timeFile, cmd, ...args]] : [cmd, args];
  const r = await runChild(c, a, { env, firstMatch, timeoutMs });
  const t = useTime && fs.existsSync(timeFile) ? parseTimeFile(fs.readFileSync(timeFile, 'utf8')) : undefined;
  fs.rmSync(timeFile, { force: true });
  const run: E2eRun & { stdout: string; stderr: string } = { steps, wall: t?.wall ?? r.seconds, cpu: t?.cpu, peakRssMb: t?.peakRssMb, firstStep: r.firstMatchSeconds, stdout: r.stdout, stderr: r.stderr };
  if (r.code !== 0) {
    const tail = `${r.stderr}\n${r.stdout}`.trim().split('\n').filter((l) => l.trim() && !/^\d+\.\d+ /.test(l)).slice(-1)[0] ?? '';
    run.error = r.timedOut ? `stopped after ${r.seconds.toFixed(0)} s (time box)` : `exit ${r.code}: ${tail.slice(0, 300)}`;
  }
  return run;
}

/** A dataset both sides read: metadata.jsonl (file_name, text) + JPEGs of 1.25 x 1 the resolution (resized, cropped). */
export async function e2eDataset(resolution: number, dir = path.join(CACHE, `e2e-data-${resolution}`)): Promise<string> {
  if (fs.existsSync(path.join(dir, 'metadata.jsonl'))) return dir;
  const tmp = `${dir}.tmp-${process.pid}`;
  fs.rmSync(tmp, { recursive: true, force: true });
  fs.mkdirSync(tmp, { recursive: true });
  const w = Math.round(resolution * 1.25), h = resolution;
  const lines: string[] = [];
  for (let i = 0; i < E2E_IMAGES; i++) {
    const px = Buffer.alloc(w * h * 3);
    for (let y = 0; y < h; y++)
      for (let x = 0; x < w; x++)
        for (let c = 0; c < 3; c++) px[(y * w + x) * 3 + c] = (128 + 90 * Math.sin((x * (i + 3)) / w + c) * Math.cos((y * (c + 2)) / h + i) + ((x * 7 + y * 13 + i) % 17)) & 255;
    const name = `img_${String(i).padStart(2, '0')}.jpg`;
    await sharp(px, { raw: { width: w, height: h, channels: 3 } }).jpeg({ quality: 90 }).toFile(path.join(tmp, name));
    lines.push(JSON.stringify({ file_name: name, text: `a photo of object number ${i}, studio light` }));
  }
  fs.writeFileSync(path.join(tmp, 'metadata.jsonl'), lines.join('\n') + '\n');
  fs.renameSync(tmp, dir);
  return dir;
}

/** diffusers' train_text_to_image_lora.py (see the header), or why there is none. */
export function findDiffusersScript(env: NodeJS.ProcessEnv = process.env): { script?: string; reason?: string } {
  if (env.DIFFUSERS_SCRIPT) return fs.existsSync(env.DIFFUSERS_SCRIPT) ? { script: env.DIFFUSERS_SCRIPT } : { reason: `DIFFUSERS_SCRIPT=${env.DIFFUSERS_SCRIPT} does not exist` };
  const src = env.DIFFUSERS_SRC;
  if (src) {
    for (const c of [path.join(src, EXAMPLE), path.join(src, '..', EXAMPLE)]) if (fs.existsSync(c)) return { script: path.resolve(c) };
    return { reason: `no ${EXAMPLE} in DIFFUSERS_SRC=${src} or its parent: set DIFFUSERS_SCRIPT to the script (diffusers' examples are not part of the pip package)` };
  }
  return { reason: `set DIFFUSERS_SRC to a diffusers repository (its examples/ hold the script), or DIFFUSERS_SCRIPT to ${path.basename(EXAMPLE)}` };
}

function cleanEnv(extra: Record<string, string> = {}, base: NodeJS.ProcessEnv = process.env): NodeJS.ProcessEnv {
  const env = { ...base };
  for (const k of THREAD_ENV) delete env[k];
  return { ...env, ...extra };
}

const FLAGS = (c: E2eCase, steps: number, out: string): Array<[string, string | undefined]> => [
  ['resolution', String(c.resolution)],
  ['center_crop', undefined],
  ['train_batch_size', String(c.batch)],
  ['gradient_accumulation_steps', '1'],
  ['max_train_steps', String(steps)],
  ['learning_rate', '1e-4'],
  ['lr_scheduler', 'constant'],
  ['lr_warmup_steps', '0'],
  ['rank', '4'],
  ['seed', '0'],
  ['mixed_precision', 'no'],
  ['checkpointing_steps', '1000000'],
  ['output_dir', out],
];

async function runOursE2e(c: E2eCase, model: string, data: string, steps: number, timeoutMs: number | undefined): Promise<E2eRun> {
  const out = fs.mkdtempSync(path.join(os.tmpdir(), 'train-lora-e2e-ours-'));
  try {
    const args = [CLI, '--pretrained-model-name-or-path', model, '--train-data-dir', data, '--device', 'cpu', '--save-format', 'diffusers'];
    for (const [k, v] of FLAGS(c, steps, out)) args.push(`--${k.replace(/_/g, '-')}`, ...(v === undefined ? [] : [v]));
    const t0 = Date.now();
    const r = await timed(process.execPath, args, cleanEnv(c.oursEnv), steps, undefined, timeoutMs);
    // The first step's time: the first line of metrics.jsonl (its `time` is when the step finished).
    const metrics = path.join(out, 'logs', 'metrics.jsonl');
    if (fs.existsSync(metrics)) {
      const first = fs.readFileSync(metrics, 'utf8').split('\n').find((l) => l.includes('"step":1,') || l.includes('"step":1}'));
      const time = first ? (JSON.parse(first) as { time?: number }).time : undefined;
      if (time !== undefined) r.firstStep = time - t0 / 1000;
    }
    return { steps, wall: r.wall, cpu: r.cpu, peakRssMb: r.peakRssMb, firstStep: r.firstStep, error: r.error };
  } finally {
    fs.rmSync(out, { recursive: true, force: true });
  }
}

async function runDiffusersE2e(py: Python, script: string, c: E2eCase, model: string, data: string, steps: number, timeoutMs: number | undefined): Promise<E2eRun> {
  const out = fs.mkdtempSync(path.join(os.tmpdir(), 'train-lora-e2e-diffusers-'));
  try {
    const args = [RUN_SCRIPT, script, '--pretrained_model_name_or_path', model, '--train_data_dir', data, '--dataloader_num_workers', '0'];
    for (const [k, v] of FLAGS(c, steps, out)) args.push(`--${k}`, ...(v === undefined ? [] : [v]));
    // tqdm's bar after the first optimizer step: "| 1/N ["
    const r = await timed(py.cmd, args, cleanEnv({}, py.env), steps, new RegExp(`\\| 1/${steps} \\[`), timeoutMs);
    return { steps, wall: r.wall, cpu: r.cpu, peakRssMb: r.peakRssMb, firstStep: r.firstStep, error: r.error };
  } finally {
    fs.rmSync(out, { recursive: true, force: true });
  }
}

export interface E2eOptions {
  python?: Python;
  script?: string;
  deadline?: number;
  log?: (line: string) => void;
}

export async function e2eBenchmark(cases: E2eCase[], o: E2eOptions): Promise<E2eRow[]> {
  const rows: E2eRow[] = [];
  const py = o.python && !o.python.reason && o.script ? o.python : undefined;
  let lastDiffusers: E2eSide | undefined;
  for (const c of cases) {
    const model = await modelFor(c.preset, o.log);
    const data = await e2eDataset(c.resolution);
    const ours: E2eRun[] = [];
    const theirs: E2eRun[] = [];
    for (const n of c.steps) {
      const left = (): number | undefined => (o.deadline === undefined ? undefined : Math.max(1, o.deadline - Date.now()));
      if (o.deadline !== undefined && Date.now() > o.deadline) {
        ours.push({ steps: n, error: 'skipped (time box)' });
        continue;
      }
      const r = await runOursE2e(c, model, data, n, left());
      o.log?.(`  ${c.name}: ours ${n} steps ${fmt(r.wall, 1)} s${r.error ? ` (${r.error})` : ''}`);
      ours.push(r);
      if (py && c.python) {
        const d = await runDiffusersE2e(py, o.script!, c, model, data, n, left());
        o.log?.(`  ${c.name}: diffusers ${n} steps ${fmt(d.wall, 1)} s${d.error ? ` (${d.error})` : ''}`);
        theirs.push(d);
      }
    }
    const row: E2eRow = { case: c, ours: summarize(ours) };
    if (py && c.python) lastDiffusers = row.diffusers = summarize(theirs);
    else if (py && lastDiffusers) row.diffusers = lastDiffusers; // same data and model: the row above's diffusers run
    if (row.ours.secPerStep && row.diffusers?.secPerStep) row.speedup = row.diffusers.secPerStep / row.ours.secPerStep;
    rows.push(row);
  }
  return rows;
}

const mb = (v: number | undefined): string => (v === undefined ? '-' : v >= 1024 ? `${(v / 1024).toFixed(2)} GB` : `${v.toFixed(0)} MB`);
const pair = (a: string, b: string | undefined): string => (b === undefined ? a : `${a} / ${b}`);

export function e2eTable(rows: E2eRow[]): string {
  const head = ['case', 'train-lora s/step', 'diffusers s/step', 'ours vs diffusers', 'first step s (ours / diffusers)', 'cores used (ours / diffusers)', 'peak RSS (ours / diffusers)'];
  const body = rows.map((r) => {
    const d = r.diffusers;
    const reused = d && !r.case.python;
    return [
      r.case.name,
      r.ours.error ? 'error' : fmt(r.ours.secPerStep, 3),
      d ? (d.error ? 'error' : fmt(d.secPerStep, 3) + (reused ? ' (row above)' : '')) : '-',
      r.speedup === undefined ? '-' : `${r.speedup.toFixed(2)}x${r.speedup < 1 ? ' (slower)' : ''}`,
      pair(fmt(r.ours.firstStep, 1), d && !reused ? fmt(d.firstStep, 1) : undefined),
      pair(fmt(r.ours.cores, 2), d && !reused ? fmt(d.cores, 2) : undefined),
      pair(mb(r.ours.peakRssMb), d && !reused ? mb(d.peakRssMb) : undefined),
    ];
  });
  const errors = rows.flatMap((r) => [r.ours.error && `ours ${r.case.name}: ${r.ours.error}`, r.case.python && r.diffusers?.error && `diffusers ${r.case.name}: ${r.diffusers.error}`].filter((e): e is string => typeof e === 'string'));
  return [markdownTable(head, body, 1), ...errors].join('\n');
}

/** The issue's targets, each met or not (with the numbers). */
export function e2eTargets(rows: E2eRow[]): string[] {
  const out: string[] = [];
  for (const r of rows) {
    if (r.case.oursEnv) continue;
    const want = r.case.preset === 'tiny' ? 2.0 : 1.15;
    if (r.speedup !== undefined) out.push(`${r.speedup >= want ? 'met' : 'NOT met'}: ${r.case.name} ${r.speedup.toFixed(2)}x diffusers (target >= ${want}x)`);
    const a = r.ours.peakRssMb, b = r.diffusers?.peakRssMb;
    if (a !== undefined && b !== undefined) out.push(`${a < b ? 'met' : 'NOT met'}: ${r.case.name} peak RSS ${mb(a)} vs ${mb(b)} (target: below diffusers)`);
    if (r.case.preset === 'tiny' && r.ours.firstStep !== undefined) out.push(`${r.ours.firstStep <= 3 ? 'met' : 'NOT met'}: ${r.case.name} first step after ${r.ours.firstStep.toFixed(1)} s (target <= 3 s)`);
  }
  return out;
}

function loadLine(): string {
  const l = os.loadavg();
  return `load average ${l.map((v) => v.toFixed(2)).join(', ')} on ${os.cpus().length} cores`;
}

/** `npm run bench -- --e2e [--quick] [--out FILE]`. */
export async function e2eMain(quick: boolean, out: string): Promise<void> {
  const started = Date.now();
  const log = (l: string): void => void process.stderr.write(`${l}\n`);
  const found = findDiffusersScript();
  const threads = os.cpus().length;
  const py = await findPython(RUN_SCRIPT.replace('run_diffusers_script.py', 'diffusers_step.py'), threads);
  const script = found.script;
  const sha = script ? createHash('sha256').update(fs.readFileSync(script)).digest('hex').slice(0, 12) : undefined;
  console.log(`train-lora end-to-end bench: ${os.cpus()[0]?.model ?? 'unknown CPU'}, ${threads} cores, ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB; node ${process.version}`);
  console.log(`at start: ${loadLine()}`);
  if (py.reason) console.log(`diffusers: not available (${py.reason})`);
  else if (!script) console.log(`diffusers: not available (${found.reason})`);
  else console.log(`diffusers: ${script} (sha256 ${sha}) with ${py.versions}${process.env.DIFFUSERS_SRC ? `, library from ${diffusersLibDir(process.env.DIFFUSERS_SRC)}` : ''}`);
  console.log(`per step: slope between runs of ${[...new Set(e2eCases(quick).map((c) => c.steps.join(' and ')))].join(' / ')} steps; ${E2E_IMAGES} JPEGs of 1.25x1 the resolution, center crop\n`);
  const rows = await e2eBenchmark(e2eCases(quick), { python: py, script, log });
  console.log(e2eTable(rows));
  console.log('');
  for (const t of e2eTargets(rows)) console.log(t);
  console.log(`\nat end: ${loadLine()}; total ${((Date.now() - started) / 1000).toFixed(0)} s`);
  const result = { date: new Date().toISOString(), host: { cpu: os.cpus()[0]?.model, cores: threads, node: process.version, loadAtEnd: os.loadavg() }, diffusers: { script: script ?? null, sha256: sha ?? null, versions: py.versions ?? null, reason: py.reason ?? found.reason ?? null }, rows };
  fs.writeFileSync(out, JSON.stringify(result, null, 2) + '\n');
  console.log(`wrote ${out}`);
}
