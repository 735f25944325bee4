/**
 * `npm run bench`: steps/s and peak memory of one LoRA training step (forward + backward of one micro-batch,
 * one AdamW step, accumulation 1), ours next to diffusers + peft (scripts/bench/diffusers_step.py) on the same
 * model folder, with the same thread count.
 *
 *   node dist/bench/run.js [--quick] [--no-python] [--out FILE]
 *
 * CPU: the tiny model, 32 and 64 px, batch 1 and 4, fp32, with and without gradient checkpointing.
 * CUDA (when available): the SD 1.5-shaped random-weight model, 512 px, batch 1 and 8, fp32 and bf16, with and
 * without checkpointing. `--quick`: tiny, 32 px, batch 1 and 4, fp32, no checkpointing.
 * Every measurement runs in its own process, so the peak host RSS (and GPU memory, sampled with nvidia-smi)
 * of a row is that row's alone; it includes loading the model. The python side finds diffusers through
 * DIFFUSERS_SRC (a diffusers `src` folder) or an installed package; PYTHON picks the interpreter.
 * Writes the table to stdout and the same as JSON to bench-results.json (or --out).
 */
import { execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { makeTinyModel, type ModelPreset } from '../models/model-folder';
import { native, type TrainBatch } from '../native';
import { fromFloat32, fromInt64 } from '../tensors';
import { NoiseSchedule } from '../train/schedules/noise';

const WARMUP = 2;
const MIN_STEPS = 5;
const MIN_SECONDS = 3;
const TARGETS = ['to_k', 'to_q', 'to_v', 'to_out.0'];
const PY_SCRIPT = path.resolve(__dirname, '..', '..', 'scripts', 'bench', 'diffusers_step.py');
const CACHE = path.join(os.tmpdir(), 'train-lora-bench');

interface Case {
  preset: ModelPreset;
  device: string;
  resolution: number;
  batch: number;
  dtype: 'fp32' | 'bf16';
  checkpointing: boolean;
}

/** One side's measurement (or why there is none). */
interface Measurement {
  stepsPerSec?: number;
  steps?: number;
  peakRssMb?: number;
  /** Peak GPU memory of the process (nvidia-smi, device used minus what was used before it started). */
  peakGpuMb?: number;
  /** The python side's torch.cuda.max_memory_allocated. */
  peakCudaAllocatedMb?: number;
  error?: string;
}

interface Row extends Case {
  ours: Measurement;
  python?: Measurement;
  /** ours / python steps/s */
  ratio?: number;
}

// ------------------------------------------------------------------ the child: our step, timed

async function runOurs(c: Case, modelDir: string): Promise<Measurement> {
  const n = native();
  const schedule = NoiseSchedule.fromFile(path.join(modelDir, 'scheduler', 'scheduler_config.json'));
  const pipe = await n.loadPipeline(modelDir, { device: c.device, dtype: c.dtype });
  const { trainer } = await n.createTrainer(pipe, {
    rank: 4,
    alpha: 4,
    init: 'gaussian',
    targets: TARGETS,
    mixedPrecision: c.dtype === 'bf16' ? 'bf16' : 'no',
    gradientCheckpointing: c.checkpointing,
    alphasCumprod: Array.from(schedule.alphasCumprod),
    maxGradNorm: 1,
    seed: 0,
  });
  const te = JSON.parse(fs.readFileSync(path.join(modelDir, 'text_encoder', 'config.json'), 'utf8')) as {
    vocab_size: number;
    max_position_embeddings: number;
  };
  // Two random batches made up front (the python side draws its inputs on the device, at no real cost).
  const batches: TrainBatch[] = [0, 1].map(() => {
    const px = c.batch * 3 * c.resolution * c.resolution;
    const ids = c.batch * te.max_position_embeddings;
    return {
      pixelValues: fromFloat32('pixel_values', [c.batch, 3, c.resolution, c.resolution], Float32Array.from({ length: px }, () => Math.random() * 2 - 1)),
      inputIds: fromInt64('input_ids', [c.batch, te.max_position_embeddings], Array.from({ length: ids }, () => Math.floor(Math.random() * te.vocab_size))),
    };
  });
  const step = async (i: number): Promise<void> => {
    await n.trainerMicroStep(trainer, batches[i % 2], 1);
    await n.trainerOptimizerStep(trainer, 1e-4); // returns the grad norm: the device has finished the step
  };
  for (let i = 0; i < WARMUP; i++) await step(i);
  const t0 = performance.now();
  let steps = 0;
  while (steps < MIN_STEPS || performance.now() - t0 < MIN_SECONDS * 1000) await step(steps++);
  const seconds = (performance.now() - t0) / 1000;
  return { stepsPerSec: steps / seconds, steps, peakRssMb: process.resourceUsage().maxRSS / 1024 };
}

// ------------------------------------------------------------------ the parent: processes and memory sampling

interface ChildResult {
  code: number | null;
  stdout: string;
  stderr: string;
  peakGpuMb?: number;
}

function gpuUsedMb(index: number): Promise<number | undefined> {
  return new Promise((resolve) => {
    execFile('nvidia-smi', ['--query-gpu=memory.used', '--format=csv,noheader,nounits', '-i', String(index)], (err, out) => {
      const v = Number(out?.trim());
      resolve(err || !Number.isFinite(v) ? undefined : v);
    });
  });
}

/** Runs a process to the end; on CUDA samples the GPU's used memory meanwhile. */
async function runChild(cmd: string, args: string[], env: NodeJS.ProcessEnv, gpuIndex?: number): Promise<ChildResult> {
  const base = gpuIndex === undefined ? undefined : await gpuUsedMb(gpuIndex);
  let peak: number | undefined;
  const child = spawn(cmd, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
  const sample = async (): Promise<void> => {
    const v = base === undefined || gpuIndex === undefined ? undefined : await gpuUsedMb(gpuIndex);
    if (v !== undefined && base !== undefined) peak = Math.max(peak ?? 0, v - base);
  };
  const timer = base === undefined ? undefined : setInterval(() => void sample(), 250);
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const code = await new Promise<number | null>((resolve) => {
    child.on('error', (e) => {
      stderr += e.message;
      resolve(null);
    });
    child.on('close', resolve);
  });
  if (timer) clearInterval(timer);
  return { code, stdout, stderr, peakGpuMb: peak };
}

/** The last JSON object line a child printed. */
function lastJson(stdout: string): Record<string, unknown> | undefined {
  const line = stdout.split('\n').reverse().find((l) => l.trim().startsWith('{'));
  if (!line) return undefined;
  try {
    return JSON.parse(line) as Record<string, unknown>;
  } catch {
    return undefined;
  }
}

function childError(r: ChildResult, json: Record<string, unknown> | undefined): string {
  if (json && typeof json.error === 'string') return json.error;
  const tail = r.stderr.trim().split('\n').filter(Boolean).slice(-1)[0] ?? '';
  return `exit ${r.code}${tail ? `: ${tail}` : ''}`;
}

const num = (v: unknown): number | undefined => (typeof v === 'number' && Number.isFinite(v) ? v : undefined);

async function measureOurs(c: Case, modelDir: string, gpuIndex?: number): Promise<Measurement> {
  const r = await runChild(process.execPath, [__filename, '--child', JSON.stringify({ case: c, modelDir })], process.env, gpuIndex);
  const j = lastJson(r.stdout);
  if (r.code !== 0 || !j || j.error) return { error: childError(r, j) };
  return { stepsPerSec: num(j.stepsPerSec), steps: num(j.steps), peakRssMb: num(j.peakRssMb), peakGpuMb: r.peakGpuMb };
}

interface Python {
  cmd: string;
  env: NodeJS.ProcessEnv;
  versions?: string;
  reason?: string;
}

async function findPython(threads: number): Promise<Python> {
  const cmd = process.env.PYTHON ?? 'python3';
  const env: NodeJS.ProcessEnv = { ...process.env, OMP_WAIT_POLICY: 'PASSIVE', OMP_NUM_THREADS: String(threads) };
  const src = process.env.DIFFUSERS_SRC;
  if (src) {
    if (!fs.existsSync(path.join(src, 'diffusers'))) return { cmd, env, reason: `DIFFUSERS_SRC=${src} has no diffusers/ folder` };
    env.PYTHONPATH = [src, process.env.PYTHONPATH].filter(Boolean).join(path.delimiter);
  }
  const r = await runChild(cmd, [PY_SCRIPT, '--check'], env);
  const j = lastJson(r.stdout);
  if (r.code !== 0 || !j || j.ok !== true) {
    const why = childError(r, j);
    return { cmd, env, reason: /ENOENT/.test(why) ? `${cmd} not found` : why };
  }
  const versions = ['torch', 'diffusers', 'peft', 'transformers'].map((k) => `${k} ${String(j[k])}`).join(', ');
  return { cmd, env, versions: `python ${String(j.python)}: ${versions}` };
}

async function measurePython(py: Python, c: Case, modelDir: string, threads: number, gpuIndex?: number): Promise<Measurement> {
  const args = [PY_SCRIPT, '--model', modelDir, '--resolution', String(c.resolution), '--batch', String(c.batch)];
  if (c.checkpointing) args.push('--gradient-checkpointing');
  args.push('--device', c.device, '--dtype', c.dtype, '--steps', String(MIN_STEPS), '--warmup', String(WARMUP));
  args.push('--min-seconds', String(MIN_SECONDS), '--threads', String(threads));
  const r = await runChild(py.cmd, args, py.env, gpuIndex);
  const j = lastJson(r.stdout);
  if (r.code !== 0 || !j || j.error) return { error: childError(r, j) };
  return {
    stepsPerSec: num(j.steps_per_sec),
    steps: num(j.steps),
    peakRssMb: num(j.peak_rss_mb),
    peakGpuMb: r.peakGpuMb,
    peakCudaAllocatedMb: num(j.peak_cuda_mb),
  };
}

// ------------------------------------------------------------------ cases, table, main

function cases(quick: boolean, cuda: string | undefined): Case[] {
  const out: Case[] = [];
  const tiny = { preset: 'tiny', device: 'cpu', dtype: 'fp32' } as const;
  for (const resolution of quick ? [32] : [32, 64])
    for (const batch of [1, 4])
      for (const checkpointing of quick ? [false] : [false, true]) out.push({ ...tiny, resolution, batch, checkpointing });
  if (!quick && cuda)
    for (const dtype of ['fp32', 'bf16'] as const)
      for (const batch of [1, 8])
        for (const checkpointing of [false, true]) out.push({ preset: 'sd15', device: cuda, resolution: 512, batch, dtype, checkpointing });
  return out;
}

const made = new Map<ModelPreset, string>();

async function modelFor(preset: ModelPreset): Promise<string> {
  const dir = path.join(CACHE, preset);
  if (made.has(preset)) return dir;
  made.set(preset, dir);
  // makeTinyModel renames a finished folder into place, so an existing one is complete. tiny takes a moment
  // and is remade each run; sd15 (~5 GB) is kept.
  if (preset === 'sd15' && fs.existsSync(path.join(dir, 'model_index.json'))) return dir;
  fs.mkdirSync(CACHE, { recursive: true });
  process.stdout.write(`making the ${preset} model in ${dir} ...\n`);
  await makeTinyModel(dir, preset, 0);
  return dir;
}

const fmt = (v: number | undefined, digits: number): string => (v === undefined ? '-' : v.toFixed(digits));

function table(rows: Row[], python: boolean): string {
  const gpu = rows.some((r) => r.device !== 'cpu');
  const head = ['model', 'device', 'res', 'batch', 'dtype', 'ckpt', 'ours step/s', 'ours RSS MB'];
  if (gpu) head.push('ours GPU MB');
  if (python) head.push('py step/s', 'py RSS MB', ...(gpu ? ['py GPU MB'] : []), 'ours/py');
  const body = rows.map((r) => {
    const cells = [r.preset, r.device, String(r.resolution), String(r.batch), r.dtype, r.checkpointing ? 'yes' : 'no'];
    cells.push(r.ours.error ? 'error' : fmt(r.ours.stepsPerSec, 2), fmt(r.ours.peakRssMb, 0));
    if (gpu) cells.push(fmt(r.ours.peakGpuMb, 0));
    if (python) {
      const p = r.python ?? {};
      cells.push(p.error ? 'error' : fmt(p.stepsPerSec, 2), fmt(p.peakRssMb, 0));
      if (gpu) cells.push(fmt(p.peakGpuMb, 0));
      cells.push(r.ratio === undefined ? '-' : `${r.ratio.toFixed(2)}x`);
    }
    return cells;
  });
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const line = (cells: string[]): string => cells.map((c, i) => (i < 6 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ');
  const errors = rows.flatMap((r) =>
    [r.ours.error && `ours   ${r.preset} ${r.resolution}px b${r.batch} ${r.dtype}${r.checkpointing ? ' ckpt' : ''}: ${r.ours.error}`,
      r.python?.error && `python ${r.preset} ${r.resolution}px b${r.batch} ${r.dtype}${r.checkpointing ? ' ckpt' : ''}: ${r.python.error}`].filter(
      (e): e is string => typeof e === 'string',
    ),
  );
  return [line(head), line(widths.map((w) => '-'.repeat(w))), ...body.map(line), ...errors].join('\n');
}

function parseArgs(argv: string[]): { quick: boolean; python: boolean; out: string } {
  const a = { quick: false, python: true, out: 'bench-results.json' };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--quick') a.quick = true;
    else if (argv[i] === '--no-python') a.python = false;
    else if (argv[i] === '--out' && argv[i + 1]) a.out = argv[++i];
    else throw new Error(`unknown option ${argv[i]} (use --quick, --no-python, --out FILE)`);
  }
  return a;
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  const started = Date.now();
  const devices = await native().devices();
  const threads = devices.find((d) => d.type === 'cpu')?.threads ?? os.cpus().length;
  const cudaInfo = devices.find((d) => d.type === 'cuda' && d.available);
  const cuda = cudaInfo ? `cuda:${cudaInfo.index}` : undefined;
  const v = native().version();
  console.log(`train-lora bench: libtorch ${v.torch}, ${threads} CPU threads (${os.cpus()[0]?.model ?? 'unknown CPU'})`);
  if (!cuda) console.log(`CUDA: skipped (no CUDA device: ${devices.find((d) => d.type === 'cuda')?.reason ?? 'none found'})`);
  else console.log(`CUDA: ${cudaInfo?.name ?? cuda}`);

  const py = args.python ? await findPython(threads) : undefined;
  if (!args.python) console.log('Python reference: skipped (--no-python)');
  else if (py?.reason) console.log(`Python reference: not available (${py.reason})`);
  else console.log(`Python reference: ${py?.versions} (${threads} threads)`);
  const withPython = py !== undefined && py.reason === undefined;

  console.log(`each row: ${WARMUP} warm-up steps, then at least ${MIN_STEPS} steps and ${MIN_SECONDS} s; one process per measurement\n`);
  const rows: Row[] = [];
  for (const c of cases(args.quick, cuda)) {
    const modelDir = await modelFor(c.preset);
    const gpuIndex = c.device === 'cpu' ? undefined : cudaInfo?.index;
    const row: Row = { ...c, ours: await measureOurs(c, modelDir, gpuIndex) };
    if (withPython) row.python = await measurePython(py, c, modelDir, threads, gpuIndex);
    if (row.ours.stepsPerSec && row.python?.stepsPerSec) row.ratio = row.ours.stepsPerSec / row.python.stepsPerSec;
    rows.push(row);
    const tag = `${c.preset} ${c.resolution}px b${c.batch} ${c.dtype}${c.checkpointing ? ' ckpt' : ''}`;
    process.stderr.write(`  ${tag}: ours ${fmt(row.ours.stepsPerSec, 2)} step/s${withPython ? `, python ${fmt(row.python?.stepsPerSec, 2)} step/s` : ''}\n`);
  }

  const seconds = (Date.now() - started) / 1000;
  console.log(table(rows, withPython));
  console.log(`\nRSS: peak host resident memory of the measuring process (includes loading the model).`);
  if (cuda) console.log('GPU MB: peak device memory in use while the process ran (nvidia-smi, sampled every 250 ms).');
  console.log(`total ${seconds.toFixed(0)} s`);
  const result = {
    date: new Date().toISOString(),
    host: { cpu: os.cpus()[0]?.model, threads, libtorch: v.torch, node: process.version, cuda: cudaInfo?.name ?? null },
    python: args.python ? (py?.reason ? { available: false, reason: py.reason } : { available: true, versions: py?.versions }) : { available: false, reason: '--no-python' },
    protocol: { warmup: WARMUP, minSteps: MIN_STEPS, minSeconds: MIN_SECONDS, rank: 4, alpha: 4, targets: TARGETS, accumulation: 1 },
    seconds,
    rows,
  };
  fs.writeFileSync(args.out, JSON.stringify(result, null, 2) + '\n');
  console.log(`wrote ${args.out}`);
}

async function child(spec: string): Promise<void> {
  const { case: c, modelDir } = JSON.parse(spec) as { case: Case; modelDir: string };
  try {
    console.log(JSON.stringify(await runOurs(c, modelDir)));
  } catch (e) {
    console.log(JSON.stringify({ error: e instanceof Error ? e.message.split('\n')[0] : String(e) }));
    process.exitCode = 1;
  }
}

if (require.main === module) {
  const i = process.argv.indexOf('--child');
  (i > 0 ? child(process.argv[i + 1]) : main()).catch((e: unknown) => {
    console.error(e instanceof Error ? e.message : e);
    process.exitCode = 1;
  });
}
