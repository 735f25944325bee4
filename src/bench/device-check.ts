/**
 * The device check (scripts/device-check.sh builds the addon, then runs this): in one run, each part timed and
 * time-boxed,
 *   1. parity: `train-lora forward` against diffusers/transformers/peft (scripts/bench/reference_forward.py) on the
 *      same weights and inputs, on the same device: fp32 (TF32 off) must be within 1e-4 relative error of the fp64
 *      reference for every output and LoRA gradient; bf16 is reported next to diffusers' own bf16 error;
 *   2. the LoRA training benchmark (src/bench/run.ts) with cached latents, next to diffusers + peft, with MFU;
 *   3. kill -9 during a short training run, resume, and compare the final LoRA with uninterrupted runs;
 *   4. 2-process data parallel (NCCL on 2+ GPUs; gloo workers on the CPU) against 1 process with twice the batch.
 * Writes the results as JSON (--out) and markdown tables to stdout (progress goes to stderr); exits 1 when a part
 * fails (a parity error over the tolerance, a resume that does not complete, a part that errors).
 *
 *   node dist/bench/device-check.js [--device auto|cuda|cuda:N|cpu] [--quick] [--out FILE] [--work DIR]
 *                                   [--only parity,bench,crash,dp] [--no-python] [--peak-tflops N] [--time-scale F]
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { CheckpointManager } from '../checkpoint/manager';
import { makeDemoData } from '../data/demo-data';
import { type ModelPreset } from '../model-folders/model-folder';
import { native, type HostTensor } from '../native';
import { numel, relativeErrorOf, toNumbers } from '../tensors';
import { childError, findPython, fmt, lastJson, markdownTable, runChild, stopChildrenOnSignal, type ChildOptions, type ChildResult, type Python } from './proc';
import { BENCH_NOTES, BENCH_PROTOCOL, benchmark, benchTable, modelFor, PY_STEP_SCRIPT, type Case, type Row } from './run';

const ROOT = path.resolve(__dirname, '..', '..');
const CLI = path.join(ROOT, 'dist', 'cli.js');
const FIXTURES = path.join(ROOT, 'test', 'fixtures');
const PY_REFERENCE = path.join(ROOT, 'scripts', 'bench', 'reference_forward.py');
const TOLERANCE = 1e-4;

type Status = 'pass' | 'warn' | 'fail' | 'error' | 'skipped';
const PARTS = ['parity', 'bench', 'crash', 'dp'] as const;
type PartName = (typeof PARTS)[number];
const TITLES: Record<PartName, string> = {
  parity: 'Parity with diffusers / transformers / peft',
  bench: 'LoRA training benchmark',
  crash: 'kill -9 and resume',
  dp: '2-process data parallel',
};

interface PartResult {
  status: Status;
  /** One line for the summary table. */
  summary: string;
  /** Markdown printed under the part's heading. */
  markdown: string;
  details: unknown;
  seconds?: number;
  budgetSeconds?: number;
}

/** What a run does: sizes and time boxes (seconds) of each part. */
interface Plan {
  /** The generated model of the parity part (besides the tiny and alt fixtures) and its input sizes. */
  parityPreset: ModelPreset;
  parityLatent: number;
  parityImage: number;
  benchCases: Case[];
  crash: { steps: number; killAfter: number; resolution: number };
  dp: { steps: number };
  budget: Record<PartName, number>;
}

function makePlan(device: string, quick: boolean): Plan {
  const bench = (preset: ModelPreset, resolution: number, batches: number[]): Case[] =>
    batches.flatMap((batch) => [false, true].map((checkpointing) => ({ preset, device, resolution, batch, dtype: 'bf16' as const, checkpointing, cachedLatents: true })));
  if (quick)
    return {
      parityPreset: 'tiny',
      parityLatent: 8,
      parityImage: 32,
      benchCases: bench('tiny', 32, [1, 2]),
      crash: { steps: 8, killAfter: 4, resolution: 32 },
      dp: { steps: 4 },
      budget: { parity: 150, bench: 240, crash: 150, dp: 120 },
    };
  return {
    parityPreset: 'sd15',
    parityLatent: 32, // 256 px: the real channel widths and attention shapes, at a quarter of the pixels
    parityImage: 128,
    benchCases: bench('sd15', 512, [1, 8]),
    crash: { steps: 12, killAfter: 6, resolution: 64 },
    dp: { steps: 10 },
    budget: { parity: 150, bench: 210, crash: 60, dp: 60 },
  };
}

interface Context {
  device: string;
  plan: Plan;
  work: string;
  python?: Python;
  /** libtorch's CPU threads (the python side gets as many). */
  threads: number;
  gpu?: { name: string; count: number; index: number };
  /** Peak TFLOP/s for MFU: --peak-tflops, else the GPU's dense bf16 peak from the table. */
  peak: { tflops?: number; source: string };
  deadline: number;
}

const log = (line: string): void => void process.stderr.write(`${line}\n`);
const left = (ctx: Context): number => ctx.deadline - Date.now();

function cli(args: string[], ctx: Context, extra: ChildOptions = {}): Promise<ChildResult> {
  return runChild(process.execPath, [CLI, ...args], { timeoutMs: left(ctx), ...extra });
}

function mustSucceed(what: string, r: ChildResult): void {
  if (r.code !== 0) throw new Error(`${what}: ${childError(r, lastJson(r.stdout))}${r.timedOut ? '' : `\n${(r.stderr || r.stdout).trim().split('\n').slice(-6).join('\n')}`}`);
}

async function readTensors(file: string): Promise<Map<string, HostTensor>> {
  return new Map((await native().safetensorsRead(file)).tensors.map((t) => [t.name, t]));
}

/** ‖a − b‖ / ‖b‖ of two tensors with the same number of elements (a scalar loss may be [] or [1]). */
function relErr(a: HostTensor, b: HostTensor): number {
  if (numel(a.shape) !== numel(b.shape)) throw new Error(`${a.name}: shape [${a.shape}] vs [${b.shape}]`);
  return relativeErrorOf(toNumbers(a), toNumbers(b));
}

const sci = (v: number | undefined): string => (v === undefined ? '-' : v === 0 ? '0' : v.toExponential(2));

// ------------------------------------------------------------------ 1. parity

interface ParityModel {
  name: string;
  dir: string;
  inputs: string;
  lora: string;
  /** The fixtures' stored fp64 reference outputs: used when this run made no python reference. */
  golden?: string;
}

type Variant = 'base' | 'lora';
type Precision = 'fp64' | 'fp32' | 'bf16';
interface ParityRow {
  model: string;
  output: string;
  /** Gradients: how many tensors; the errors are the worst of them. */
  tensors: number;
  errors: Partial<Record<`${'ours' | 'diffusers'}_${Precision}`, number>>;
  pass?: boolean;
}

/** The golden file's names as `forward` writes them: *_lora outputs, and lora.down/up for lora_A/B gradients. */
function goldenAs(variant: Variant, golden: Map<string, HostTensor>, names: string[]): Map<string, HostTensor> {
  const out = new Map<string, HostTensor>();
  for (const n of names) {
    const g = variant === 'base' ? n : n.startsWith('grad.') ? n.replace(/\.lora_A\.weight$/, '.lora.down.weight').replace(/\.lora_B\.weight$/, '.lora.up.weight') : `${n}_lora`;
    const t = golden.get(g);
    if (t) out.set(n, t);
  }
  return out;
}

/** Which outputs a variant compares: the LoRA run's text encoder and VAE are the base run's again. */
const compared = (variant: Variant, name: string): boolean => variant === 'base' || name === 'noise_pred' || name === 'loss' || name.startsWith('grad.');

async function parity(ctx: Context): Promise<PartResult> {
  const dir = path.join(ctx.work, 'parity');
  fs.mkdirSync(dir, { recursive: true });
  const models: ParityModel[] = ['tiny', 'alt'].map((name) => ({
    name,
    dir: path.join(FIXTURES, 'models', name),
    inputs: path.join(FIXTURES, 'golden', name, 'inputs.safetensors'),
    lora: path.join(FIXTURES, 'golden', name, 'lora_peft.safetensors'),
    golden: path.join(FIXTURES, 'golden', name, 'outputs.safetensors'),
  }));
  const notes: string[] = [];
  const py = ctx.python && !ctx.python.reason ? ctx.python : undefined;
  if (py) {
    const genDir = await modelFor(ctx.plan.parityPreset, log);
    const out = path.join(dir, `${ctx.plan.parityPreset}-random-inputs`);
    const args = ['make-inputs', '--model', genDir, '--out', out, '--latent-size', String(ctx.plan.parityLatent), '--image-size', String(ctx.plan.parityImage)];
    const r = await runChild(py.cmd, [PY_REFERENCE, ...args], { env: py.env, timeoutMs: left(ctx) });
    if (r.code === 0) models.push({ name: `${ctx.plan.parityPreset}-random`, dir: genDir, inputs: path.join(out, 'inputs.safetensors'), lora: path.join(out, 'lora_peft.safetensors') });
    else notes.push(`${ctx.plan.parityPreset}: no inputs (${childError(r, lastJson(r.stdout))})`);
  } else notes.push(`python reference unavailable (${ctx.python?.reason ?? '--no-python'}): no diffusers columns, no ${ctx.plan.parityPreset} model`);

  const file = (m: ParityModel, side: string, p: Precision, v: Variant): string => path.join(dir, `${m.name}.${side}.${p}.${v}.safetensors`);
  // Our side: the forward command, per model, precision and variant; at the time box, what has run is compared.
  ours: for (const m of models)
    for (const dtype of ['fp32', 'bf16'] as const)
      for (const v of ['base', 'lora'] as const) {
        log(`  parity: train-lora forward ${m.name} ${dtype} ${v}`);
        const args = ['forward', '--model', m.dir, '--inputs', m.inputs, '--output', file(m, 'ours', dtype, v), '--device', ctx.device, '--dtype', dtype];
        const r = await cli(v === 'lora' ? [...args, '--lora', m.lora, '--backward'] : args, ctx);
        if (r.timedOut || left(ctx) <= 0) {
          notes.push(`time box reached at forward ${m.name} ${dtype} ${v}: what follows it was not run`);
          break ours;
        }
        mustSucceed(`forward ${m.name} ${dtype} ${v}`, r);
      }

  // The reference side: one python process for every model, precision and variant (after ours: should the time box
  // stop it, the fixtures still have their goldens).
  if (py) {
    const jobs = models.flatMap((m) =>
      (['fp64', 'fp32', 'bf16'] as const).flatMap((dtype) =>
        (['base', 'lora'] as const).map((v) => ({ model: m.dir, inputs: m.inputs, ...(v === 'lora' ? { lora: m.lora } : {}), device: ctx.device, dtype, out: file(m, 'diffusers', dtype, v) })),
      ),
    );
    const jobsFile = path.join(dir, 'jobs.json');
    fs.writeFileSync(jobsFile, JSON.stringify(jobs, null, 1));
    log(`  parity: diffusers reference, ${jobs.length} jobs on ${ctx.device}`);
    const r = await runChild(py.cmd, [PY_REFERENCE, 'run', '--jobs', jobsFile], { env: py.env, timeoutMs: left(ctx) });
    if (r.code !== 0) notes.push(`python reference failed: ${childError(r, lastJson(r.stdout))}`);
  }
  const rows: ParityRow[] = [];
  const loraEffect: Record<string, number> = {};
  const referenceOf: Record<string, string> = {};
  const pyRef = py ? `diffusers ${py.versions?.split('diffusers ')[1]?.split(',')[0] ?? ''} / transformers / peft in fp64 on ${ctx.device}` : '';
  for (const m of models) {
    const load = async (side: string, p: Precision, v: Variant): Promise<Map<string, HostTensor> | undefined> =>
      fs.existsSync(file(m, side, p, v)) ? readTensors(file(m, side, p, v)) : undefined;
    const golden = m.golden ? await readTensors(m.golden) : undefined;
    // The python reference made in this run, else (fixtures) the stored fp64 golden outputs.
    const reference = async (v: Variant, names: string[]): Promise<Map<string, HostTensor> | undefined> => {
      const made = await load('diffusers', 'fp64', v);
      referenceOf[m.name] = made ? pyRef : golden ? 'the stored fp64 golden outputs (made on the CPU)' : 'none';
      return made ?? (golden ? goldenAs(v, golden, names) : undefined);
    };
    const noisePred: Partial<Record<Variant, HostTensor>> = {};
    for (const v of ['base', 'lora'] as const) {
      const ours32 = await load('ours', 'fp32', v);
      if (!ours32) continue; // not run (time box)
      const names = [...ours32.keys()].filter((n) => compared(v, n) && n !== 'input_ids');
      const ref = await reference(v, names);
      if (!ref) {
        notes.push(`${m.name} ${v}: no reference`);
        continue;
      }
      noisePred[v] = ref.get('noise_pred');
      const sides = { ours_fp32: ours32, ours_bf16: await load('ours', 'bf16', v), diffusers_fp32: await load('diffusers', 'fp32', v), diffusers_bf16: await load('diffusers', 'bf16', v) };
      type Side = keyof typeof sides;
      const err = (side: Side, n: string): number | undefined => {
        const t = sides[side]?.get(n);
        const r = ref.get(n);
        return t && r ? relErr(t, r) : undefined;
      };
      /** Per side, the worst error over `group` (undefined when any tensor is missing). */
      const worst = (group: string[]): ParityRow['errors'] =>
        Object.fromEntries(
          (Object.keys(sides) as Side[]).map((side) => {
            const all = group.map((n) => err(side, n));
            return [side, all.some((x) => x === undefined) ? undefined : Math.max(...(all as number[]))];
          }),
        );
      for (const n of names.filter((x) => !x.startsWith('grad.'))) rows.push({ model: m.name, output: v === 'lora' ? `${n} (LoRA)` : n, tensors: 1, errors: worst([n]) });
      const grads = names.filter((n) => n.startsWith('grad.'));
      if (grads.length) rows.push({ model: m.name, output: `LoRA gradients (${grads.length}, worst)`, tensors: grads.length, errors: worst(grads) });
    }
    // The LoRA must change the output, or its comparison says little.
    if (noisePred.base && noisePred.lora) loraEffect[m.name] = relErr(noisePred.lora, noisePred.base);
  }
  for (const r of rows) r.pass = r.errors.ours_fp32 !== undefined && r.errors.ours_fp32 < TOLERANCE;
  for (const [m, e] of Object.entries(loraEffect)) if (!(e > 1e-3)) notes.push(`${m}: the LoRA changes noise_pred by only ${sci(e)}: its comparison proves little`);
  const failed = rows.filter((r) => !r.pass);
  const status: Status = failed.length || !rows.length ? 'fail' : notes.length ? 'warn' : 'pass';
  const worstFp32 = Math.max(...rows.map((r) => r.errors.ours_fp32 ?? Infinity));
  const worstBf16 = Math.max(...rows.map((r) => r.errors.ours_bf16 ?? 0));
  const head = ['model', 'output', 'ours fp32', 'diffusers fp32', `fp32 < ${TOLERANCE}`, 'ours bf16', 'diffusers bf16'];
  const body = rows.map((r) => [r.model, r.output, sci(r.errors.ours_fp32), sci(r.errors.diffusers_fp32), r.pass ? 'pass' : 'FAIL', sci(r.errors.ours_bf16), sci(r.errors.diffusers_bf16)]);
  const sources = [...new Set(Object.values(referenceOf))];
  const refText = sources.length === 1 ? sources[0] : Object.entries(referenceOf).map(([m, r]) => `${m}: ${r}`).join('; ');
  const markdown = [
    `Relative error ‖x − ref‖ / ‖ref‖ of each output, ref: ${refText}; same weights and inputs. fp32 runs with TF32 off; bf16 casts weights and inputs (no threshold).`,
    '',
    markdownTable(head, body, 2),
    ...notes.map((n) => `\nnote: ${n}`),
  ].join('\n');
  return {
    status,
    summary: `${rows.length} comparisons, worst fp32 ${sci(worstFp32)} (${failed.length ? `${failed.length} over ${TOLERANCE}` : `all < ${TOLERANCE}`}), worst bf16 ${sci(worstBf16)}${notes.length ? `; ${notes.length} note(s)` : ''}`,
    markdown,
    details: { tolerance: TOLERANCE, reference: referenceOf, models: models.map((m) => ({ name: m.name, dir: m.dir, inputs: m.inputs, lora: m.lora })), loraEffect, rows, notes },
  };
}

// ------------------------------------------------------------------ 2. benchmark

/** Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets; the first match wins. */
const BF16_PEAK_TFLOPS: Array<[RegExp, number]> = [
  [/B200/i, 2250],
  [/H200 NVL/i, 835],
  [/GH200|H200/i, 989],
  [/H100 PCIe/i, 756],
  [/H100 NVL/i, 835],
  [/H100|H800/i, 989], // SXM
  [/A100|A800/i, 312],
  [/L40S/i, 362],
  [/\bL4\b/i, 121],
  [/RTX 4090/i, 165],
];

export function bf16PeakTflops(gpuName: string): number | undefined {
  return BF16_PEAK_TFLOPS.find(([re]) => re.test(gpuName))?.[1];
}

async function bench(ctx: Context): Promise<PartResult> {
  const rows: Row[] = await benchmark(ctx.plan.benchCases, {
    python: ctx.python,
    threads: ctx.threads,
    gpuIndex: ctx.gpu?.index,
    peakTflops: ctx.peak.tflops,
    deadline: ctx.deadline,
    log,
  });
  const measured = rows.filter((r) => r.ours.stepsPerSec !== undefined);
  const errors = rows.filter((r) => r.ours.error || r.python?.error);
  const peak = ctx.peak.tflops ? `${ctx.peak.tflops} TFLOP/s (${ctx.peak.source})` : `none (${ctx.peak.source}; give --peak-tflops)`;
  const markdown = [
    `Steady-state LoRA steps (rank ${BENCH_PROTOCOL.rank}, targets ${BENCH_PROTOCOL.targets.join(' ')}, AdamW, accumulation 1), ${BENCH_PROTOCOL.warmup} warm-up steps then at least ${BENCH_PROTOCOL.minSteps} steps and ${BENCH_PROTOCOL.minSeconds} s, one process per measurement. Peak for MFU: ${peak}.`,
    '',
    benchTable(rows),
    '',
    ...BENCH_NOTES,
  ].join('\n');
  const ratios = measured.map((r) => r.ratio).filter((x): x is number => x !== undefined);
  return {
    status: measured.length === 0 ? 'error' : errors.length ? 'warn' : 'pass',
    summary: `${measured.length}/${rows.length} rows${ratios.length ? `, ours/diffusers ${Math.min(...ratios).toFixed(2)}x-${Math.max(...ratios).toFixed(2)}x steps/s` : ''}${errors.length ? `, ${errors.length} with errors` : ''}`,
    markdown,
    details: { protocol: BENCH_PROTOCOL, peakTflops: ctx.peak.tflops ?? null, peakSource: ctx.peak.source, rows },
  };
}

// ------------------------------------------------------------------ 3 and 4: training runs through the CLI

function trainArgs(ctx: Context, data: string, out: string, o: { steps: number; batch: number; device?: string; extra?: string[] }): string[] {
  return [
    '--pretrained-model-name-or-path', path.join(FIXTURES, 'models', 'tiny'),
    '--train-data-dir', data,
    '--output-dir', out,
    '--device', o.device ?? ctx.device,
    '--resolution', String(ctx.plan.crash.resolution),
    '--train-batch-size', String(o.batch),
    '--gradient-accumulation-steps', '2',
    '--max-train-steps', String(o.steps),
    '--learning-rate', '1e-3',
    '--lr-warmup-steps', '2',
    '--checkpointing-steps', '2',
    '--checkpoints-total-limit', '3',
    '--rank', '4',
    '--random-flip',
    '--seed', '11',
    ...(o.extra ?? []),
  ];
}

async function dataset(ctx: Context): Promise<string> {
  const data = path.join(ctx.work, 'data');
  if (!fs.existsSync(data)) await makeDemoData(data, { count: 12, size: ctx.plan.crash.resolution + 8, seed: 3 });
  return data;
}

/** Per-tensor relative error of two LoRA files, the worst one; 0 when the files are byte-identical. */
async function loraDiff(a: string, b: string): Promise<{ identical: boolean; maxRelErr: number }> {
  if (fs.readFileSync(a).equals(fs.readFileSync(b))) return { identical: true, maxRelErr: 0 };
  const [x, y] = [await readTensors(a), await readTensors(b)];
  if ([...x.keys()].sort().join() !== [...y.keys()].sort().join()) throw new Error(`${a} and ${b} hold different tensors`);
  return { identical: false, maxRelErr: Math.max(...[...x].map(([k, t]) => relErr(t, y.get(k)!))) };
}

const LORA_FILE = 'pytorch_lora_weights.safetensors';

async function crash(ctx: Context): Promise<PartResult> {
  const { steps, killAfter } = ctx.plan.crash;
  const data = await dataset(ctx);
  const dir = path.join(ctx.work, 'crash');
  const run = async (name: string, extra: string[] = [], onStdout?: ChildOptions['onStdout']): Promise<ChildResult> => {
    log(`  crash: ${name}`);
    return cli(trainArgs(ctx, data, path.join(dir, name.split(' ')[0]), { steps, batch: 2, extra }), ctx, { onStdout });
  };
  for (const n of ['uninterrupted', 'again']) mustSucceed(`training run (${n})`, await run(n));
  // kill -9 once step `killAfter` is logged, plus a few ms so that it may land inside that step's checkpoint write.
  const stepLine = new RegExp(`"step":${killAfter},[^\\n]*"msg":"step"`);
  let sent = false;
  const killed = await run('killed', [], (soFar, child) => {
    if (!sent && stepLine.test(soFar)) {
      sent = true;
      setTimeout(() => child.kill('SIGKILL'), 10);
    }
  });
  const out = path.join(dir, 'killed');
  if (!sent) throw new Error(`the run to be killed ended (${childError(killed)}) before step ${killAfter} was logged`);
  if (killed.code === 0) throw new Error(`the run to be killed finished its ${steps} steps before the SIGKILL landed: nothing to resume`);
  const mgr = new CheckpointManager(out);
  const entries = await mgr.list('full');
  const invalid = entries.filter((e) => !e.valid).map((e) => `${e.name}: ${e.problem}`);
  const latest = await mgr.latest();
  const resumed = await run('killed (resume)', ['--resume-from-checkpoint', 'latest']);
  mustSucceed('the resumed run', resumed);
  const resumedAt = latest?.step ?? 0;
  const vsRef = await loraDiff(path.join(out, LORA_FILE), path.join(dir, 'uninterrupted', LORA_FILE));
  const floor = await loraDiff(path.join(dir, 'again', LORA_FILE), path.join(dir, 'uninterrupted', LORA_FILE));
  const status: Status = vsRef.identical ? 'pass' : 'warn';
  const describe = (d: { identical: boolean; maxRelErr: number }): string => (d.identical ? 'bit-identical' : `max relative difference ${sci(d.maxRelErr)}`);
  const head = ['run', 'final LoRA vs the uninterrupted run'];
  const body = [
    ['a second uninterrupted run (run-to-run noise)', describe(floor)],
    [`killed (SIGKILL after step ${killAfter}), resumed from checkpoint-${resumedAt}`, describe(vsRef)],
  ];
  const markdown = [
    `${steps} optimizer steps of the tiny fixture model at ${ctx.plan.crash.resolution} px on ${ctx.device} (batch 2 x accumulation 2, a checkpoint every 2 steps, mixed precision: the device's default).`,
    `Checkpoints left by the kill: ${entries.length} (${invalid.length ? `invalid, skipped by latest: ${invalid.join('; ')}` : 'all valid'}).`,
    '',
    markdownTable(head, body),
  ].join('\n');
  return {
    status,
    summary: `resumed from step ${resumedAt}: ${describe(vsRef)} (two uninterrupted runs: ${describe(floor)})`,
    markdown,
    details: { steps, killAfter, resumedFrom: resumedAt, checkpointsAfterKill: entries.map((e) => ({ name: e.name, valid: e.valid, problem: e.problem })), resumedVsUninterrupted: vsRef, runToRun: floor },
  };
}

function metrics(out: string): Array<{ step: number; loss: number; grad_norm: number }> {
  return fs
    .readFileSync(path.join(out, 'logs', 'metrics.jsonl'), 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((l) => JSON.parse(l) as { step: number; loss: number; grad_norm: number })
    .filter((m) => typeof m.loss === 'number');
}

async function dataParallel(ctx: Context): Promise<PartResult> {
  const cuda = ctx.device.startsWith('cuda');
  const skipped = (why: string): PartResult => ({ status: 'skipped', summary: `skipped: ${why}`, markdown: `skipped: ${why}`, details: { skipped: why } });
  if (cuda && (ctx.gpu?.count ?? 0) < 2) return skipped(`${ctx.gpu?.count ?? 0} GPU`);
  const backend = cuda ? 'nccl' : 'gloo';
  if (!native().distBackends().includes(backend)) return skipped(`this build has no ${backend} backend`);
  const data = await dataset(ctx);
  const dir = path.join(ctx.work, 'dp');
  const steps = ctx.plan.dp.steps;
  const device = cuda ? 'cuda' : ctx.device; // one GPU per local rank
  const run = async (name: string, procs: number, batch: number): Promise<string> => {
    const out = path.join(dir, name);
    log(`  dp: ${name}`);
    const extra = ['--num-processes', String(procs), '--dist-backend', backend, '--mixed-precision', 'no', '--dist-timeout', '120'];
    mustSucceed(`${name} run`, await cli(trainArgs(ctx, data, out, { steps, batch, device, extra }), ctx));
    return out;
  };
  const two = await run(`2-processes-${backend}`, 2, 2);
  const one = await run('1-process-batch-4', 1, 4);
  const [a, b] = [metrics(two), metrics(one)];
  if (a.length !== b.length || !a.length) throw new Error(`metrics of ${a.length} and ${b.length} steps`);
  const rel = (x: number, y: number): number => Math.abs(x - y) / Math.max(Math.abs(y), 1e-12);
  const lossDiff = Math.max(...a.map((m, i) => rel(m.loss, b[i].loss)));
  const normDiff = Math.max(...a.map((m, i) => rel(m.grad_norm, b[i].grad_norm)));
  const lora = await loraDiff(path.join(two, LORA_FILE), path.join(one, LORA_FILE));
  const ok = lossDiff < 1e-3 && normDiff < 1e-3 && lora.maxRelErr < 1e-3;
  const head = ['compared', '2 processes vs 1 process, batch 2 x 2 vs 4 (max relative difference)'];
  const body = [['loss per step', sci(lossDiff)], ['grad norm per step', sci(normDiff)], ['final LoRA (worst tensor)', lora.identical ? 'bit-identical' : sci(lora.maxRelErr)]];
  return {
    status: ok ? 'pass' : 'warn',
    summary: `${backend}, ${steps} steps: loss ${sci(lossDiff)}, grad norm ${sci(normDiff)}, LoRA ${sci(lora.maxRelErr)} max relative difference vs 1 process`,
    markdown: [`--num-processes 2 --dist-backend ${backend} (fp32) against one process with twice the per-device batch, ${steps} optimizer steps of the tiny fixture model; warn above 1e-3.`, '', markdownTable(head, body)].join('\n'),
    details: { backend, steps, lossMaxRelDiff: lossDiff, gradNormMaxRelDiff: normDiff, lora },
  };
}

// ------------------------------------------------------------------ main

interface Args {
  device: string;
  quick: boolean;
  out: string;
  work: string;
  only: PartName[];
  python: boolean;
  peakTflops?: number;
  /** Multiplies every part's time box. */
  timeScale: number;
}

function parseArgs(argv: string[]): Args {
  const a: Args = { device: 'auto', quick: false, out: 'device-check-results.json', work: path.join(os.tmpdir(), 'train-lora-device-check'), only: [...PARTS], python: true, timeScale: 1 };
  const value = (i: number): string => {
    if (argv[i + 1] === undefined) throw new Error(`${argv[i]} needs a value`);
    return argv[i + 1];
  };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i];
    if (k === '--quick') a.quick = true;
    else if (k === '--no-python') a.python = false;
    else if (k === '--device') a.device = value(i++);
    else if (k === '--out') a.out = value(i++);
    else if (k === '--work') a.work = value(i++);
    else if (k === '--peak-tflops') a.peakTflops = Number(value(i++));
    else if (k === '--time-scale') a.timeScale = Number(value(i++));
    else if (k === '--only') {
      const parts = value(i++).split(',');
      const bad = parts.filter((p) => !(PARTS as readonly string[]).includes(p));
      if (bad.length) throw new Error(`--only: unknown part(s) ${bad.join(', ')} (parts: ${PARTS.join(', ')})`);
      a.only = parts as PartName[];
    } else throw new Error(`unknown option ${k} (use --device, --quick, --out, --work, --only, --no-python, --peak-tflops, --time-scale)`);
  }
  if (!(a.timeScale > 0)) throw new Error('--time-scale must be a positive number');
  if (a.peakTflops !== undefined && !(a.peakTflops > 0)) throw new Error('--peak-tflops must be a positive number');
  return a;
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  stopChildrenOnSignal();
  if (!fs.existsSync(FIXTURES)) throw new Error(`${FIXTURES} is missing: the device check runs from a git checkout of train-lora (it uses the test fixtures)`);
  const started = Date.now();
  const devices = await native().devices();
  const cudaDevs = devices.filter((d) => d.type === 'cuda' && d.available);
  const device = args.device === 'auto' ? (cudaDevs.length ? 'cuda' : 'cpu') : args.device;
  const index = device.startsWith('cuda') ? Number(device.split(':')[1] ?? 0) : undefined;
  const gpuInfo = index === undefined ? undefined : cudaDevs.find((d) => d.index === index);
  if (index !== undefined && !gpuInfo) throw new Error(`--device ${device}: ${devices.find((d) => d.type === 'cuda')?.reason ?? 'no such CUDA device'}`);
  const threads = devices.find((d) => d.type === 'cpu')?.threads ?? os.cpus().length;
  const tablePeak = gpuInfo?.name ? bf16PeakTflops(gpuInfo.name) : undefined;
  const ctx: Context = {
    device,
    plan: makePlan(device, args.quick),
    work: args.work,
    threads,
    deadline: 0,
    gpu: gpuInfo && { name: gpuInfo.name ?? device, count: cudaDevs.length, index: gpuInfo.index },
    peak: args.peakTflops
      ? { tflops: args.peakTflops, source: '--peak-tflops' }
      : tablePeak
        ? { tflops: tablePeak, source: `dense bf16 peak of ${gpuInfo?.name}` }
        : { source: gpuInfo ? `${gpuInfo.name} is not in the table` : 'no GPU' },
  };
  fs.rmSync(ctx.work, { recursive: true, force: true });
  fs.mkdirSync(ctx.work, { recursive: true });
  const v = native().version();
  ctx.python = args.python ? await findPython(PY_STEP_SCRIPT, threads) : { cmd: '', env: {}, reason: '--no-python' };
  const what = gpuInfo ? `${gpuInfo.name} (${device}; ${cudaDevs.length} GPU${cudaDevs.length === 1 ? '' : 's'})` : `CPU (${threads} threads, ${os.cpus()[0]?.model ?? 'unknown'})`;
  const header = [
    `# train-lora device check${args.quick ? ' (--quick)' : ''}`,
    '',
    `- device: ${what}`,
    `- libtorch ${v.torch} (${v.cuda ? 'CUDA build' : 'CPU build'}), node ${process.version}`,
    `- python reference: ${ctx.python.reason ? `not available (${ctx.python.reason})` : ctx.python.versions}`,
    `- work folder: ${ctx.work}`,
  ].join('\n');
  console.log(header);

  // The random-weight models (sd15: ~4 GB, kept in the system temp folder between runs) are made before the time boxes.
  const setup: Record<string, number> = {};
  const presets = new Set([...(args.only.includes('parity') && ctx.python.reason === undefined ? [ctx.plan.parityPreset] : []), ...(args.only.includes('bench') ? ctx.plan.benchCases.map((c) => c.preset) : [])]);
  for (const preset of presets) {
    const t0 = Date.now();
    await modelFor(preset, log);
    setup[`${preset} model`] = (Date.now() - t0) / 1000;
  }

  const results: Partial<Record<PartName, PartResult>> = {};
  const runners: Record<PartName, () => Promise<PartResult>> = {
    parity: () => parity(ctx),
    bench: () => bench(ctx),
    crash: () => crash(ctx),
    dp: () => dataParallel(ctx),
  };
  for (const [i, part] of PARTS.entries()) {
    if (!args.only.includes(part)) {
      results[part] = { status: 'skipped', summary: 'skipped: not in --only', markdown: 'skipped (--only)', details: null };
      continue;
    }
    const budget = Math.round(ctx.plan.budget[part] * args.timeScale);
    ctx.deadline = Date.now() + budget * 1000;
    log(`[${part}] ${TITLES[part]} (time box ${budget} s)`);
    const t0 = Date.now();
    let r: PartResult;
    try {
      r = await runners[part]();
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e);
      const first = msg.split('\n')[0];
      r = { status: 'error', summary: first.length > 200 ? `${first.slice(0, 200)}...` : first, markdown: `error: ${msg}`, details: { error: msg } };
    }
    r.seconds = (Date.now() - t0) / 1000;
    r.budgetSeconds = budget;
    if (r.seconds > budget && r.status !== 'skipped') r.summary += ` (time box of ${budget} s reached)`;
    results[part] = r;
    console.log(`\n## ${i + 1}. ${TITLES[part]}: ${r.status} (${r.seconds.toFixed(0)} s)\n\n${r.markdown}`);
  }

  const seconds = (Date.now() - started) / 1000;
  const failed = PARTS.filter((p) => results[p]?.status === 'fail' || results[p]?.status === 'error');
  const summary = markdownTable(
    ['part', 'status', 'time', 'result'],
    PARTS.map((p) => [TITLES[p], results[p]!.status, results[p]!.seconds === undefined ? '-' : `${fmt(results[p]!.seconds, 0)} s / ${results[p]!.budgetSeconds} s`, results[p]!.summary]),
  );
  const setupText = Object.entries(setup).map(([k, s]) => `${k} ${s.toFixed(0)} s`).join(', ');
  console.log(`\n## Summary\n\n${summary}\n\n${failed.length ? `FAILED: ${failed.join(', ')}` : 'OK'} in ${seconds.toFixed(0)} s${setupText ? ` (setup: ${setupText})` : ''}`);
  const json = {
    date: new Date().toISOString(),
    ok: failed.length === 0,
    quick: args.quick,
    device,
    host: { cpu: os.cpus()[0]?.model, threads, node: process.version, libtorch: v.torch, libtorchCuda: v.cuda, gpu: ctx.gpu ?? null, peak: ctx.peak },
    python: ctx.python.reason ? { available: false, reason: ctx.python.reason } : { available: true, versions: ctx.python.versions },
    seconds,
    setupSeconds: setup,
    parts: results,
  };
  fs.writeFileSync(args.out, `${JSON.stringify(json, null, 2)}\n`);
  console.log(`wrote ${args.out}`);
  if (failed.length) process.exitCode = 1;
}

if (require.main === module)
  main().catch((e: unknown) => {
    console.error(e instanceof Error ? e.message : e);
    process.exitCode = 2;
  });
