/**
 * The one typed declaration of the native addon (native/bindings/addon.cpp). The addon runs every libtorch call on
 * one native thread it owns; each function here returns a Promise settled from that thread. JS holds only
 * opaque handles; tensors cross the boundary only as {@link HostTensor}s at the edges (inputs in, results out).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

/** safetensors dtype names. */
export type DType = 'F64' | 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'I16' | 'I8' | 'U8' | 'BOOL';
/** Precision names accepted where weights are converted. */
export type Precision = 'fp32' | 'fp16' | 'bf16' | 'fp64';
/** 'cpu' | 'cuda' | 'cuda:N' | 'mps' */
export type DeviceName = string;

/** A tensor in host memory: little-endian bytes in `data`. */
export interface HostTensor {
  name: string;
  dtype: DType;
  shape: number[];
  data: Uint8Array;
}

export interface DeviceInfo {
  type: 'cpu' | 'cuda' | 'mps';
  index: number;
  available: boolean;
  name?: string;
  /** Why the device cannot be used. */
  reason?: string;
  /** Bytes. */
  totalMemory?: number;
  /** CPU: intra-op threads libtorch uses. */
  threads?: number;
  /** CUDA: e.g. "9.0" (read through the driver API). */
  computeCapability?: string;
  /** Available devices: bf16 autocast is supported and fast here (CPU; CUDA compute capability >= 8.0). */
  bf16?: boolean;
}

export interface SafetensorsHeader {
  tensors: Array<{ name: string; dtype: DType; shape: number[]; dataOffsets: [number, number] }>;
  metadata: Record<string, string>;
  dataStart: number;
  fileSize: number;
}

declare const handleBrand: unique symbol;
/** An opaque native object (released when garbage-collected, or at once with {@link NativeBinding.dispose}). */
export interface Handle<Kind extends string> {
  readonly [handleBrand]: Kind;
}
export type PipelineHandle = Handle<'Pipeline'>;
export type TrainerHandle = Handle<'Trainer'>;
/** A c10d process group (data-parallel training). */
export type ProcessGroupHandle = Handle<'ProcessGroup'>;
export type SamplerHandle = Handle<'Sampler'>;
/** VAE posteriors of dataset items, kept natively (native/train/latent_cache.h). */
export type LatentCacheHandle = Handle<'LatentCache'>;

export type PipelineComponent = 'text_encoder' | 'unet' | 'vae';

export interface LoadPipelineOptions {
  device?: DeviceName;
  dtype?: Precision;
  /** e.g. 'fp16' loads `*.fp16.safetensors`. */
  variant?: string;
  components?: PipelineComponent[];
}

export interface ForwardOptions {
  /** A LoRA file (diffusers, peft or kohya keys; autodetected), PEFT adapter folder or checkpoint folder, applied to
   * the UNet / text encoder at its own alpha (see read_lora_file in native/lora/lora.h). */
  lora?: string;
  loraScale?: number;
  /** --lora-alpha: the alpha of a LoRA that does not carry it (otherwise such a file is an ELORAALPHA error). */
  loraAlpha?: number;
  /** Also compute `loss` (MSE against `target`) and `grad.<key>` of every LoRA parameter. */
  backward?: boolean;
  /** Backward through activation-checkpointed blocks (must give the same gradients). */
  gradientCheckpointing?: boolean;
}

export interface NativeBinding {
  version(): { torch: string; cuda: boolean; napi: number };
  devices(): Promise<DeviceInfo[]>;
  safetensorsHeader(path: string): Promise<SafetensorsHeader>;
  safetensorsRead(path: string, options?: { dtype?: Precision | DType }): Promise<{ tensors: HostTensor[]; metadata: Record<string, string> }>;
  safetensorsWrite(path: string, tensors: HostTensor[], metadata?: Record<string, string>): Promise<void>;
  dispose(handle: Handle<string>): void;
  /** Native objects (by kind: Pipeline, Trainer, Sampler, ProcessGroup) that JS holds and has neither disposed nor garbage-collected. */
  liveHandles(): Record<string, number>;
  /** Finishes queued work and stops the addon's torch and I/O threads; every later call rejects with code ESHUTDOWN. */
  shutdown(): void;
  /** `dir`: a diffusers model folder, or a single-file SD 1.x checkpoint in the original (LDM) layout. */
  loadPipeline(dir: string, options?: LoadPipelineOptions): Promise<PipelineHandle>;
  /** The configs inferred from a single-file SD 1.x checkpoint's tensors, as JSON text {"unet", "vae", "text_encoder"};
   * rejects (EMODELFILE) for other families (SDXL, SD3, Flux, SD 2.x OpenCLIP) and incomplete files. */
  singleFileConfigs(file: string): Promise<string>;
  /** TF32 for fp32 matmuls (cuBLAS) and convolutions (cuDNN), both set to `allow`; resolves with what libtorch reports. */
  setAllowTf32(allow: boolean): Promise<{ cublas: boolean; cudnn: boolean }>;
  forward(pipeline: PipelineHandle, inputs: HostTensor[], options?: ForwardOptions): Promise<HostTensor[]>;
  /** Seeded random weights for a component folder with a config.json (make-tiny-model). */
  writeRandomWeights(componentDir: string, kind: PipelineComponent, seed: number): Promise<void>;
  createTrainer(pipeline: PipelineHandle, options: TrainerOptions): Promise<{ trainer: TrainerHandle; trainableParams: number; totalParams: number }>;
  /** Forward + backward of one micro-batch (loss divided by `lossDivisor` for accumulation); returns the loss. */
  trainerMicroStep(trainer: TrainerHandle, batch: TrainBatch, lossDivisor?: number): Promise<number>;
  trainerEvalLoss(trainer: TrainerHandle, batch: TrainBatch): Promise<number>;
  trainerGraphStatus(trainer: TrainerHandle): Promise<CudaGraphStatus>;
  /** teLr: the text encoder's param group's lr (--train-text-encoder; default lr). */
  trainerOptimizerStep(trainer: TrainerHandle, lr: number, teLr?: number): Promise<OptimizerStepResult>;
  /** Writes dir/model.safetensors and dir/optimizer.safetensors; returns the JSON-able rest of the state. */
  trainerSaveState(trainer: TrainerHandle, dir: string, metadata?: Record<string, string>): Promise<TrainerStateJson>;
  /** Loads dir/model.safetensors, and the optimizer / scaler / RNG parts that are given. */
  trainerLoadState(trainer: TrainerHandle, dir: string, state?: Partial<TrainerStateJson>): Promise<void>;
  /** `prefix`: the key prefix for diffusers/peft keys (default "unet"; "base_model.model" for PEFT adapter files). */
  /** Initial adapter weights from a LoRA file (any supported format); resolves with the number of modules. */
  trainerLoadLora(trainer: TrainerHandle, file: string): Promise<number>;
  /** The VAE posterior (mean, std; before scaling_factor) of pixel values [B,3,H,W] in [-1,1]. */
  vaeEncode(pipeline: PipelineHandle, pixelValues: HostTensor): Promise<[HostTensor, HostTensor]>;
  /** An empty latent cache on the pipeline's VAE (dispose it when done). */
  latentCacheCreate(pipeline: PipelineHandle): LatentCacheHandle;
  /**
   * Encodes pixel values [B,3,H,W] in [-1,1] and keeps items[k]'s posterior (row k) natively, with its --masked-loss
   * weights [B,1,h,w] at the latent size when given; resolves with the latent shape [C,h,w].
   */
  latentCacheEncode(cache: LatentCacheHandle, items: number[], pixelValues: HostTensor, lossMask?: HostTensor): Promise<number[]>;
  /**
   * Fixes items' latents, (mean + std·z)·scaling_factor with the loaded VAE's factor, and their diffusion noise
   * (validation loss). z and noise: [B,C,h,w], row k for items[k]. A batch of only such items uses them.
   */
  latentCacheFix(cache: LatentCacheHandle, items: number[], z: HostTensor, noise: HostTensor): Promise<void>;

  // ---- data parallelism (native/bindings/addon_distributed.cpp); every rank must issue the collectives in the same order ----
  /** Backends this build can create: 'gloo' always, 'nccl' in CUDA builds compiled with nccl.h. */
  distBackends(): Array<'gloo' | 'nccl'>;
  /** Rendezvous at masterAddr:masterPort (rank 0 hosts the TCPStore) and create the backend; rejects (code EDIST) after timeoutMs. */
  distInit(options: DistInitNativeOptions): Promise<ProcessGroupHandle>;
  /** The trainer then draws its rows of every global batch's random tensors and averages gradients over the group before clipping. */
  distAttachTrainer(group: ProcessGroupHandle, trainer: TrainerHandle): Promise<void>;
  /** Element-wise sum/max/min of a few numbers over all ranks (float64). */
  distAllReduce(group: ProcessGroupHandle, values: number[], op?: 'sum' | 'max' | 'min'): Promise<number[]>;
  distBarrier(group: ProcessGroupHandle, timeoutMs: number, what?: string): Promise<void>;
  distDestroy(group: ProcessGroupHandle): Promise<void>;
  /** The trainer's RNG streams ("cpu", "cuda:N"), base64, as trainerSaveState reports them (no files written). */
  trainerRngState(trainer: TrainerHandle): Promise<Record<string, string>>;
  /** The LoRA adapters a source holds, per component (see src/export/lora-export.ts). */
  loraSummary(source: LoraSource): Promise<LoraSummary>;
  /**
   * Writes the source's adapters as one LoRA safetensors file, keys sorted by name. `prefix` replaces the component
   * name in peft/diffusers keys ("base_model.model" for a peft adapter folder); `components` limits what is written.
   */
  loraExport(source: LoraSource, path: string, format: LoraFileFormat, options?: LoraExportOptions): Promise<{ tensors: number; components: LoraSummary }>;
  /**
   * Writes <outComponentDir>/diffusion_pytorch_model.safetensors (model.safetensors for the text encoder): the base
   * component's weights as stored, with W + alpha/r * B @ A folded into every adapted weight, in the base dtype.
   * `baseComponentDir` may be a single-file checkpoint: the component's tensors are written under diffusers names
   * ('vae', without adapters, is only converted).
   */
  loraMergeComponent(source: LoraSource, component: LoraComponent | 'vae', baseComponentDir: string, outComponentDir: string, options?: { variant?: string }): Promise<LoraMergeResult>;
  /**
   * A text-to-image sampling session (src/inference/text-to-image.ts drives it): encodes the prompts, draws the
   * initial latents from its own CPU generator seeded with `seed` (diffusers' prepare_latents). `pipeline` may be
   * null with `fakeModel` (scheduler tests). Resolves with the handle and the batch size.
   */
  samplerCreate(pipeline: PipelineHandle | null, options: SamplerCreateOptions): Promise<{ sampler: SamplerHandle; batch: number }>;
  /** One denoising step: the model (with guidance) on x * modelInputScale at `timestep`, then the op program. */
  samplerStep(sampler: SamplerHandle, step: SamplerStepProgram): Promise<void>;
  /** VAE decode of the latents: [B, H, W, 3], uint8 ((x * 255).round()) or float32 in [0, 1]. */
  samplerDecode(sampler: SamplerHandle, options?: { output?: 'uint8' | 'float' }): Promise<HostTensor>;
  /** The current latents (float32), for tests. */
  samplerLatents(sampler: SamplerHandle): Promise<HostTensor>;
  /** Applies a LoRA (UNet and/or text encoder; any supported format, a file, PEFT adapter folder or checkpoint folder) at
   * strength `scale`, at its own alpha; `alphaIfUnknown` (--lora-alpha) serves a file that does not carry its alpha.
   * Resolves with the module count. */
  pipelineApplyLora(pipeline: PipelineHandle, file: string, scale?: number, alphaIfUnknown?: number): Promise<number>;
}

/** Where LoRA adapters come from: a live trainer or pipeline, or a checkpoint's model.safetensors (peft keys) + alpha. */
export type LoraSource = { trainer: TrainerHandle } | { pipeline: PipelineHandle } | { checkpoint: string; alpha: number; convAlpha?: number };
export type LoraComponent = 'unet' | 'text_encoder';
export interface LoraComponentSummary {
  rank: number;
  alpha: number;
  /** Module paths with an adapter, sorted. */
  modules: string[];
  /** Modules whose rank / alpha differ from rank / alpha (3x3 conv adapters), by full path: peft's rank_pattern / alpha_pattern. */
  rankPattern?: Record<string, number>;
  alphaPattern?: Record<string, number>;
}
export type LoraSummary = Partial<Record<LoraComponent, LoraComponentSummary>>;
export interface LoraExportOptions {
  metadata?: Record<string, string>;
  prefix?: string;
  components?: LoraComponent[];
}
export interface LoraMergeResult {
  file: string;
  /** Weights that got an adapter folded in. */
  merged: number;
  tensors: number;
  /** safetensors dtype of the merged weights (the base file's). */
  dtype: string;
}

export interface DistInitNativeOptions {
  backend: 'gloo' | 'nccl';
  masterAddr: string;
  masterPort: number;
  rank: number;
  worldSize: number;
  timeoutMs: number;
  /** Training device ('cpu', 'cuda:N'). */
  device?: string;
  /** Gradient bucket size (default 25 MiB). */
  bucketBytes?: number;
}


export interface SamplerCreateOptions {
  /** [prompts, 77] int64 token ids. */
  inputIds?: HostTensor;
  /** [1 or prompts, 77] int64: the negative prompt ("" when none); needed when guidanceScale > 1. */
  negativeInputIds?: HostTensor;
  /** Classifier-free guidance is used only when > 1 (default 7.5). */
  guidanceScale?: number;
  height?: number;
  width?: number;
  numImagesPerPrompt?: number;
  seed?: number;
  /** The scheduler's init_noise_sigma (the initial latents are multiplied by it). */
  initNoiseSigma?: number;
  /** Initial latents instead of the seeded draw (before initNoiseSigma). */
  latents?: HostTensor;
  /** Scheduler tests: eps = base + inputScale * model_input, no pipeline. */
  fakeModel?: { base: HostTensor; inputScale: number };
}

/** See src/inference/schedulers.ts: ops compute `target = Σ coef · slot (+ noise · N(0,1))`, optionally clamped. */
export interface SamplerStepProgram {
  timestep: number;
  modelInputScale: number;
  ops: Array<{ target: string; terms: Array<[string, number]>; noise?: number; clamp?: [number, number] }>;
}

export interface TrainerOptions {
  mode?: 'lora' | 'full';
  rank?: number;
  alpha?: number;
  dropout?: number;
  init?: 'gaussian' | 'kaiming' | 'zeros';
  /** peft-style target names matched against UNet module paths. */
  targets?: string[];
  /** LoRA on the text encoder too (its own AdamW group: trainerOptimizerStep's teLr). */
  trainTextEncoder?: boolean;
  /** peft-style target names matched against text-encoder module paths [default: q_proj k_proj v_proj out_proj]. */
  textEncoderTargets?: string[];
  /** Rank / alpha of 3x3 conv adapters (LoCon); without convRank no 3x3 conv may be targeted. */
  convRank?: number;
  convAlpha?: number;
  mixedPrecision?: 'no' | 'fp16' | 'bf16';
  gradientCheckpointing?: boolean;
  predictionType?: 'epsilon' | 'v_prediction';
  noiseOffset?: number;
  snrGamma?: number;
  /** The DDPM schedule's alphas_cumprod (float32 values), one per training timestep. */
  alphasCumprod: number[];
  adamBeta1?: number;
  adamBeta2?: number;
  adamWeightDecay?: number;
  adamEpsilon?: number;
  /** <= 0 disables clipping. */
  maxGradNorm?: number;
  seed?: number;
  /**
   * Text-encoder outputs cached per distinct caption (token ids) while the text encoder is frozen, LRU-bounded to this
   * many MiB (default 1024; 0 encodes every batch anew). Each caption is encoded alone, so results do not depend on
   * the cache's state (exact resume).
   */
  textEmbeddingCacheMb?: number;
  /** fp16 dynamic loss scaling, as torch.amp.GradScaler (defaults: 65536, 2, 0.5, 2000). */
  lossScaling?: { initScale?: number; growthFactor?: number; backoffFactor?: number; growthInterval?: number };
  /** Run each micro-step's UNet forward + backward from a CUDA graph per input shape (native/train/cuda_graph.h); eager
   * where that is impossible (see {@link CudaGraphStatus}). */
  cudaGraphs?: boolean;
}

/** Whether a trainer's micro-steps run from CUDA graphs, and why not. */
export interface CudaGraphStatus {
  requested: boolean;
  active: boolean;
  /** Why graphs are not used (the device, the build, an option), or why the last capture failed. */
  reason: string;
  /** Captured input shapes. */
  graphs: number;
  /** Micro-steps replayed from a graph. */
  replays: number;
  /** Micro-steps run eagerly while graphs were requested (warm-up, failed shapes). */
  eager: number;
}

/**
 * A micro-batch: pixels (or items of a native latent cache) and token ids (or cached text embeddings); the rest are
 * test hooks.
 */
export interface TrainBatch {
  pixelValues?: HostTensor;
  /** Items of a latent cache: their posteriors (sampled each step), or their fixed latents and noise (latentCacheFix). */
  cached?: { cache: LatentCacheHandle; items: number[] };
  /** Test hooks: a posterior given directly. */
  latentMean?: HostTensor;
  latentStd?: HostTensor;
  inputIds?: HostTensor;
  encoderHiddenStates?: HostTensor;
  latents?: HostTensor;
  noise?: HostTensor;
  timesteps?: HostTensor;
  /** --masked-loss: [B,1,h,w] float32 loss weights at the latent size (multiplied into the per-element loss). */
  lossMask?: HostTensor;
}

export interface OptimizerStepResult {
  /** Total gradient 2-norm before clipping (NaN when the step was skipped). */
  gradNorm: number;
  /** No update happened and the LR schedule must not advance (non-finite gradients). */
  skipped: boolean;
  /** The gradients held inf/NaN: with fp16 an overflow (the loss scale was lowered), otherwise a diverging run. */
  nonFinite: boolean;
  lossScale: number;
  optimizerSteps: number;
}

/** What a checkpoint stores besides model.safetensors / optimizer.safetensors (all JSON-able). */
export interface TrainerStateJson {
  /** trainerSaveState only: the files it wrote, with the size and SHA-256 of the bytes written (for the manifest). */
  files?: Record<string, { size: number; sha256: string }>;
  optimizerSteps: Record<string, number>;
  scaler: { enabled: boolean; scale: number; growthTracker: number };
  /** Generator states by stream ("cpu", "cuda:0", ...), base64. */
  rng: Record<string, string>;
}

export type LoraFileFormat = 'diffusers' | 'peft' | 'kohya';

let cached: NativeBinding | undefined;

/**
 * What to tell the user when the addon does not load (`message` is the loader's error). The cases that depend on
 * libtorch (missing CUDA libraries, a moved libtorch, ABI mismatches) are explained by scripts/libtorch.js, which
 * build-native.js also uses right after a build.
 */
export function loadFailureHint(message: string, root = path.resolve(__dirname, '..')): string {
  if (/No native build was found/.test(message)) {
    return 'The native addon is not built. Run `npm run build:native` (it finds libtorch and compiles native/; see README "Devices and libtorch").';
  }
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    const { explainLoadFailure } = require(path.join(root, 'scripts', 'libtorch.js')) as { explainLoadFailure(m: string): string | null };
    const hint = explainLoadFailure(message);
    if (hint) return hint;
  } catch {
    // scripts/ missing (a trimmed install): fall back to the generic advice
  }
  return 'Rebuild the addon with `npm run build:native` (it links the libtorch that is installed now; set LIBTORCH to choose another).';
}

/** How torch's OpenMP threads wait between the many small parallel regions of a step (see {@link threadPolicy}). */
export interface ThreadPolicy {
  /** Variables to set before libtorch loads (empty: the environment already decides). */
  env: Record<string, string>;
  /** One line for the log, e.g. "OpenMP wait: bounded spin (GOMP_SPINCOUNT=10000)". */
  description: string;
}

/** Spins of a waiting OpenMP thread before it sleeps (libgomp's default is 300000, ~30x longer). */
export const BOUNDED_SPIN_COUNT = 10000;

/**
 * The wait policy of torch's OpenMP threads (libgomp reads it once, at load). Measured on 2 cores (README
 * "Performance"): libgomp's default spin (300k spins) is fastest alone but 5.6x slower than passive when two
 * processes share the cores; passive waiting (threads sleep after every parallel region) is 40 % slower alone;
 * a bounded spin (GOMP_SPINCOUNT=10000) is within 2 % of the default alone and 3x faster than it when shared.
 *
 * - OMP_WAIT_POLICY or GOMP_SPINCOUNT already set: kept as given.
 * - TRAIN_LORA_THREAD_POLICY=passive | spin | bounded picks one (spin: libgomp's default).
 * - otherwise (auto): bounded spin, or passive when the machine is already busy at start (other work keeps at least
 *   half the cores busy, sampled over 100 ms: spinning would only take time from it and from our own decoding) or
 *   when several data-parallel processes share this machine (LOCAL_WORLD_SIZE > 1). The sample, not the 1-minute
 *   load average: a process that has just ended (a previous run, a build) keeps the load average up for minutes.
 * The variables are set only while the addon (and libgomp, which reads them when it loads) is loading, so processes
 * started later (data-parallel workers, tests' CLI runs) decide for themselves.
 */
export function threadPolicy(env: NodeJS.ProcessEnv = process.env, cores = os.availableParallelism(), busyCores: number | (() => number) = busyCoresNow): ThreadPolicy {
  if (env.OMP_WAIT_POLICY || env.GOMP_SPINCOUNT) {
    const given = ['OMP_WAIT_POLICY', 'GOMP_SPINCOUNT'].filter((k) => env[k]).map((k) => `${k}=${env[k]}`);
    return { env: {}, description: `OpenMP wait: ${given.join(' ')} (from the environment)` };
  }
  const asked = env.TRAIN_LORA_THREAD_POLICY ?? 'auto';
  const passive = { env: { OMP_WAIT_POLICY: 'PASSIVE' }, description: 'OpenMP wait: passive' };
  const bounded = { env: { GOMP_SPINCOUNT: String(BOUNDED_SPIN_COUNT) }, description: `OpenMP wait: bounded spin (GOMP_SPINCOUNT=${BOUNDED_SPIN_COUNT})` };
  switch (asked) {
    case 'passive':
      return passive;
    case 'bounded':
      return bounded;
    case 'spin':
      return { env: {}, description: "OpenMP wait: libgomp's default spin" };
    case 'auto': {
      const local = Number(env.LOCAL_WORLD_SIZE ?? 1);
      if (local > 1) return { ...passive, description: `${passive.description} (${local} data-parallel processes share this machine)` };
      const busy = typeof busyCores === 'function' ? busyCores() : busyCores;
      return busy >= cores / 2 ? { ...passive, description: `${passive.description} (the machine is busy: other work keeps ${busy.toFixed(1)} of ${cores} cores busy)` } : bounded;
    }
    default:
      throw new Error(`train-lora: TRAIN_LORA_THREAD_POLICY=${asked} is not one of auto, bounded, passive, spin`);
  }
}

/** Cores busy right now, from the CPU time of every core over `ms` milliseconds (this process sleeps meanwhile). */
export function busyCoresNow(ms = 100): number {
  const total = () => os.cpus().reduce((t, c) => ({ idle: t.idle + c.times.idle, all: t.all + c.times.user + c.times.nice + c.times.sys + c.times.idle + c.times.irq }), { idle: 0, all: 0 });
  const a = total();
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
  const b = total();
  const all = b.all - a.all;
  return all > 0 ? (1 - (b.idle - a.idle) / all) * os.cpus().length : 0;
}

let appliedPolicy: ThreadPolicy | undefined;

/** Decides the thread policy once (before the addon loads); returns what was decided. */
export function applyThreadPolicy(): ThreadPolicy {
  if (appliedPolicy) return appliedPolicy;
  appliedPolicy = threadPolicy();
  return appliedPolicy;
}

/** Runs `load` with the policy's variables in the environment (libgomp reads them as it loads), then removes them. */
function withThreadPolicy<T>(load: () => T): T {
  const set = Object.entries(applyThreadPolicy().env).filter(([k]) => process.env[k] === undefined);
  for (const [k, v] of set) process.env[k] = v;
  try {
    return load();
  } finally {
    for (const [k] of set) delete process.env[k];
  }
}

/**
 * Loads the addon once. Throws an Error that says how to fix a missing build or an unloadable libtorch.
 *
 * TRAIN_LORA_ADDON=/path/to/train_lora.node loads that file instead of build/Release: an addon built elsewhere with
 * `node scripts/build-native.js --out DIR` (scripts/check-cuda-build.sh runs the tests with a CUDA-linked one).
 * Child processes (the distributed launcher, the CLI spawned by tests) inherit it with the environment.
 */
export function native(): NativeBinding {
  if (cached) return cached;
  const root = path.resolve(__dirname, '..');
  // The OpenMP wait policy must be in the environment while libtorch (and its OpenMP runtime) loads.
  const override = process.env.TRAIN_LORA_ADDON;
  if (override && !fs.existsSync(override)) {
    throw new Error(`train-lora: TRAIN_LORA_ADDON=${override} does not exist. Point it at a built train_lora.node, or unset it to use build/Release.`);
  }
  try {
    if (override) {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      cached = withThreadPolicy(() => require(path.resolve(override)) as NativeBinding);
    } else {
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const load = require('node-gyp-build') as (dir: string) => unknown;
      cached = withThreadPolicy(() => load(root) as NativeBinding);
    }
    return cached;
  } catch (e) {
    const msg = e instanceof Error ? e.message : String(e);
    const which = override ? ` (TRAIN_LORA_ADDON=${override})` : '';
    throw new Error(`train-lora: cannot load the native addon${which}: ${msg}\n${loadFailureHint(msg, root)}`);
  }
}
