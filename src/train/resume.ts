/**
 * Where a run lives and what it continues: new run folders, an earlier run's work in the folder (never mixed with,
 * never overwritten: --overwrite-output-dir moves it aside), the checkpoint to resume from (ours, `latest`, another
 * run folder, or a diffusers/accelerate checkpoint-N to import), and whether a resume's options are compatible.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import { z } from 'zod';

import { type CheckpointEntry, CheckpointError, CheckpointManager, verifyCheckpoint } from '../checkpoint/manager';
import { fsyncPath } from '../checkpoint/fsutil';
import { convAlpha, flagName, loraAlpha, textEncoderTargets, TrainConfigSchema, type TrainConfig } from '../config';
import { MANIFEST_FILE as MANIFEST, MODEL_FILE, OPTIMIZER_TENSORS_FILE, TRAINER_STATE_FILE, type TrainerStateFile } from '../checkpoint/state';
import { LORA_FILES } from '../export/lora-export';
import { native, type LoraFileFormat, type SafetensorsHeader } from '../native';
import type { LrScheduleSpec } from '../schedules/lr';
import { BUCKET_KEYS, bucketChanges } from '../data/plan';

/** Final LoRA files in `outputDir` that train-lora did not write (no train_lora.* metadata): a diffusers run's, never replaced. */
export async function foreignLoraFiles(outputDir: string, formats: readonly LoraFileFormat[]): Promise<string[]> {
  const out: string[] = [];
  for (const f of formats) {
    const file = path.join(outputDir, LORA_FILES[f]);
    if (!fs.existsSync(file)) continue;
    let ours = false;
    try {
      ours = Object.keys((await native().safetensorsHeader(file)).metadata).some((k) => k.startsWith('train_lora.'));
    } catch {
      /* unreadable: not ours either */
    }
    if (!ours) out.push(LORA_FILES[f]);
  }
  return out;
}

/** outputs/run-NNN, numbered after the highest existing one. */
export function nextRunDir(root = 'outputs'): string {
  let max = 0;
  if (fs.existsSync(root))
    for (const n of fs.readdirSync(root)) {
      const m = /^run-(\d+)$/.exec(n);
      if (m) max = Math.max(max, Number(m[1]));
    }
  return path.join(root, `run-${String(max + 1).padStart(3, '0')}`);
}

/** Where a resume starts: a train-lora checkpoint, or a diffusers/accelerate checkpoint folder (its LoRA and step only). */
export type ResumeSource = { kind: 'train-lora'; entry: CheckpointEntry } | ({ kind: 'diffusers' } & DiffusersCheckpoint);

/** A `checkpoint-N` folder written by diffusers' training scripts through accelerate's save_state. */
export interface DiffusersCheckpoint {
  path: string;
  /** N of the folder name: the optimizer steps it was saved after. */
  step: number;
  /** The LoRA file train-lora imports (safetensors; diffusers or peft keys). */
  lora: string;
  /** accelerate's pickled state (optimizer.bin, scheduler.bin, random_states_0.pkl, ...): never loaded. */
  pickles: string[];
}

const CKPT_NAME_RE = /^checkpoint-(\d+)$/;
const DIFFUSERS_LORA_FILES = ['pytorch_lora_weights.safetensors', 'adapter_model.safetensors'];
const CHECKPOINT_HINT =
  `A train-lora checkpoint is a folder OUT/checkpoints/checkpoint-<step>/ holding ${MODEL_FILE}, ${OPTIMIZER_TENSORS_FILE}, ` +
  `${TRAINER_STATE_FILE}, ... and ${MANIFEST} (written last, when the save is complete). Pass such a folder, a run folder (OUT, with checkpoints/ in it), ` +
  'a diffusers/accelerate checkpoint-<step>/ folder with pytorch_lora_weights.safetensors, or latest';

function isDir(p: string): boolean {
  try {
    return fs.statSync(p).isDirectory();
  } catch {
    return false;
  }
}

/** `dir` when it is a diffusers/accelerate checkpoint-N folder with a LoRA train-lora can import (no train-lora manifest). */
export function diffusersCheckpoint(dir: string): DiffusersCheckpoint | undefined {
  const m = CKPT_NAME_RE.exec(path.basename(dir));
  if (!m || !isDir(dir) || fs.existsSync(path.join(dir, MANIFEST))) return undefined;
  const lora = DIFFUSERS_LORA_FILES.map((f) => path.join(dir, f)).find((f) => fs.existsSync(f));
  if (!lora) return undefined;
  const pickles = fs.readdirSync(dir).filter((n) => /\.(bin|pkl|pt|pth)$/.test(n)).sort();
  return { path: dir, step: Number(m[1]), lora, pickles };
}

/** The diffusers/accelerate checkpoint folders directly in a run folder (OUT/checkpoint-N), highest step first. */
export function diffusersCheckpoints(outputDir: string): DiffusersCheckpoint[] {
  if (!isDir(outputDir)) return [];
  return fs
    .readdirSync(outputDir)
    .map((n) => diffusersCheckpoint(path.join(outputDir, n)))
    .filter((d): d is DiffusersCheckpoint => d !== undefined)
    .sort((a, b) => b.step - a.step);
}

/**
 * What keeps a diffusers checkpoint's LoRA from continuing in this run: the mode and the rank (read from the file's
 * header). Adapters on modules that are not --lora-target-modules are the native loader's error, naming the flag.
 */
export async function importProblems(d: DiffusersCheckpoint, cfg: TrainConfig): Promise<string[]> {
  if (cfg.train_mode !== 'lora') return [`--train-mode is ${cfg.train_mode}, but a diffusers/accelerate checkpoint holds LoRA weights only: import it with --train-mode lora`];
  let header: SafetensorsHeader;
  try {
    header = await native().safetensorsHeader(d.lora);
  } catch (e) {
    return [`${d.lora} is not a readable safetensors file (${(e as Error).message})`];
  }
  // (a Linear or 1x1-conv adapter: 3x3 conv adapters have --conv-rank)
  const down = header.tensors.find(
    (t) => !/^(text_encoder|lora_te)/.test(t.name) && /(\.lora\.down|\.lora_A|\.lora_down|lora_linear_layer\.down)(\.default)?\.weight$/.test(t.name) && (t.shape.length === 2 || (t.shape[2] === 1 && t.shape[3] === 1)),
  );
  if (!down) return [`${d.lora} holds no UNet LoRA weights (no lora.down / lora_A keys)`];
  const rank = down.shape[0];
  return rank === cfg.rank ? [] : [`--rank is ${cfg.rank}, but the LoRA in ${path.basename(d.lora)} has rank ${rank}: pass --rank ${rank}`];
}

/** The same resolved LR schedule (a checkpoint's, and the one the options give now). */
export function sameSchedule(a: LrScheduleSpec, b: LrScheduleSpec): boolean {
  return (['kind', 'baseLr', 'warmupSteps', 'totalSteps', 'numCycles', 'power', 'lrEnd', 'stepRules'] as const).every((k) => (a[k] ?? null) === (b[k] ?? null));
}

/** What a folder that is not a checkpoint is, for the error that refuses to resume from it. */
function describeNonCheckpoint(p: string): string {
  const names = fs.readdirSync(p).filter((n) => !n.startsWith('.'));
  const base = path.basename(p);
  if (base.startsWith('.tmp-')) return `${p} is the temporary folder of a save that was interrupted, not a checkpoint`;
  if (names.length === 0) return `${p} is an empty folder, not a checkpoint`;
  if (names.includes(TRAINER_STATE_FILE) || (names.includes(MODEL_FILE) && names.includes(OPTIMIZER_TENSORS_FILE)))
    return `${p} holds checkpoint files but no ${MANIFEST}: its save did not finish (or ${MANIFEST} was removed), so it is not a complete checkpoint`;
  if (names.includes('model_index.json') || (names.includes('unet') && names.includes('vae'))) return `${p} is a model folder (a diffusers pipeline), not a checkpoint`;
  if (CKPT_NAME_RE.test(base) && names.some((n) => /lora.*\.bin$|^adapter_model\.bin$/.test(n)))
    return `${p} is a diffusers/accelerate checkpoint whose LoRA is only a pickle (${names.filter((n) => n.endsWith('.bin')).join(', ')}), and train-lora never loads pickles; save the LoRA as safetensors (diffusers' save_lora_weights) and pass the folder again`;
  return `${p} is not a checkpoint (it holds ${names.slice(0, 6).join(', ')}${names.length > 6 ? ', ...' : ''})`;
}

/** The run id and step of every checkpoint-N folder in OUT/checkpoints (run id undefined: made before run ids, or unreadable). */
export function checkpointRuns(mgr: CheckpointManager): Array<{ name: string; step: number; runId?: string }> {
  if (!isDir(mgr.dir)) return [];
  const out: Array<{ name: string; step: number; runId?: string }> = [];
  for (const name of fs.readdirSync(mgr.dir)) {
    const m = CKPT_NAME_RE.exec(name);
    if (!m) continue;
    let runId: string | undefined;
    try {
      const v = (readJson<{ run_id?: unknown }>(path.join(mgr.dir, name, TRAINER_STATE_FILE))).run_id;
      if (typeof v === 'string') runId = v;
    } catch {
      /* no trainer_state.json, or unreadable: no run id */
    }
    out.push({ name, step: Number(m[1]), runId });
  }
  return out.sort((a, b) => a.step - b.step);
}

/** `latest` of a run folder, refusing when its checkpoints belong to more than one run (which one is meant is unclear). */
async function latestOfOneRun(mgr: CheckpointManager, report: (e: CheckpointEntry) => void): Promise<CheckpointEntry | undefined> {
  const runs = new Map<string, number[]>();
  const valid = new Set((await mgr.list('quick')).filter((e) => e.valid).map((e) => e.name));
  for (const c of checkpointRuns(mgr)) if (c.runId && valid.has(c.name)) runs.set(c.runId, [...(runs.get(c.runId) ?? []), c.step]);
  if (runs.size > 1)
    throw new CheckpointError(
      `${mgr.dir} holds the checkpoints of ${runs.size} different runs (${[...runs].map(([id, steps]) => `run ${id}: step ${steps.join(', ')}`).join('; ')}), ` +
        `so "latest" cannot tell which run to continue. Pass the checkpoint to continue: --resume-from-checkpoint ${path.join(mgr.dir, 'checkpoint-<step>')}`,
      'EMIXEDRUNS',
    );
  return mgr.latest(report);
}

/** Finds the checkpoint a `--resume-from-checkpoint` value names. */
export async function resolveResume(value: string, mgr: CheckpointManager, strict: boolean, warn: (m: string) => void): Promise<ResumeSource | undefined> {
  const report = (e: CheckpointEntry) => {
    const msg = `skipping ${e.path}: ${e.problem}`;
    if (strict) throw new CheckpointError(`${msg} (--strict-resume)`, 'EBADCKPT');
    warn(msg);
  };
  if (value === 'latest') {
    const e = await latestOfOneRun(mgr, report);
    const d = diffusersCheckpoints(mgr.outputDir)[0];
    if (e) {
      if (d && d.step > e.step)
        warn(`${d.path} (a diffusers/accelerate checkpoint, step ${d.step}) is further than ${e.path}; continuing train-lora's own checkpoint (pass --resume-from-checkpoint ${d.path} to import that one instead)`);
      return { kind: 'train-lora', entry: e };
    }
    return d ? { kind: 'diffusers', ...d } : undefined;
  }
  const p = path.resolve(value);
  if (!fs.existsSync(p)) throw new CheckpointError(`--resume-from-checkpoint ${value}: no such checkpoint or run folder`, 'ENOENT');
  if (!isDir(p)) throw new CheckpointError(`--resume-from-checkpoint ${value}: ${p} is a file, not a checkpoint folder. ${CHECKPOINT_HINT}`, 'ENOTCKPT');
  const runFolder = isDir(path.join(p, 'checkpoints'));
  if (runFolder) {
    // Another run's output folder: its latest valid checkpoint.
    const e = await latestOfOneRun(new CheckpointManager(p), report);
    if (e) return { kind: 'train-lora', entry: e };
  }
  const d = diffusersCheckpoint(p) ?? diffusersCheckpoints(p)[0];
  if (d) return { kind: 'diffusers', ...d };
  if (runFolder) throw new CheckpointError(`--resume-from-checkpoint ${value}: that run has no valid checkpoint`, 'ENOENT');
  if (!fs.existsSync(path.join(p, MANIFEST))) throw new CheckpointError(`--resume-from-checkpoint ${value}: ${describeNonCheckpoint(p)}. ${CHECKPOINT_HINT}`, 'ENOTCKPT');
  const e = await verifyCheckpoint(p);
  if (!e.valid) throw new CheckpointError(`--resume-from-checkpoint ${value}: ${e.problem}`, 'EBADCKPT');
  return { kind: 'train-lora', entry: e };
}

/** Names (relative to the run folder) of the work of an earlier run that a new run would mix with or overwrite. */
const EARLIER_RUN_FILES = ['pytorch_lora_weights.safetensors', 'lora_weights', 'lora_kohya.safetensors', 'final_pipeline', 'unet'];
/** Moved aside with them by --overwrite-output-dir (they describe that run), but no reason to refuse by themselves. */
export const EARLIER_RUN_COMPANIONS = ['exports', 'validation'];

/** What an earlier run left in `outputDir` that a new run there would mix with (checkpoints) or overwrite (its LoRA files). */
export function earlierRunWork(outputDir: string): string[] {
  if (!isDir(outputDir)) return [];
  const found: string[] = [];
  const ck = path.join(outputDir, 'checkpoints');
  if (isDir(ck) && fs.readdirSync(ck).some((n) => CKPT_NAME_RE.test(n))) found.push('checkpoints');
  for (const n of fs.readdirSync(outputDir).sort()) if (CKPT_NAME_RE.test(n) && isDir(path.join(outputDir, n))) found.push(n);
  for (const n of EARLIER_RUN_FILES) if (fs.existsSync(path.join(outputDir, n))) found.push(n);
  return found;
}

export function describeWork(outputDir: string, names: readonly string[]): string {
  return names
    .map((n) => {
      if (n !== 'checkpoints') return CKPT_NAME_RE.test(n) ? `${n}/ (diffusers/accelerate)` : n;
      const runs = checkpointRuns(new CheckpointManager(outputDir));
      const ids = [...new Set(runs.map((r) => r.runId).filter(Boolean))];
      return `checkpoints/ (${runs.map((r) => r.name).join(', ')}${ids.length ? `; run ${ids.join(', ')}` : ''})`;
    })
    .join(', ');
}

/**
 * --overwrite-output-dir: moves `names` (paths relative to the run folder) into OUT/previous/<time>/, keeping their
 * relative paths. Nothing is deleted; returns the folder they went to.
 */
export function moveAside(outputDir: string, names: readonly string[]): string {
  const dest = path.join(outputDir, 'previous', new Date().toISOString().replace(/[:.]/g, '-'));
  for (const n of names) {
    const to = path.join(dest, n);
    fs.mkdirSync(path.dirname(to), { recursive: true });
    fs.renameSync(path.join(outputDir, n), to);
    fsyncPath(path.dirname(path.join(outputDir, n)));
  }
  fsyncPath(dest);
  return dest;
}

/**
 * The output folder is usable: it does not exist yet (it will be created), or it is a folder. A file in its place or
 * on its path is an error naming it and the fix (instead of mkdir's raw ENOTDIR / EEXIST).
 */
export function checkOutputDir(dir: string): void {
  const abs = path.resolve(dir);
  for (let p = abs; ; p = path.dirname(p)) {
    let st: fs.Stats | undefined;
    try {
      st = fs.statSync(p);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'ENOTDIR') continue; // a file further up: found on the next iteration
      if (code !== 'ENOENT') throw e;
    }
    if (st && !st.isDirectory())
      throw new CheckpointError(
        p === abs
          ? `--output-dir ${dir}: ${abs} is a file, not a folder. Pass a folder for the run (it is created if missing), or move the file away.`
          : `--output-dir ${dir}: ${p} is a file, so the folder ${abs} cannot be created inside it. Pass another --output-dir, or move the file away.`,
        'ENOTDIR',
      );
    if (st || path.dirname(p) === p) return;
  }
}

function readJson<T>(file: string): T {
  return JSON.parse(fs.readFileSync(file, 'utf8')) as T;
}

/** Differences between a checkpoint's run and this one that make resuming wrong, with the flag that accepts them. */
export function compatibilityProblems(prev: TrainerStateFile, cfg: TrainConfig, modelFp: string, dataFp: string): string[] {
  const problems: string[] = [];
  if (prev.base_model.fingerprint !== modelFp)
    problems.push(`the base model differs (checkpoint: ${prev.base_model.path}, now: ${cfg.pretrained_model_name_or_path})`);
  const p = prev.config;
  if (p.train_mode !== cfg.train_mode) problems.push(`--train-mode was ${p.train_mode}, now ${cfg.train_mode}`);
  if (cfg.train_mode === 'lora') {
    if (p.rank !== cfg.rank) problems.push(`--rank was ${p.rank}, now ${cfg.rank}`);
    if ((p.lora_alpha ?? p.rank) !== loraAlpha(cfg)) problems.push(`--lora-alpha was ${p.lora_alpha ?? p.rank}, now ${loraAlpha(cfg)}`);
    if (p.lora_target_modules.join(',') !== cfg.lora_target_modules.join(','))
      problems.push(`--lora-target-modules was ${p.lora_target_modules.join(',')}, now ${cfg.lora_target_modules.join(',')}`);
    // The text encoder's adapters are part of the checkpoint's trainable state (a checkpoint before 0.3 has none).
    if ((p.train_text_encoder ?? false) !== cfg.train_text_encoder)
      problems.push(`--train-text-encoder was ${p.train_text_encoder ? 'on' : 'off'}, now ${cfg.train_text_encoder ? 'on' : 'off'}: the checkpoint ${p.train_text_encoder ? 'holds' : 'has no'} text-encoder adapters`);
    else if (cfg.train_text_encoder && textEncoderTargets(p).join(',') !== textEncoderTargets(cfg).join(','))
      problems.push(`--text-encoder-target-modules was ${textEncoderTargets(p).join(',')}, now ${textEncoderTargets(cfg).join(',')}`);
    if (changed(p, cfg, 'lora_target_preset')) problems.push(`--lora-target-preset was ${show(p.lora_target_preset)}, now ${show(cfg.lora_target_preset)}`);
    if (changed(p, cfg, 'conv_rank')) problems.push(`--conv-rank was ${show(p.conv_rank)}, now ${show(cfg.conv_rank)}`);
    if (convAlpha(p as TrainConfig) !== convAlpha(cfg))
      problems.push(`--conv-alpha was ${show(convAlpha(p as TrainConfig))}, now ${show(convAlpha(cfg))}`);
  }
  if (prev.dataset.fingerprint !== dataFp && !cfg.allow_dataset_change)
    problems.push(`the dataset changed since the checkpoint (${prev.dataset.path}); pass --allow-dataset-change to continue on the new data`);
  if (p.seed !== undefined && p.seed !== cfg.seed)
    problems.push(`--seed was ${p.seed}, now ${cfg.seed}: the data order and augmentation of the checkpoint's epoch come from its seed; resume with --seed ${p.seed}, or start a new run`);
  const buckets = bucketChanges(p, cfg);
  if (buckets.length)
    problems.push(`the aspect-ratio buckets differ (${buckets.join(', ')}): they decide the data order of the checkpoint's epoch; resume with the checkpoint's bucket settings, or start a new run`);
  if (changed(p, cfg, 'validation_split') && !cfg.allow_dataset_change)
    problems.push(`--validation-split was ${show(p.validation_split)}, now ${show(cfg.validation_split)}: the training images differ; pass --allow-dataset-change to continue on the new split`);
  return problems;
}

/** Options of one invocation, not of the training: a resume changes them without a note. */
const PER_INVOCATION: ReadonlySet<string> = new Set(['output_dir', 'resume_from_checkpoint', 'strict_resume', 'reset_optimizer', 'allow_dataset_change', 'overwrite_output_dir', 'log_level']);
/**
 * Compared on their own: model and data by fingerprint, mode / rank / alpha / targets / seed / split as compatibility
 * problems, the device by crossDeviceNotes, the processes by the world-size note, the LoRA init is unused on resume.
 */
const COMPARED_ELSEWHERE: ReadonlySet<string> = new Set([
  'pretrained_model_name_or_path', 'train_data_dir', 'max_train_samples', 'train_mode', 'rank', 'lora_alpha', 'lora_target_modules', 'lora_target_preset', 'conv_rank', 'conv_alpha', 'seed', 'validation_split',
  'train_text_encoder', 'text_encoder_target_modules',
  'device', 'num_processes', 'nnodes', 'node_rank', 'master_addr', 'master_port', 'dist_backend', 'dist_timeout', 'init_lora_weights',
  ...BUCKET_KEYS,
]);
/** What the LR schedule is built from. */
const SCHEDULE_KEYS = ['learning_rate', 'scale_lr', 'lr_scheduler', 'lr_warmup_steps', 'lr_num_cycles', 'lr_power', 'max_train_steps'] as const;
/** The global batch. */
const BATCH_KEYS = ['train_batch_size', 'gradient_accumulation_steps'] as const;

const show = (v: unknown): string => (v === undefined ? 'unset' : Array.isArray(v) ? v.join(',') : String(v));
/** The option differs between the checkpoint's configuration and this one (an option the checkpoint predates does not). */
function changed(prev: TrainConfig, cfg: TrainConfig, key: string): boolean {
  const b = (cfg as Record<string, unknown>)[key];
  // An option with a default is in every configuration that knew it: absent, the checkpoint predates it.
  if (!(key in prev) && TrainConfigSchema.innerType().shape[key as keyof TrainConfig] instanceof z.ZodDefault) return false;
  return JSON.stringify((prev as Record<string, unknown>)[key]) !== JSON.stringify(b);
}
const changeText = (prev: TrainConfig, cfg: TrainConfig, key: string): string =>
  `${flagName(key)} ${show((prev as Record<string, unknown>)[key])} -> ${show((cfg as Record<string, unknown>)[key])}`;

/**
 * Every option a resume changes, by how it is applied: the LR schedule is rebuilt, the global batch changes, or the
 * rest takes effect from the next step. (Changes that cannot be applied are compatibilityProblems.)
 */
export function resumeChanges(prev: TrainConfig, cfg: TrainConfig): { schedule: string[]; batch: string[]; other: string[] } {
  const out = { schedule: [] as string[], batch: [] as string[], other: [] as string[] };
  for (const key of Object.keys(cfg).sort()) {
    if (PER_INVOCATION.has(key) || COMPARED_ELSEWHERE.has(key) || !changed(prev, cfg, key)) continue;
    const group = (SCHEDULE_KEYS as readonly string[]).includes(key) ? out.schedule : (BATCH_KEYS as readonly string[]).includes(key) ? out.batch : out.other;
    group.push(changeText(prev, cfg, key));
  }
  return out;
}

/**
 * What a resume on another device cannot continue bit-exactly: the random streams of the checkpoint's device are not
 * this device's. Weights, optimizer, LR schedule, loss scaler and the data position carry over exactly either way.
 */
export function crossDeviceNotes(prev: Pick<TrainerStateFile, 'device' | 'config'>, saved: Record<string, string>, device: string, here: Record<string, string>): string[] {
  const notes: string[] = [];
  const before = prev.device ?? (prev.config.device === 'auto' ? undefined : prev.config.device);
  const type = (d: string) => d.split(':')[0];
  if (before && type(before) !== type(device))
    notes.push(
      `this checkpoint was trained on ${before} and resumes on ${device}: weights, optimizer, LR schedule, loss scaler and data position continue exactly, ` +
        `but noise and timesteps now come from ${type(device)}'s random generator, so the run will not be bit-identical to one that stayed on ${before}`,
    );
  const lost = Object.keys(saved).filter((k) => !(k in here));
  if (lost.length && !notes.length)
    notes.push(`random streams ${lost.join(', ')} of the checkpoint do not exist on this machine and are not restored (a run on them is not continued bit-exactly)`);
  return notes;
}
