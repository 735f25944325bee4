/**
 * The training state a checkpoint holds, file by file: THE place for every state file's name, its content and its
 * schema, and for the one save / load pair (the model of accelerate's checkpointing.py: save_state / load_state).
 *
 *   model.safetensors          trainable weights          (written by the native trainer)
 *   optimizer.safetensors      AdamW moments              (written by the native trainer)
 *   optimizer.json             hyper-parameters, per-parameter step counts
 *   scheduler.json             LR schedule and its position
 *   scaler.json                fp16 loss-scale state
 *   random_states_<rank>.json  every RNG stream + the data cursor (one per data-parallel process)
 *   trainer_state.json         run id, step, epoch, config, fingerprints
 *   manifest.json              written last by CheckpointManager: size + sha256 of every file
 *
 * The JSON files are a small registry of named parts (STATE_PARTS): each has its file name, its schema (checked by
 * verify, `latest` and every resume) and what a save writes into it. A new kind of state adds its file in one place:
 * registerStatePart(). The CheckpointManager (manager.ts) makes a save atomic and verifiable; this module decides what
 * is in it.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import type { z } from 'zod';

import { convAlpha, loraAlpha, type TrainConfig } from '../config';
import type { SampleOrderState } from '../data/sampler';
import { native, type TrainerHandle, type TrainerStateJson } from '../native';
import { lrForOptimizerStep, type LrScheduleSpec } from '../schedules/lr';
import { writeJsonDurable } from './fsutil';
import { CheckpointError } from './manager';
import { describeIssues, ManifestSchema, OptimizerJsonSchema, RandomStatesSchema, ScalerJsonSchema, SchedulerJsonSchema, TrainerStateSchema } from './schema';

// ---- file names ----

/** Trainable weights (LoRA in peft keys, or the whole UNet of --train-mode full); written natively. */
export const MODEL_FILE = 'model.safetensors';
/** AdamW moments by parameter name; written natively. */
export const OPTIMIZER_TENSORS_FILE = 'optimizer.safetensors';
export const OPTIMIZER_FILE = 'optimizer.json';
export const SCHEDULER_FILE = 'scheduler.json';
export const SCALER_FILE = 'scaler.json';
export const TRAINER_STATE_FILE = 'trainer_state.json';
/** Written last (by CheckpointManager.save): size + sha256 of every other file. */
export const MANIFEST_FILE = 'manifest.json';
const RANDOM_STATES_RE = /^random_states_(\d+)\.json$/;
/** random_states_<rank>.json: the RNG streams and data cursor of one data-parallel process. */
export function randomStatesFile(rank: number): string {
  return `random_states_${rank}.json`;
}
export const RANDOM_STATES_FILE = randomStatesFile(0);

export const TRAINER_STATE_VERSION = 1;

export interface TrainerStateFile {
  version: number;
  /**
   * Identifies one training run across its resumes (absent in older checkpoints): `latest` and
   * retention never mix the checkpoints of two runs in one folder.
   */
  run_id?: string;
  global_step: number;
  /** Optimizer steps that advanced the LR schedule (not skipped for non-finite gradients). */
  scheduler_steps: number;
  /** Optimizer steps skipped so far for a non-finite loss or gradients (fp16 overflows included). */
  nonfinite_steps?: number;
  /** The last optimizer step whose update was applied (the weights are that step's). */
  last_good_step?: number;
  epoch: number;
  /** Samples of `epoch` already consumed (the data cursor; global over all ranks). */
  position: number;
  /** Data-parallel processes that trained up to here (absent: 1). */
  world_size?: number;
  samples_seen: number;
  max_train_steps: number;
  train_loss: number | null;
  /** Held-out loss at this step (when validation data exists and it was measured here). */
  val_loss?: number | null;
  /** Training stage (the last checkpoint of each earlier stage is kept by retention). */
  stage?: string;
  best_metric: { name: string; value: number; step: number; mode: 'min' | 'max' } | null;
  base_model: { path: string; fingerprint: string };
  dataset: { path: string; fingerprint: string; size: number };
  config: TrainConfig;
  /** The device and mixed precision this run resolved (absent in checkpoints of train-lora before 0.2). */
  device?: string;
  mixed_precision?: 'no' | 'fp16' | 'bf16';
  resumed_from: string | null;
  /** Set when the run was imported from a diffusers/accelerate checkpoint folder (its LoRA weights and step). */
  imported_from?: { path: string; format: 'diffusers'; step: number };
  versions: { train_lora: string; torch: string; node: string };
  time: string;
  host: string;
}

/** random_states_<rank>.json. */
export interface RandomStatesFile {
  torch: Record<string, string>;
  data: { sampler: SampleOrderState; seed: number };
}

/** The content of random_states_<rank>.json (rank 0 writes it in the checkpoint, other ranks stage theirs). */
export function randomStates(torch: Record<string, string>, sampler: SampleOrderState, seed: number): RandomStatesFile {
  return { torch, data: { sampler, seed } };
}

// ---- what a save records ----

/** Everything a save records besides the native tensors, captured when the save starts (training goes on meanwhile). */
export interface TrainingSnapshot {
  config: TrainConfig;
  /** The LR schedule and how many optimizer steps advanced it. */
  schedule: { spec: LrScheduleSpec; schedulerSteps: number };
  worldSize: number;
  /** The data cursor. */
  cursor: SampleOrderState;
  /** The RNG streams to record instead of the trainer's current ones (the state at the start of a step in progress). */
  rng?: Record<string, string>;
  /** trainer_state.json but for what is filled in when it is written (versions, time, host). */
  trainerState: Omit<TrainerStateFile, 'versions' | 'time' | 'host'>;
  /** Content of registered additional parts, by file name (see registerStatePart). */
  extra?: Record<string, unknown>;
}

/** What a JSON part is written from: the snapshot and the native trainer's JSON-able state of the same moment. */
export interface StatePartContext {
  snapshot: TrainingSnapshot;
  native: TrainerStateJson;
}

/** One JSON state file of a checkpoint. */
export interface StatePart {
  /** Its file name (for a per-rank part, rank 0's; the others are staged by their ranks and collected). */
  file: string;
  /** What its content must hold (checked by verify, `latest` and every load). */
  schema: z.ZodTypeAny;
  /** Every checkpoint must have it (a checkpoint without it does not resume). */
  required: boolean;
  /** One file per data-parallel process (random_states_<rank>.json). */
  perRank?: boolean;
  /** Its content at a save (undefined: not written this time). */
  save(c: StatePartContext): unknown;
}

function packageVersion(): string {
  try {
    return (JSON.parse(fs.readFileSync(path.join(__dirname, '..', '..', 'package.json'), 'utf8')) as { version: string }).version;
  } catch {
    return '0.0.0';
  }
}

/** The JSON parts of a checkpoint, in the order a save writes them (trainer_state.json last). */
const STATE_PARTS: StatePart[] = [
  {
    file: OPTIMIZER_FILE,
    schema: OptimizerJsonSchema,
    required: true,
    save: ({ snapshot: { config: cfg }, native: st }) => ({
      kind: 'AdamW',
      betas: [cfg.adam_beta1, cfg.adam_beta2],
      eps: cfg.adam_epsilon,
      weight_decay: cfg.adam_weight_decay,
      per_parameter_steps: st.optimizerSteps,
    }),
  },
  {
    file: SCHEDULER_FILE,
    schema: SchedulerJsonSchema,
    required: true,
    save: ({ snapshot: { schedule, worldSize } }) => ({
      spec: schedule.spec,
      scheduler_steps: schedule.schedulerSteps,
      num_processes: worldSize,
      next_lr: lrForOptimizerStep(schedule.spec, schedule.schedulerSteps, worldSize),
    }),
  },
  { file: SCALER_FILE, schema: ScalerJsonSchema, required: true, save: ({ native: st }) => st.scaler },
  {
    file: RANDOM_STATES_FILE,
    schema: RandomStatesSchema,
    required: true,
    perRank: true,
    save: ({ snapshot: s, native: st }) => randomStates(s.rng ?? st.rng, s.cursor, s.config.seed),
  },
  {
    file: TRAINER_STATE_FILE,
    schema: TrainerStateSchema,
    required: true,
    save: ({ snapshot: s }): TrainerStateFile => ({
      ...s.trainerState,
      versions: { train_lora: packageVersion(), torch: native().version().torch, node: process.version },
      time: new Date().toISOString(),
      host: os.hostname(),
    }),
  },
];

/** The parts above (registered ones come in addition). */
const BUILTIN_PARTS: ReadonlySet<string> = new Set(STATE_PARTS.map((p) => p.file));

/**
 * Adds a JSON state file to every checkpoint (written before trainer_state.json, checked by verify and at resume).
 * Its content comes from `snapshot.extra[file]` unless `save` says otherwise; loadTrainingState returns it in `extra`.
 */
export function registerStatePart(part: Omit<StatePart, 'save' | 'perRank'> & { save?: StatePart['save'] }): void {
  if (stateSchemaFor(part.file) || RANDOM_STATES_RE.test(part.file)) throw new Error(`checkpoint state file ${part.file} is registered already`);
  STATE_PARTS.splice(STATE_PARTS.length - 1, 0, { ...part, save: part.save ?? (({ snapshot }) => snapshot.extra?.[part.file]) });
}

/** The registered JSON parts, in the order a save writes them. */
export function stateParts(): readonly StatePart[] {
  return STATE_PARTS;
}

// ---- schemas by file name ----

/** The schema of a state file by its name in a checkpoint folder (undefined: not a JSON state file we know). */
export function stateSchemaFor(name: string): z.ZodTypeAny | undefined {
  if (RANDOM_STATES_RE.test(name)) return RandomStatesSchema;
  if (name === MANIFEST_FILE) return ManifestSchema;
  return STATE_PARTS.find((p) => p.file === name)?.schema;
}

/** Why `value` (the parsed content of `name`) is not a valid state file, or undefined when it is (or is not one we know). */
export function stateFileProblem(name: string, value: unknown): string | undefined {
  const schema = stateSchemaFor(name);
  if (!schema) return undefined;
  const r = schema.safeParse(value);
  return r.success ? undefined : `${name} has invalid content: ${describeIssues(r.error)}`;
}

/** Files every checkpoint must have (a run of N processes adds random_states_1..N-1.json). */
export const REQUIRED_FILES: readonly string[] = [MODEL_FILE, OPTIMIZER_TENSORS_FILE, ...STATE_PARTS.filter((p) => p.required).map((p) => p.file)];

/** REQUIRED_FILES with the required parts registered since. */
export function requiredFiles(): string[] {
  return [MODEL_FILE, OPTIMIZER_TENSORS_FILE, ...STATE_PARTS.filter((p) => p.required).map((p) => p.file)];
}

/**
 * Checks between the files of one checkpoint (each already valid on its own): the step of the folder, every rank's
 * random states, the data cursor that trainer_state.json and random_states_0.json both record, the device's stream.
 */
export function crossFileProblem(step: number, files: readonly string[], read: (name: string) => unknown): string | undefined {
  for (const f of requiredFiles()) if (!files.includes(f)) return `${f} is not in the manifest (a checkpoint needs it to resume)`;
  const st = read(TRAINER_STATE_FILE) as z.infer<typeof TrainerStateSchema>;
  if (st.global_step !== step) return `${TRAINER_STATE_FILE} says step ${st.global_step}, the manifest says ${step}`;
  for (let r = 1; r < (st.world_size ?? 1); r++)
    if (!files.includes(randomStatesFile(r))) return `${randomStatesFile(r)} is not in the manifest (trained by ${st.world_size} processes)`;
  const rng = read(RANDOM_STATES_FILE) as z.infer<typeof RandomStatesSchema>;
  const cur = rng.data.sampler;
  if (cur.epoch !== st.epoch || cur.position !== st.position)
    return `${RANDOM_STATES_FILE}'s data cursor (epoch ${cur.epoch}, sample ${cur.position}) differs from ${TRAINER_STATE_FILE}'s (epoch ${st.epoch}, sample ${st.position})`;
  const devType = st.device?.split(':')[0];
  if ((devType === 'cuda' || devType === 'mps') && !Object.keys(rng.torch).some((k) => k.split(':')[0] === devType))
    return `${RANDOM_STATES_FILE} has no ${devType} generator state, but the run trained on ${st.device}`;
  return undefined;
}

/**
 * Reads a checkpoint's JSON state file and checks it against its schema: what resume uses instead of a bare
 * JSON.parse. Throws an Error naming the file and what is wrong.
 */
export function readStateFile<T>(dir: string, name: string): T {
  const file = path.join(dir, name);
  let value: unknown;
  try {
    value = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new Error(`${file}: cannot be read as JSON (${(e as Error).message})`);
  }
  const problem = stateFileProblem(name, value);
  if (problem) throw new Error(`${dir}: ${problem}. Pick another checkpoint (\`train-lora checkpoints list\` shows them).`);
  return value as T;
}

/** trainer_state.json of a checkpoint, checked against its schema. */
export function readTrainerState(dir: string): TrainerStateFile {
  return readStateFile<TrainerStateFile>(dir, TRAINER_STATE_FILE);
}

// ---- save / load ----

/** Throws when a weights file holds NaN or inf (a checkpoint must never keep them). */
export async function assertFiniteWeights(file: string, step: number): Promise<void> {
  const { tensors } = await native().safetensorsRead(file, { dtype: 'fp32' });
  for (const t of tensors) {
    const buf = new ArrayBuffer(t.data.byteLength);
    new Uint8Array(buf).set(t.data);
    const v = new Float32Array(buf);
    for (let i = 0; i < v.length; i++)
      if (!Number.isFinite(v[i])) throw new CheckpointError(`checkpoint-${step} not saved: ${t.name} holds non-finite values (${v[i]}); earlier checkpoints are intact`, 'ENONFINITE');
  }
}

/**
 * Writes the whole training state into `dir` (the temporary folder of CheckpointManager.save): the native trainer's
 * weights and optimizer tensors, then every JSON part (rank 0's random states, then the other ranks' staged ones from
 * `checkpointsDir`, trainer_state.json last). The native snapshot is queued synchronously, before this function first
 * awaits: it captures the trainer as it is when the save is called. Resolves with the files the trainer wrote (size,
 * sha256; for the manifest) and the JS-thread time of the JSON files.
 */
export async function saveTrainingState(
  trainer: TrainerHandle,
  dir: string,
  snapshot: TrainingSnapshot,
  checkpointsDir: string,
): Promise<{ files: TrainerStateJson['files']; jsMs: number }> {
  const cfg = snapshot.config;
  const step = snapshot.trainerState.global_step;
  // lora_rank / lora_alpha: the checkpoint's model.safetensors loads at its true strength on its own (--lora, --init-lora-weights).
  const loraMeta: Record<string, string> = cfg.train_mode === 'lora' ? { lora_rank: String(cfg.rank), lora_alpha: String(loraAlpha(cfg)) } : {};
  // conv_rank / conv_alpha: the same for 3x3 conv adapters (LoCon).
  if (cfg.train_mode === 'lora' && cfg.conv_rank !== undefined) Object.assign(loraMeta, { conv_rank: String(cfg.conv_rank), conv_alpha: String(convAlpha(cfg)) });
  const st = await native().trainerSaveState(trainer, dir, { format: 'pt', step: String(step), ...loraMeta });
  // Never a checkpoint of non-finite weights (LoRA weights are small enough to check at every save).
  if (cfg.train_mode === 'lora') await assertFiniteWeights(path.join(dir, MODEL_FILE), step);
  const c0 = Date.now();
  for (const part of STATE_PARTS) {
    const value = part.save({ snapshot, native: st });
    if (value !== undefined) writeJsonDurable(path.join(dir, part.file), value);
    if (part.perRank && snapshot.worldSize > 1) collectRankParts(checkpointsDir, step, snapshot.worldSize, dir);
  }
  return { files: st.files, jsMs: Date.now() - c0 };
}

/** What loadTrainingState read from a checkpoint (besides the weights and optimizer tensors it loaded). */
export interface LoadedTrainingState {
  randomStates: RandomStatesFile;
  scaler: TrainerStateJson['scaler'];
  optimizer: { per_parameter_steps: Record<string, number> };
  scheduler: { spec: unknown; scheduler_steps: number };
  /** Registered additional parts the checkpoint holds, by file name. */
  extra: Record<string, unknown>;
}

/**
 * Loads a checkpoint's training state into `trainer`: weights, AdamW moments and step counts (not with
 * `resetOptimizer`), loss scaler and this rank's RNG streams (rank 0's when the checkpoint has none for `rank`: every
 * rank draws the same global-batch tensors). `beforeLoad` sees the saved RNG streams before the trainer's are replaced.
 * Every JSON file is checked against its schema.
 */
export async function loadTrainingState(
  trainer: TrainerHandle,
  dir: string,
  opts: { rank: number; resetOptimizer?: boolean; beforeLoad?: (savedRng: Record<string, string>) => Promise<void> },
): Promise<LoadedTrainingState> {
  const own = randomStatesFile(opts.rank);
  const randomStates = readStateFile<RandomStatesFile>(dir, fs.existsSync(path.join(dir, own)) ? own : RANDOM_STATES_FILE);
  const scaler = readStateFile<TrainerStateJson['scaler']>(dir, SCALER_FILE);
  const optimizer = readStateFile<{ per_parameter_steps: Record<string, number> }>(dir, OPTIMIZER_FILE);
  await opts.beforeLoad?.(randomStates.torch);
  const scheduler = readStateFile<{ spec: unknown; scheduler_steps: number }>(dir, SCHEDULER_FILE);
  const extra: Record<string, unknown> = {};
  for (const p of STATE_PARTS.filter((q) => !BUILTIN_PARTS.has(q.file))) if (fs.existsSync(path.join(dir, p.file))) extra[p.file] = readStateFile(dir, p.file);
  await native().trainerLoadState(trainer, dir, {
    optimizerSteps: opts.resetOptimizer ? undefined : optimizer.per_parameter_steps,
    scaler,
    rng: randomStates.torch,
  });
  return { randomStates, scaler, optimizer, scheduler, extra };
}

// ---- per-rank checkpoint parts ----
//
// Every rank's RNG state goes into the checkpoint as random_states_<rank>.json. Ranks other than 0 write theirs
// into a staging folder `.tmp-rank<r>-checkpoint-<step>-<pid>` beside the checkpoints (the .tmp- prefix and pid
// let CheckpointManager.cleanStale remove it after a crash), then every rank meets at a barrier; rank 0 then
// moves the parts into the checkpoint before its manifest is written, and refuses to seal it if one is missing.

const PART_RE = (step: number) => new RegExp(`^\\.tmp-rank(\\d+)-checkpoint-${step}-\\d+$`);

export function writeRankPart(checkpointsDir: string, step: number, rank: number, content: unknown): void {
  fs.mkdirSync(checkpointsDir, { recursive: true });
  const dir = path.join(checkpointsDir, `.tmp-rank${rank}-checkpoint-${step}-${process.pid}`);
  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(dir);
  writeJsonDurable(path.join(dir, randomStatesFile(rank)), content);
}

/** Moves ranks 1..worldSize-1's parts of checkpoint `step` into `tmpDir`; throws naming the missing ranks. */
export function collectRankParts(checkpointsDir: string, step: number, worldSize: number, tmpDir: string): void {
  const found = new Map<number, string>();
  for (const n of fs.existsSync(checkpointsDir) ? fs.readdirSync(checkpointsDir) : []) {
    const m = PART_RE(step).exec(n);
    if (m) found.set(Number(m[1]), path.join(checkpointsDir, n));
  }
  const missing: number[] = [];
  for (let r = 1; r < worldSize; r++) {
    const f = found.has(r) ? path.join(found.get(r)!, randomStatesFile(r)) : undefined;
    if (!f || !fs.existsSync(f)) missing.push(r);
    else fs.copyFileSync(f, path.join(tmpDir, randomStatesFile(r)));
  }
  if (missing.length)
    throw new Error(`checkpoint-${step}: the random state of rank(s) ${missing.join(', ')} is missing (a rank failed during the save); the checkpoint is not sealed`);
}

/** Removes the staging folders of checkpoint `step` (after it was sealed or failed). */
export function removeRankParts(checkpointsDir: string, step: number): void {
  for (const n of fs.existsSync(checkpointsDir) ? fs.readdirSync(checkpointsDir) : [])
    if (PART_RE(step).test(n)) fs.rmSync(path.join(checkpointsDir, n), { recursive: true, force: true });
}
