/**
 * `train-lora test-setup` (`npm run test-setup`): checks a machine and a configuration before a long run. Each
 * check prints [OK] / [FAIL] with a reason and a fix; the exit code is non-zero when any check fails.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import type { Argv } from 'yargs';

import { CheckpointManager, verifyCheckpoint } from '../checkpoint/manager';
import { loadTrainingState, saveTrainingState, TRAINER_STATE_VERSION, type TrainingSnapshot } from '../checkpoint/state';
import { formatBytes } from '../checkpoint/fsutil';
import { datasetOptions, loraAlpha, textEncoderTargets, type TrainConfig } from '../config';
import { describeDataset, loadDataset, type Dataset } from '../data/dataset';
import { checkModel, modelSchedulerConfig, modelTokenizerDir } from '../model-folders/model-folder';
import { native, type DeviceInfo, type PipelineHandle, type Precision, type TrainerHandle } from '../native';
import { fromInt64 } from '../tensors';
import { CLIPTokenizer } from '../tokenizer';
import { NoiseSchedule } from '../schedules/noise';
import { ImageSource } from '../train/sources';
import { type DataPlan, loaderExtras, planData } from '../data/plan';
import { describeBuckets } from '../data/buckets';
import { planPrecision, resolveDevice } from '../device';
import { CliReporter } from '../train/reporter';
import { demoDefaults } from './demo';
import { commandWithTrainFlags, configFromArgv } from './train-options';

export interface CheckResult {
  name: string;
  ok: boolean | 'skip';
  detail: string;
  fix?: string;
}

// ------------------------------------------------------------------ memory estimate

/** Parameters of SD 1.5's UNet: the activation sizes below are measured on it and scaled by a model's UNet size. */
export const SD15_UNET_PARAMS = 859_520_964;

/**
 * Activation memory per sample of SD 1.5's UNet training step at 512 px in fp32 (forward kept for backward, the
 * backward's peak, the VAE encode and the text encoder), measured as peak RSS minus weights and runtime on the CPU
 * with `npm run bench -- --memory` (README "Performance"): without and with gradient checkpointing.
 */
export const ACTIVATION_BYTES_512 = { plain: 2.25 * 2 ** 30, checkpointed: 1.2 * 2 ** 30 };
/** libtorch, its allocator's slack, the CUDA context and kernels (CUDA/MPS), node (CPU). */
export const RUNTIME_BYTES = { cpu: 0.6 * 2 ** 30, cuda: 1.0 * 2 ** 30, mps: 1.0 * 2 ** 30 };

export interface MemoryEstimateInput {
  device: 'cpu' | 'cuda' | 'mps';
  /** Parameter counts of the loaded components (the frozen ones and the UNet). */
  totalParams: number;
  unetParams: number;
  /** Bytes per frozen weight (fp32 4, fp16/bf16 2). */
  weightBytes: number;
  /** LoRA parameters, or the UNet's in full mode: fp32 weight, gradient and two AdamW moments each. */
  trainableParams: number;
  /** Full mode keeps the UNet in fp32 master weights (counted in trainableParams, not again in the frozen ones). */
  trainMode: 'lora' | 'full';
  resolution: number;
  batch: number;
  gradientCheckpointing: boolean;
  mixedPrecision: 'no' | 'fp16' | 'bf16';
}

export interface MemoryEstimate {
  bytes: number;
  parts: { weights: number; trainable: number; activations: number; runtime: number };
}

/**
 * The peak memory of a training run, estimated: frozen weights + 16 bytes per trainable parameter (fp32 weight,
 * gradient, AdamW's two moments) + activations + the runtime. Activations scale from SD 1.5's measured 512 px value
 * by batch x (resolution / 512)^2 (latent pixels; attention uses memory-efficient SDPA, linear in tokens) x the UNet's
 * size relative to SD 1.5's, and by 0.6 under fp16/bf16 autocast (activations in half precision, fp32 master
 * copies and the loss kept). An estimate to within about 25 % for SD 1.x-shaped UNets, not a guarantee.
 */
export function estimateTrainingMemory(x: MemoryEstimateInput): MemoryEstimate {
  const frozen = x.trainMode === 'full' ? x.totalParams - x.unetParams : x.totalParams;
  const weights = frozen * x.weightBytes;
  const trainable = x.trainableParams * 16;
  const perSample = x.gradientCheckpointing ? ACTIVATION_BYTES_512.checkpointed : ACTIVATION_BYTES_512.plain;
  const activations = perSample * x.batch * (x.resolution / 512) ** 2 * (x.unetParams / SD15_UNET_PARAMS) * (x.mixedPrecision === 'no' ? 1 : 0.6);
  const runtime = RUNTIME_BYTES[x.device];
  return { bytes: weights + trainable + activations + runtime, parts: { weights, trainable, activations, runtime } };
}

/**
 * The memory check of test-setup: the estimate against the chosen device's memory (CUDA: the GPU's total; MPS and
 * the CPU: the host's total, MPS shares it). Fails when the run will not fit, says so when it is tight (over 85 %),
 * with what to change.
 */
export function memoryFitCheck(est: MemoryEstimate, device: string, capacityBytes: number | undefined, x: Pick<MemoryEstimateInput, 'batch' | 'resolution' | 'gradientCheckpointing' | 'mixedPrecision'>): CheckResult {
  const p = est.parts;
  const detail = `about ${formatBytes(est.bytes)} at batch ${x.batch}, ${x.resolution}px${x.gradientCheckpointing ? ', gradient checkpointing' : ''} (weights ${formatBytes(p.weights)}, trainable + AdamW ${formatBytes(p.trainable)}, activations ${formatBytes(p.activations)}, runtime ${formatBytes(p.runtime)})`;
  if (!capacityBytes) return { name: 'memory estimate', ok: true, detail: `${detail}; ${device} does not report its memory` };
  const fixes = [x.batch > 1 && 'lower --train-batch-size (raise --gradient-accumulation-steps for the same effective batch)', !x.gradientCheckpointing && 'add --gradient-checkpointing', x.mixedPrecision === 'no' && device !== 'cpu' && 'use --mixed-precision bf16 (or fp16)', 'or lower --resolution'].filter(Boolean).join(', ');
  const share = est.bytes / capacityBytes;
  if (share > 1) return { name: 'memory estimate', ok: false, detail: `${detail}: will not fit in ${device}'s ${formatBytes(capacityBytes)}`, fix: fixes };
  return { name: 'memory estimate', ok: true, detail: `${detail}: ${(100 * share).toFixed(0)} % of ${device}'s ${formatBytes(capacityBytes)}${share > 0.85 ? ' (tight: ' + fixes + ')' : ''}` };
}

/** Parameter counts of a model's components from its safetensors headers (nothing is loaded), or undefined. */
async function modelParamCounts(model: string, variant: string | undefined): Promise<{ total: number; unet: number } | undefined> {
  const count = async (file: string, prefix?: string): Promise<number> =>
    (await native().safetensorsHeader(file)).tensors.filter((t) => !prefix || t.name.startsWith(prefix)).reduce((n, t) => n + t.shape.reduce((a, b) => a * b, 1), 0);
  if (fs.statSync(model).isFile()) {
    const unet = await count(model, 'model.diffusion_model.');
    return { total: unet + (await count(model, 'first_stage_model.')) + (await count(model, 'cond_stage_model.')), unet };
  }
  const files = (comp: string): string[] => {
    const dir = path.join(model, comp);
    const all = fs.existsSync(dir) ? fs.readdirSync(dir).filter((f) => f.endsWith('.safetensors')) : [];
    const mine = all.filter((f) => (variant ? f.includes(`.${variant}.`) : !/\.[a-z0-9]+\.safetensors$/.test(f.replace(/^[^.]*/, ''))));
    return mine.map((f) => path.join(dir, f));
  };
  const sum = async (comp: string): Promise<number> => {
    let n = 0;
    for (const f of files(comp)) n += await count(f);
    return n;
  };
  const unet = await sum('unet');
  if (!unet) return undefined;
  return { total: unet + (await sum('vae')) + (await sum('text_encoder')), unet };
}

/** The memory estimate of `cfg` on `device` (before anything is loaded), as a check. */
export async function memoryEstimateCheck(cfg: TrainConfig, device: string, devices: DeviceInfo[], mixed: 'no' | 'fp16' | 'bf16', weightDtype: string): Promise<CheckResult> {
  const counts = await modelParamCounts(path.resolve(cfg.pretrained_model_name_or_path), cfg.variant).catch(() => undefined);
  if (!counts) return { name: 'memory estimate', ok: 'skip', detail: 'no safetensors weights to count (skipped)' };
  const type = device.split(':')[0] as 'cpu' | 'cuda' | 'mps';
  const idx = Number(device.split(':')[1] ?? 0);
  // LoRA: rank x (in + out) per targeted Linear is not known before the model is built: 0.1 % of the UNet is a
  // generous bound for rank <= 64 on SD 1.5's attention projections; full: the whole UNet.
  const trainableParams = cfg.train_mode === 'full' ? counts.unet : Math.ceil(counts.unet * 0.001 * Math.max(1, cfg.rank / 64));
  const x: MemoryEstimateInput = {
    device: type, totalParams: counts.total, unetParams: counts.unet, weightBytes: weightDtype === 'fp32' ? 4 : 2, trainableParams, trainMode: cfg.train_mode,
    resolution: cfg.resolution, batch: cfg.train_batch_size, gradientCheckpointing: cfg.gradient_checkpointing, mixedPrecision: mixed,
  };
  const capacity = type === 'cuda' ? devices.find((d) => d.type === 'cuda' && d.index === idx)?.totalMemory : os.totalmem();
  return memoryFitCheck(estimateTrainingMemory(x), device, capacity, x);
}

function rssBytes(): number {
  return process.memoryUsage().rss;
}

export async function testSetup(cfg: TrainConfig, print: (line: string) => void = (l) => console.log(l)): Promise<CheckResult[]> {
  const results: CheckResult[] = [];
  const report = (r: CheckResult) => {
    results.push(r);
    const tag = r.ok === 'skip' ? '[SKIP]' : r.ok ? '[OK]  ' : '[FAIL]';
    print(`${tag} ${r.name}: ${r.detail}${r.fix && r.ok !== true ? `\n       fix: ${r.fix}` : ''}`);
  };
  const skipped = (name: string) => report({ name, ok: 'skip', detail: 'skipped (an earlier check failed)' });

  const data = await checkData(cfg, report);
  if (data) report(await checkDataloader(cfg, data));
  else skipped('dataloader yields batches');

  const devices = await native().devices();
  let device: string;
  try {
    device = await resolveDevice(cfg.device, devices);
    report({ name: 'device', ok: true, detail: device });
  } catch (e) {
    report({ name: 'device', ok: false, detail: (e as Error).message });
    return results;
  }
  const precision = planPrecision(cfg.mixed_precision, device, devices, cfg.train_mode);
  report({ name: 'precision', ok: true, detail: precision.description + (precision.warnings.length ? `; warning: ${precision.warnings.join('; ')}` : '') });
  report(await memoryEstimateCheck(cfg, device, devices, precision.mixed, precision.weightDtype));

  const rss0 = rssBytes();
  const run: SetupRun = { cfg, device, mixed: precision.mixed, modelDir: path.resolve(cfg.pretrained_model_name_or_path) };
  try {
    run.pipe = await loadModels(run, precision.weightDtype, report);
    if (run.pipe) run.trainer = await configureTrainer(run, run.pipe, report);
    else skipped('LoRA configured');
    if (run.trainer && data) report(await trainSteps(run, run.trainer, data));
    else skipped('5 training steps');
    if (run.trainer) report(await checkpointRoundTrip(run, run.trainer, data?.dataset));
    else skipped('checkpoint round trip');
    report(memoryReport(cfg, device, devices, rss0));
  } finally {
    if (run.trainer) native().dispose(run.trainer);
    if (run.pipe) native().dispose(run.pipe);
  }
  return results;
}

/** What the checks after the device share: the options, where it runs, and what they loaded. */
interface SetupRun {
  cfg: TrainConfig;
  device: string;
  mixed: 'no' | 'fp16' | 'bf16';
  modelDir: string;
  pipe?: PipelineHandle;
  trainer?: TrainerHandle;
}

/** The dataset loads, and (--enable-bucket / --masked-loss) its buckets and masks; undefined when it cannot train. */
async function checkData(cfg: TrainConfig, report: (r: CheckResult) => void): Promise<{ dataset: Dataset; plan: DataPlan } | undefined> {
  let dataset: Dataset;
  try {
    dataset = await loadDataset(cfg.train_data_dir, datasetOptions(cfg));
    report({ name: 'dataset loads', ok: true, detail: describeDataset(dataset) });
  } catch (e) {
    const err = e as Error & { fix?: string };
    report({ name: 'dataset loads', ok: false, detail: err.message, fix: err.fix ?? 'see README "Training your own LoRA" for the data layouts' });
    return undefined;
  }
  if (!cfg.enable_bucket && !cfg.masked_loss) return { dataset, plan: {} };
  const r = await bucketReport(cfg, dataset);
  report(r.result);
  return r.plan && r.dataset ? { dataset: r.dataset, plan: r.plan } : undefined;
}

/** The training images as the loader gives them. */
function imageSource(cfg: TrainConfig, { dataset, plan }: { dataset: Dataset; plan: DataPlan }, prefetch: boolean): ImageSource {
  return new ImageSource(dataset, {
    batchSize: cfg.train_batch_size, seed: cfg.seed, resolution: cfg.resolution, interpolation: cfg.image_interpolation_mode, centerCrop: cfg.center_crop,
    randomFlip: cfg.random_flip, ...(prefetch ? {} : { prefetchBatches: 0 }), ...loaderExtras(cfg, plan),
  });
}

/** Two batches come out of the dataloader (decode, resize, crop, buckets, masks). */
async function checkDataloader(cfg: TrainConfig, data: { dataset: Dataset; plan: DataPlan }): Promise<CheckResult> {
  const name = 'dataloader yields batches';
  const t0 = Date.now();
  const src = imageSource(cfg, data, false);
  try {
    const n = Math.min(2, Math.ceil(data.dataset.items.length / cfg.train_batch_size));
    let images = 0;
    for (let i = 0; i < n; i++) images += (await src.next()).indices.length;
    return { name, ok: true, detail: `${n} batches, ${images} images at ${data.plan.table ? 'their buckets\' sizes' : `${cfg.resolution}px`} in ${Date.now() - t0} ms` };
  } catch (e) {
    return { name, ok: false, detail: (e as Error).message, fix: 'fix or remove the image named above (or --skip-bad-images)' };
  } finally {
    await src.close();
  }
}

/** The model folder (or single file) loads on the device in the weights' dtype. */
async function loadModels({ cfg, device, modelDir }: SetupRun, weightDtype: Precision, report: (r: CheckResult) => void): Promise<PipelineHandle | undefined> {
  const name = 'models load';
  try {
    await checkModel(modelDir, ['unet', 'vae', 'text_encoder']);
    const t0 = Date.now();
    const pipe = await native().loadPipeline(modelDir, { device, dtype: weightDtype, variant: cfg.variant });
    report({ name, ok: true, detail: `${modelDir} on ${device} (${weightDtype}) in ${((Date.now() - t0) / 1000).toFixed(1)} s` });
    return pipe;
  } catch (e) {
    report({ name, ok: false, detail: (e as Error).message, fix: 'point --pretrained-model-name-or-path at a complete diffusers folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/) or an SD 1.x single-file .safetensors' });
    return undefined;
  }
}

/** The trainer builds with the run's LoRA (or full) options. */
async function configureTrainer({ cfg, mixed, modelDir }: SetupRun, pipe: PipelineHandle, report: (r: CheckResult) => void): Promise<TrainerHandle | undefined> {
  const name = 'LoRA configured';
  try {
    const noise = NoiseSchedule.fromFile(modelSchedulerConfig(modelDir), cfg.prediction_type ? { predictionType: cfg.prediction_type } : {});
    const r = await native().createTrainer(pipe, { mode: cfg.train_mode, rank: cfg.rank, alpha: loraAlpha(cfg), targets: cfg.lora_target_modules, trainTextEncoder: cfg.train_text_encoder, textEncoderTargets: cfg.train_text_encoder ? textEncoderTargets(cfg) : undefined, mixedPrecision: mixed, gradientCheckpointing: cfg.gradient_checkpointing, predictionType: noise.predictionType as 'epsilon', alphasCumprod: Array.from(noise.alphasCumprod), seed: cfg.seed, maxGradNorm: cfg.max_grad_norm });
    report({ name, ok: true, detail: `rank ${cfg.rank}, alpha ${loraAlpha(cfg)}, targets ${cfg.lora_target_modules.join(',')}: ${r.trainableParams.toLocaleString('en-US')} trainable of ${r.totalParams.toLocaleString('en-US')} (${((100 * r.trainableParams) / r.totalParams).toFixed(3)} %)` });
    return r.trainer;
  } catch (e) {
    report({ name, ok: false, detail: (e as Error).message, fix: 'check --lora-target-modules (peft names such as to_q, to_k, to_v, to_out.0)' });
    return undefined;
  }
}

/** Five optimizer steps on the real data give finite losses. */
async function trainSteps({ cfg, modelDir }: SetupRun, trainer: TrainerHandle, data: { dataset: Dataset; plan: DataPlan }): Promise<CheckResult> {
  const name = '5 training steps';
  const src = imageSource(cfg, data, true);
  try {
    const tok = CLIPTokenizer.fromFolder(modelTokenizerDir(modelDir));
    const losses: number[] = [];
    const t0 = Date.now();
    for (let i = 0; i < 5; i++) {
      const b = await src.next();
      const ids = tok.encodeBatch(b.captions, { maxLength: tok.modelMaxLength });
      losses.push(await native().trainerMicroStep(trainer, { ...b.images, inputIds: fromInt64('input_ids', [ids.length, ids[0].length], ids.flat()) }, 1));
      await native().trainerOptimizerStep(trainer, cfg.learning_rate, cfg.train_text_encoder ? (cfg.text_encoder_lr ?? cfg.learning_rate) : undefined);
    }
    const ok = losses.every(Number.isFinite);
    return { name, ok, detail: `losses ${losses.map((l) => l.toFixed(4)).join(', ')} (${((Date.now() - t0) / 5000).toFixed(2)} s/step)`, fix: ok ? undefined : 'NaN/inf losses: try --mixed-precision no or bf16, a lower --learning-rate, or check the model weights' };
  } catch (e) {
    return { name, ok: false, detail: (e as Error).message, fix: 'out of memory? lower --train-batch-size, add --gradient-checkpointing, or use --mixed-precision bf16/fp16' };
  } finally {
    await src.close();
  }
}

/**
 * A checkpoint of this trainer written, verified and loaded back through training's own save/load pair
 * (saveTrainingState / loadTrainingState), in a temporary folder.
 */
async function checkpointRoundTrip({ cfg, device, mixed, modelDir }: SetupRun, trainer: TrainerHandle, dataset: Dataset | undefined): Promise<CheckResult> {
  const name = 'checkpoint round trip';
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'train-lora-setup-'));
  try {
    const t0 = Date.now();
    const n = dataset?.items.length ?? 1;
    const cursor = { version: 1 as const, seed: cfg.seed, numSamples: n, epoch: 0, position: 0 };
    const snapshot: TrainingSnapshot = {
      config: cfg,
      schedule: { spec: { kind: 'constant', baseLr: cfg.learning_rate, warmupSteps: 0, totalSteps: 1, numCycles: 1, power: 1, lrEnd: 0, stepRules: null }, schedulerSteps: 1 },
      worldSize: 1,
      cursor,
      trainerState: {
        version: TRAINER_STATE_VERSION, global_step: 1, scheduler_steps: 1, epoch: 0, position: 0, samples_seen: 0, max_train_steps: 1, train_loss: null, best_metric: null,
        base_model: { path: modelDir, fingerprint: 'test-setup' }, dataset: { path: cfg.train_data_dir, fingerprint: 'test-setup', size: n },
        config: cfg, device, mixed_precision: mixed, resumed_from: null,
      },
    };
    const mgr = new CheckpointManager(dir);
    const saved = await mgr.save(1, async (tmp) => (await saveTrainingState(trainer, tmp, snapshot, mgr.dir)).files);
    const v = await verifyCheckpoint(saved.path);
    if (!v.valid) throw new Error(`verify failed: ${v.problem}`);
    await loadTrainingState(trainer, saved.path, { rank: 0 });
    return { name, ok: true, detail: `write + verify + load of ${formatBytes(saved.size)} in ${Date.now() - t0} ms (${dir})` };
  } catch (e) {
    return { name, ok: false, detail: (e as Error).message, fix: 'check free space and write permissions of the temp folder / --output-dir' };
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** The machine's memory and what the checks used beyond start-up. */
function memoryReport(cfg: TrainConfig, device: string, devices: DeviceInfo[], rss0: number): CheckResult {
  const d = devices.find((x) => x.type === device.split(':')[0]);
  const rss = rssBytes();
  return {
    name: 'memory',
    ok: true,
    detail:
      `host: ${formatBytes(os.totalmem())} total, ${formatBytes(os.freemem())} free, this process ${formatBytes(rss)} RSS` +
      (d && d.type !== 'cpu' && d.totalMemory ? `; ${d.type}: ${formatBytes(d.totalMemory)} total` : '') +
      `; training with batch ${cfg.train_batch_size}${cfg.gradient_checkpointing ? ' and gradient checkpointing' : ''} used about ${formatBytes(Math.max(0, rss - rss0))} beyond start-up here`,
  };
}

/**
 * --enable-bucket / --masked-loss: the bucket table (bucket size, image count) as training will log it, the images
 * that would be upscaled more than 2x to cover their bucket (blurry training data), and the masks found.
 */
export async function bucketReport(cfg: TrainConfig, dataset: Dataset): Promise<{ result: CheckResult; plan?: DataPlan; dataset?: Dataset }> {
  const warnings: string[] = [];
  const infos: string[] = [];
  const data = { dataset };
  let plan: DataPlan;
  try {
    plan = await planData(cfg, { info: (m) => infos.push(m), warn: (m) => warnings.push(m) }, path.resolve(cfg.pretrained_model_name_or_path), data, true);
  } catch (e) {
    const err = e as Error & { fix?: string };
    return { result: { name: 'buckets and masks', ok: false, detail: err.message, fix: err.fix ?? 'see README "Aspect-ratio buckets, masks and captions"' } };
  }
  const lines: string[] = [];
  if (plan.table) {
    lines.push(`${plan.table.buckets.length} buckets (bucket size: images)`, ...describeBuckets(plan.table));
    const up = plan.table.choices
      .map((c, i) => ({ c, it: data.dataset.items[i] }))
      .filter(({ c, it }) => c.resizedWidth > 2 * it.width || c.resizedHeight > 2 * it.height);
    if (up.length)
      lines.push(
        `${up.length} image(s) upscaled more than 2x to cover their bucket (they train blurry; use larger originals or --bucket-no-upscale):`,
        ...up.slice(0, 20).map(({ c, it }) => `  ${it.file}: ${it.width}x${it.height} -> ${c.resizedWidth}x${c.resizedHeight} for ${c.width}x${c.height} (${(c.resizedWidth / it.width).toFixed(1)}x)`),
        ...(up.length > 20 ? [`  ... and ${up.length - 20} more`] : []),
      );
  }
  lines.push(...infos.filter((m) => m.startsWith('--masked-loss')), ...warnings);
  return { result: { name: 'buckets and masks', ok: true, detail: lines.join('\n       ') }, plan, dataset: data.dataset };
}

/** `test-setup`: the training flags, checked without training (the demo configuration when no model is given). */
export function testSetupCommand<T>(cli: Argv<T>): Argv<T> {
  return commandWithTrainFlags(
    cli,
    'test-setup',
    'Check this machine and configuration: data, models, LoRA, 5 steps, a checkpoint round trip, memory (same flags as training)',
    async (argv) => {
      const reporter = new CliReporter('warn');
      const extra = argv.demo || (argv['pretrained-model-name-or-path'] === undefined && argv.config === undefined) ? await demoDefaults(reporter) : {};
      if (Object.keys(extra).length) console.log('test-setup: no model/data given, checking the embedded demo configuration');
      const results = await testSetup(configFromArgv(argv, extra));
      const bad = results.filter((r) => r.ok === false).length;
      console.log(bad ? `${bad} check(s) failed` : 'all checks passed');
      if (bad) process.exitCode = 1;
    },
  );
}
