/**
 * `npm run bench`: steps/s, samples/s, MFU and peak memory of one LoRA training step (forward + backward of one
 * micro-batch, one AdamW step, accumulation 1), ours next to diffusers + peft (scripts/bench/diffusers_step.py) on
 * the same model folder, with the same thread count.
 *
 *   node dist/bench/run.js [--quick] [--no-python] [--cached-latents] [--peak-tflops N] [--out FILE]
 *   node dist/bench/run.js --e2e [--quick] [--out FILE]     the CLI against diffusers' training script (e2e.ts)
 *   node dist/bench/run.js --memory [--no-python] [--out FILE]   peak memory at SD 1.5's shapes, 512 px (below)
 *   node dist/bench/run.js --decode [decode.ts options]     image decoding throughput (decode.ts)
 *
 * CPU: the tiny model, 32 and 64 px, batch 1 and 4, fp32, with and without gradient checkpointing.
 * CUDA (when available): the SD 1.5-shaped random-weight model, 512 px, batch 1 and 8, fp32 and bf16, with and
 * without checkpointing. `--quick`: tiny, 32 px, batch 1 and 4, fp32, no checkpointing. `--cached-latents`: both
 * sides start each step from a cached VAE posterior (mean, std) instead of pixels, as `--cache-latents` trains.
 * `--memory`: the SD 1.5-shaped model at 512 px, batch 1, fp32 on the CPU (a stand-in for GPU memory), with and
 * without gradient checkpointing, 1 warm-up + 1 timed step: each row's peak RSS (ours and diffusers + peft).
 * Every measurement runs in its own process, so the peak host RSS (and GPU memory, sampled with nvidia-smi)
 * of a row is that row's alone; it includes loading the model. The python side finds diffusers through
 * DIFFUSERS_SRC (a diffusers `src` folder) or an installed package; PYTHON picks the interpreter.
 *
 * MFU (with --peak-tflops; the device check looks the GPU's dense bf16 peak up by name): FLOPs of one training step
 * as torch.utils.flop_counter counts them in the python step on the same shapes (text encoder forward, UNet forward
 * and backward — LoRA's backward skips the frozen weights' gradients —, plus the VAE encoder without cached latents;
 * no checkpointing recompute), × steps/s, ÷ the peak. Without the python side there is no FLOP count and no MFU.
 * Writes the table to stdout and the same as JSON to bench-results.json (or --out).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { makeTinyModel, type ModelPreset } from '../model-folders/model-folder';
import { native, type TrainBatch } from '../native';
import { fromFloat32, fromInt64 } from '../tensors';
import { NoiseSchedule } from '../schedules/noise';
import { decodeMain } from './decode';
import { e2eMain } from './e2e';
import { childError, findPython, fmt, lastJson, markdownTable, num, runChild, stopChildrenOnSignal, type Python } from './proc';

const WARMUP = 2;
const MIN_STEPS = 5;
const MIN_SECONDS = 3;
const TARGETS = ['to_k', 'to_q', 'to_v', 'to_out.0'];
export const PY_STEP_SCRIPT = path.resolve(__dirname, '..', '..', 'scripts', 'bench', 'diffusers_step.py');
const CACHE = path.join(os.tmpdir(), 'train-lora-bench');
export const BENCH_PROTOCOL = { warmup: WARMUP, minSteps: MIN_STEPS, minSeconds: MIN_SECONDS, rank: 4, alpha: 4, targets: TARGETS, accumulation: 1 };

export interface Case {
  preset: ModelPreset;
  device: string;
  resolution: number;
  batch: number;
  dtype: 'fp32' | 'bf16';
  checkpointing: boolean;
  /** Steps start from a cached VAE posterior (no VAE encode per step). */
  cachedLatents: boolean;
  /** Warm-up and least timed steps and seconds (default: the protocol's). */
  warmup?: number;
  minSteps?: number;
  minSeconds?: number;
}

/** One side's measurement (or why there is none). */
export interface Measurement {
  stepsPerSec?: number;
  samplesPerSec?: number;
  steps?: number;
  peakRssMb?: number;
  /** Peak GPU memory of the process (nvidia-smi, device used minus what was used before it started). */
  peakGpuMb?: number;
  /** The python side's torch.cuda.max_memory_allocated. */
  peakCudaAllocatedMb?: number;
  /** Model FLOPs utilisation (0..1) against the GPU's dense bf16 peak. */
  mfu?: number;
  error?: string;
}

export interface Row extends Case {
  ours: Measurement;
  python?: Measurement;
  /** FLOPs of one training step (see the header), from the python step on the same shapes. */
  flopsPerStep?: number;
  /** ours / python steps/s */
  ratio?: number;
}

// ------------------------------------------------------------------ the child: our step, timed

function randn(n: number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    const r = Math.sqrt(-2 * Math.log(1 - Math.random()));
    const t = 2 * Math.PI * Math.random();
    out[i] = r * Math.cos(t);
    if (i + 1 < n) out[i + 1] = r * Math.sin(t);
  }
  return out;
}

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
    // CUDA rows replay the step from CUDA graphs (native/train/cuda_graph.h); the CPU trains eagerly.
    cudaGraphs: c.device.startsWith('cuda'),
  });
  const config = (component: string): Record<string, unknown> => JSON.parse(fs.readFileSync(path.join(modelDir, component, 'config.json'), 'utf8')) as Record<string, unknown>;
  const te = config('text_encoder') as { vocab_size: number; max_position_embeddings: number };
  const vae = config('vae') as { block_out_channels: number[]; latent_channels: number };
  // Two random batches made up front (the python side draws its inputs on the device, at no real cost).
  const batches: TrainBatch[] = [0, 1].map(() => {
    const ids = c.batch * te.max_position_embeddings;
    const inputIds = fromInt64('input_ids', [c.batch, te.max_position_embeddings], Array.from({ length: ids }, () => Math.floor(Math.random() * te.vocab_size)));
    if (c.cachedLatents) {
      const s = c.resolution / 2 ** (vae.block_out_channels.length - 1);
      const shape = [c.batch, vae.latent_channels, s, s];
      const count = shape.reduce((a, b) => a * b, 1);
      return { latentMean: fromFloat32('latent_mean', shape, randn(count)), latentStd: fromFloat32('latent_std', shape, new Float32Array(count).fill(0.1)), inputIds };
    }
    const px = c.batch * 3 * c.resolution * c.resolution;
    return { pixelValues: fromFloat32('pixel_values', [c.batch, 3, c.resolution, c.resolution], Float32Array.from({ length: px }, () => Math.random() * 2 - 1)), inputIds };
  });
  const step = async (i: number): Promise<void> => {
    await n.trainerMicroStep(trainer, batches[i % 2], 1);
    await n.trainerOptimizerStep(trainer, 1e-4); // returns the grad norm: the device has finished the step
  };
  for (let i = 0; i < (c.warmup ?? WARMUP); i++) await step(i);
  const t0 = performance.now();
  let steps = 0;
  while (steps < (c.minSteps ?? MIN_STEPS) || performance.now() - t0 < (c.minSeconds ?? MIN_SECONDS) * 1000) await step(steps++);
  const seconds = (performance.now() - t0) / 1000;
  return { stepsPerSec: steps / seconds, steps, peakRssMb: process.resourceUsage().maxRSS / 1024 };
}

// ------------------------------------------------------------------ the parent: one process per measurement

export interface BenchOptions {
  /** The python reference (undefined or with a `reason`: ours only). */
  python?: Python;
  threads: number;
  /** The CUDA device of the cuda rows (for nvidia-smi). */
  gpuIndex?: number;
  /** The device's peak in TFLOP/s for the rows' dtype (bf16 rows on a GPU: its dense bf16 peak); no MFU without it. */
  peakTflops?: number;
  /** Date.now() after which no measurement starts and running ones are stopped. */
  deadline?: number;
  log?: (line: string) => void;
}

const timeLeft = (o: BenchOptions): number | undefined => (o.deadline === undefined ? undefined : o.deadline - Date.now());

async function measureOurs(c: Case, modelDir: string, o: BenchOptions): Promise<Measurement> {
  const gpuIndex = c.device === 'cpu' ? undefined : o.gpuIndex;
  const r = await runChild(process.execPath, [__filename, '--child', JSON.stringify({ case: c, modelDir })], { gpuIndex, timeoutMs: timeLeft(o) });
  const j = lastJson(r.stdout);
  if (r.code !== 0 || !j || j.error) return { error: childError(r, j) };
  return { stepsPerSec: num(j.stepsPerSec), steps: num(j.steps), peakRssMb: num(j.peakRssMb), peakGpuMb: r.peakGpuMb };
}

async function measurePython(py: Python, c: Case, modelDir: string, o: BenchOptions, countFlops: boolean): Promise<Measurement & { flops?: number }> {
  const args = [PY_STEP_SCRIPT, '--model', modelDir, '--resolution', String(c.resolution), '--batch', String(c.batch)];
  if (c.checkpointing) args.push('--gradient-checkpointing');
  if (c.cachedLatents) args.push('--cached-latents');
  if (countFlops) args.push('--count-flops');
  args.push('--device', c.device, '--dtype', c.dtype, '--steps', String(c.minSteps ?? MIN_STEPS), '--warmup', String(c.warmup ?? WARMUP));
  args.push('--min-seconds', String(c.minSeconds ?? MIN_SECONDS), '--threads', String(o.threads));
  const gpuIndex = c.device === 'cpu' ? undefined : o.gpuIndex;
  const r = await runChild(py.cmd, args, { env: py.env, gpuIndex, timeoutMs: timeLeft(o) });
  const j = lastJson(r.stdout);
  if (r.code !== 0 || !j || j.error) return { error: childError(r, j) };
  return {
    stepsPerSec: num(j.steps_per_sec),
    steps: num(j.steps),
    peakRssMb: num(j.peak_rss_mb),
    peakGpuMb: r.peakGpuMb,
    peakCudaAllocatedMb: num(j.peak_cuda_mb),
    flops: num(j.flops_per_step),
  };
}

const made = new Map<ModelPreset, string>();

/** The random-weight model folder of a preset (tiny: remade once per process; sd15, ~4 GB: kept between runs). */
export async function modelFor(preset: ModelPreset, log: (line: string) => void = (l) => process.stdout.write(`${l}\n`)): Promise<string> {
  const dir = path.join(CACHE, preset);
  if (made.has(preset)) return dir;
  made.set(preset, dir);
  // makeTinyModel renames a finished folder into place, so an existing one is complete.
  if (preset === 'sd15' && fs.existsSync(path.join(dir, 'model_index.json'))) return dir;
  fs.mkdirSync(CACHE, { recursive: true });
  log(`making the ${preset} model in ${dir} ...`);
  await makeTinyModel(dir, preset, 0);
  return dir;
}

/** The same FLOPs for the same shapes, whatever the dtype or checkpointing. */
const flopsKey = (c: Case): string => `${c.preset}|${c.resolution}|${c.batch}|${c.cachedLatents}`;
const tag = (c: Case): string => `${c.preset} ${c.resolution}px b${c.batch} ${c.dtype}${c.checkpointing ? ' ckpt' : ''}${c.cachedLatents ? ' cached' : ''}`;

/** Measures every case, ours then python's, each in its own process; cases past the deadline get an error. */
export async function benchmark(cases: Case[], o: BenchOptions): Promise<Row[]> {
  const py = o.python && !o.python.reason ? o.python : undefined;
  const flops = new Map<string, number>();
  const rows: Row[] = [];
  for (const c of cases) {
    const left = timeLeft(o);
    if (left !== undefined && left <= 0) {
      rows.push({ ...c, ours: { error: 'skipped (time box)' }, ...(py ? { python: { error: 'skipped (time box)' } } : {}) });
      continue;
    }
    const modelDir = await modelFor(c.preset, o.log);
    const row: Row = { ...c, ours: await measureOurs(c, modelDir, o) };
    if (py) {
      // FLOPs are counted in a step without checkpointing, so that the counted step cannot raise a checkpointed row's peak memory.
      const { flops: f, ...m } = await measurePython(py, c, modelDir, o, !c.checkpointing && !flops.has(flopsKey(c)));
      row.python = m;
      if (f !== undefined) flops.set(flopsKey(c), f);
    }
    rows.push(row);
    o.log?.(`  ${tag(c)}: ours ${fmt(row.ours.stepsPerSec, 2)} step/s${py ? `, python ${fmt(row.python?.stepsPerSec, 2)} step/s` : ''}`);
  }
  for (const r of rows) {
    r.flopsPerStep = flops.get(flopsKey(r));
    for (const m of [r.ours, r.python]) {
      if (!m?.stepsPerSec) continue;
      m.samplesPerSec = m.stepsPerSec * r.batch;
      if (r.flopsPerStep && o.peakTflops) m.mfu = (r.flopsPerStep * m.stepsPerSec) / (o.peakTflops * 1e12);
    }
    if (r.ours.stepsPerSec && r.python?.stepsPerSec) r.ratio = r.ours.stepsPerSec / r.python.stepsPerSec;
  }
  return rows;
}

const pct = (v: number | undefined): string => (v === undefined ? '-' : `${(100 * v).toFixed(1)}%`);

/** The rows as a markdown table, then one line per error. */
export function benchTable(rows: Row[]): string {
  const python = rows.some((r) => r.python);
  const head = ['model', 'device', 'res', 'batch', 'dtype', 'ckpt', 'latents', 'ours step/s', 'ours samples/s', 'ours MFU', 'ours peak MB'];
  if (python) head.push('py step/s', 'py samples/s', 'py MFU', 'py peak MB', 'ours/py');
  const mem = (r: Row, m: Measurement): string => fmt(r.device === 'cpu' ? m.peakRssMb : m.peakGpuMb, 0);
  const side = (r: Row, m: Measurement | undefined): string[] =>
    m?.error ? ['error', '-', '-', '-'] : [fmt(m?.stepsPerSec, 2), fmt(m?.samplesPerSec, 2), pct(m?.mfu), m ? mem(r, m) : '-'];
  const body = rows.map((r) => {
    const cells = [r.preset, r.device, String(r.resolution), String(r.batch), r.dtype, r.checkpointing ? 'yes' : 'no', r.cachedLatents ? 'cached' : 'VAE', ...side(r, r.ours)];
    if (python) cells.push(...side(r, r.python), r.ratio === undefined ? '-' : `${r.ratio.toFixed(2)}x`);
    return cells;
  });
  const errors = rows.flatMap((r) =>
    [r.ours.error && `ours   ${tag(r)}: ${r.ours.error}`, r.python?.error && `python ${tag(r)}: ${r.python.error}`].filter((e): e is string => typeof e === 'string'),
  );
  return [markdownTable(head, body, 2), ...errors].join('\n');
}

export const BENCH_NOTES = [
  'peak MB: GPU memory in use while the process ran (nvidia-smi every 250 ms, CUDA context and allocator cache included) on CUDA rows; peak host RSS on CPU rows; both include loading the model.',
  'MFU: FLOPs of one step as torch.utils.flop_counter counts them in the python step (text encoder forward, UNet forward + LoRA backward, VAE encode unless latents are cached; no checkpointing recompute) x steps/s / the peak TFLOP/s given.',
];

// ------------------------------------------------------------------ `npm run bench`

function cases(quick: boolean, cuda: string | undefined, cachedLatents: boolean): Case[] {
  const out: Case[] = [];
  const tiny = { preset: 'tiny', device: 'cpu', dtype: 'fp32', cachedLatents } as const;
  for (const resolution of quick ? [32] : [32, 64])
    for (const batch of [1, 4])
      for (const checkpointing of quick ? [false] : [false, true]) out.push({ ...tiny, resolution, batch, checkpointing });
  if (!quick && cuda)
    for (const dtype of ['fp32', 'bf16'] as const)
      for (const batch of [1, 8])
        for (const checkpointing of [false, true]) out.push({ preset: 'sd15', device: cuda, resolution: 512, batch, dtype, checkpointing, cachedLatents });
  return out;
}

/** `--memory`: SD 1.5's shapes at 512 px, batch 1, fp32 on the CPU, with and without checkpointing; 2 steps each. */
export function memoryCases(): Case[] {
  return [false, true].map((checkpointing) => ({ preset: 'sd15', device: 'cpu', resolution: 512, batch: 1, dtype: 'fp32', checkpointing, cachedLatents: false, warmup: 1, minSteps: 1, minSeconds: 0 }));
}

interface BenchArgs {
  e2e: boolean;
  memory: boolean;
  quick: boolean;
  python: boolean;
  cachedLatents: boolean;
  peakTflops?: number;
  out: string;
}

function parseArgs(argv: string[]): BenchArgs {
  const a: BenchArgs = { e2e: false, memory: false, quick: false, python: true, cachedLatents: false, out: 'bench-results.json' };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--quick') a.quick = true;
    else if (argv[i] === '--e2e') a.e2e = true;
    else if (argv[i] === '--memory') a.memory = true;
    else if (argv[i] === '--no-python') a.python = false;
    else if (argv[i] === '--cached-latents') a.cachedLatents = true;
    else if (argv[i] === '--peak-tflops' && Number(argv[i + 1]) > 0) a.peakTflops = Number(argv[++i]);
    else if (argv[i] === '--out' && argv[i + 1]) a.out = argv[++i];
    else throw new Error(`unknown option ${argv[i]} (use --e2e, --memory, --decode, --quick, --no-python, --cached-latents, --peak-tflops N, --out FILE)`);
  }
  return a;
}

async function main(): Promise<void> {
  const argv = process.argv.slice(2);
  if (argv[0] === '--decode') return decodeMain(argv.slice(1));
  const args = parseArgs(argv);
  stopChildrenOnSignal();
  if (args.e2e) return e2eMain(args.quick, args.out === 'bench-results.json' ? 'bench-e2e-results.json' : args.out);
  const started = Date.now();
  const devices = await native().devices();
  const threads = devices.find((d) => d.type === 'cpu')?.threads ?? os.cpus().length;
  const cudaInfo = devices.find((d) => d.type === 'cuda' && d.available);
  const cuda = cudaInfo ? `cuda:${cudaInfo.index}` : undefined;
  const v = native().version();
  console.log(`train-lora bench: libtorch ${v.torch}, ${threads} CPU threads (${os.cpus()[0]?.model ?? 'unknown CPU'})`);
  if (!cuda) console.log(`CUDA: skipped (no CUDA device: ${devices.find((d) => d.type === 'cuda')?.reason ?? 'none found'})`);
  else console.log(`CUDA: ${cudaInfo?.name ?? cuda}`);

  const py = args.python ? await findPython(PY_STEP_SCRIPT, threads) : undefined;
  if (!args.python) console.log('Python reference: skipped (--no-python)');
  else if (py?.reason) console.log(`Python reference: not available (${py.reason})`);
  else console.log(`Python reference: ${py?.versions} (${threads} threads)`);

  if (!args.memory) console.log(`each row: ${WARMUP} warm-up steps, then at least ${MIN_STEPS} steps and ${MIN_SECONDS} s; one process per measurement\n`);
  const log = (l: string): void => void process.stderr.write(`${l}\n`);
  if (args.memory) console.log('--memory: SD 1.5-shaped random model, 512 px, batch 1, fp32, CPU; 1 warm-up + 1 timed step; peak RSS includes loading the model\n');
  const rows = await benchmark(args.memory ? memoryCases() : cases(args.quick, cuda, args.cachedLatents), { python: py, threads, gpuIndex: cudaInfo?.index, peakTflops: args.peakTflops, log });

  const seconds = (Date.now() - started) / 1000;
  console.log(benchTable(rows));
  console.log(`\n${BENCH_NOTES.join('\n')}`);
  console.log(`total ${seconds.toFixed(0)} s`);
  const result = {
    date: new Date().toISOString(),
    host: { cpu: os.cpus()[0]?.model, threads, libtorch: v.torch, node: process.version, cuda: cudaInfo?.name ?? null },
    python: args.python ? (py?.reason ? { available: false, reason: py.reason } : { available: true, versions: py?.versions }) : { available: false, reason: '--no-python' },
    protocol: BENCH_PROTOCOL,
    peakTflops: args.peakTflops ?? null,
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
