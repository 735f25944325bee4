/**
 * The training configuration: one zod schema with defaults for LoRA fine-tuning of SD 1.5 on one GPU. Values come
 * from, in increasing precedence: defaults, `--config FILE.json` (diffusers' snake_case keys), command-line flags
 * (kebab-case, snake_case accepted as aliases). Every problem is reported at once, naming the flag.
 */
import * as fs from 'node:fs';

import { z } from 'zod';

import { SCHEDULER_NAMES } from './inference/schedulers';
import { LR_SCHEDULE_KINDS } from './train/schedules/lr';
import type { DatasetOptions } from './data/dataset';

const positiveInt = z.number().int().positive();
const nonNegInt = z.number().int().nonnegative();

export const TrainConfigSchema = z
  .object({
    // Model
    pretrained_model_name_or_path: z.string().min(1),
    variant: z.string().optional(),
    device: z.string().default('auto'),
    // Data
    train_data_dir: z.string().min(1),
    caption_column: z.string().optional(),
    image_column: z.string().optional(),
    max_train_samples: positiveInt.optional(),
    resolution: positiveInt.default(512),
    center_crop: z.boolean().default(false),
    random_flip: z.boolean().default(false),
    image_interpolation_mode: z.enum(['lanczos', 'bilinear', 'bicubic', 'nearest', 'area']).default('lanczos'),
    skip_bad_images: z.boolean().default(false),
    skip_uncaptioned: z.boolean().default(false),
    caption_dropout_rate: z.number().min(0).max(1).default(0),
    dataset_layout: z.enum(['captions.json', 'metadata.jsonl', 'txt']).optional(),
    image_resampler: z.enum(['auto', 'sharp', 'pil']).default('auto'),
    cache_latents: z.boolean().default(false),
    dataloader_num_workers: nonNegInt.default(2),
    // Training
    train_mode: z.enum(['lora', 'full']).default('lora'),
    rank: positiveInt.default(8),
    lora_alpha: z.number().positive().optional(),
    lora_dropout: z.number().min(0).max(1).default(0),
    lora_target_modules: z.array(z.string().min(1)).min(1).default(['to_k', 'to_q', 'to_v', 'to_out.0']),
    init_lora_weights: z.string().optional(),
    train_batch_size: positiveInt.default(2),
    gradient_accumulation_steps: positiveInt.default(8),
    max_train_steps: positiveInt.default(3000),
    learning_rate: z.number().positive().default(1e-4),
    scale_lr: z.boolean().default(false),
    lr_scheduler: z.enum(LR_SCHEDULE_KINDS as unknown as [string, ...string[]]).default('cosine'),
    lr_warmup_steps: nonNegInt.default(500),
    lr_num_cycles: z.number().positive().default(1),
    lr_power: z.number().positive().default(1.0),
    adam_beta1: z.number().min(0).lt(1).default(0.9),
    adam_beta2: z.number().min(0).lt(1).default(0.999),
    adam_weight_decay: z.number().min(0).default(1e-2),
    adam_epsilon: z.number().positive().default(1e-8),
    max_grad_norm: z.number().default(1.0),
    /** Stop after this many optimizer steps in a row with non-finite loss or gradients (each one is skipped). */
    max_nonfinite_steps: positiveInt.default(10),
    seed: nonNegInt.default(42),
    prediction_type: z.enum(['epsilon', 'v_prediction']).optional(),
    noise_offset: z.number().min(0).default(0),
    snr_gamma: z.number().positive().optional(),
    // Precision & memory
    mixed_precision: z.enum(['auto', 'no', 'fp16', 'bf16']).default('auto'),
    allow_tf32: z.boolean().default(false),
    gradient_checkpointing: z.boolean().default(false),
    cuda_graphs: z.boolean().default(false),
    // Distributed (data parallel; see src/distributed/)
    num_processes: positiveInt.default(1),
    nnodes: positiveInt.default(1),
    node_rank: nonNegInt.default(0),
    master_addr: z.string().min(1).optional(),
    master_port: z.number().int().min(1).max(65535).optional(),
    dist_backend: z.enum(['auto', 'gloo', 'nccl']).default('auto'),
    dist_timeout: z.number().positive().default(1800),
    // Checkpointing
    output_dir: z.string().optional(),
    checkpointing_steps: positiveInt.default(500),
    /** Also save when this many minutes of wall-clock time passed since the last save. */
    checkpointing_minutes: z.number().positive().optional(),
    checkpoints_total_limit: positiveInt.default(5),
    checkpoint_every_epoch: z.boolean().default(false),
    resume_from_checkpoint: z.string().optional(),
    strict_resume: z.boolean().default(false),
    reset_optimizer: z.boolean().default(false),
    allow_dataset_change: z.boolean().default(false),
    on_save_error: z.enum(['stop', 'continue']).default('stop'),
    monitor: z.enum(['train_loss', 'val_loss']).default('train_loss'),
    monitor_mode: z.enum(['min', 'max']).default('min'),
    stage: z.string().min(1).optional(),
    /** Start a new run in an output folder that holds another run's checkpoints or LoRA: move them aside first. */
    overwrite_output_dir: z.boolean().default(false),
    // Validation
    validation_prompt: z.array(z.string()).default([]),
    validation_prompts_file: z.string().optional(),
    num_validation_images: nonNegInt.default(4),
    validation_steps: positiveInt.default(500),
    validation_epochs: positiveInt.optional(),
    validation_before_training: z.boolean().default(false),
    validation_negative_prompt: z.string().default(''),
    validation_scheduler: z.enum(SCHEDULER_NAMES).default('pndm'),
    validation_num_inference_steps: positiveInt.default(30),
    validation_guidance_scale: z.number().min(0).default(7.5),
    validation_seed: nonNegInt.optional(),
    validation_resolution: positiveInt.optional(),
    validation_split: z.number().gt(0).lt(1).optional(),
    validation_data_dir: z.string().min(1).optional(),
    // Output & logging
    save_format: z.array(z.enum(['diffusers', 'peft', 'kohya'])).default(['diffusers', 'peft']),
    merge: z.boolean().default(false),
    log_level: z.enum(['trace', 'debug', 'info', 'warn', 'error']).default('info'),
  })
  .strict()
  .superRefine((c, ctx) => {
    if (c.validation_split !== undefined && c.validation_data_dir !== undefined)
      ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['validation_split'], message: 'use --validation-split or --validation-data-dir, not both' });
    if (c.monitor === 'val_loss' && c.validation_split === undefined && c.validation_data_dir === undefined)
      ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['monitor'], message: 'val_loss needs held-out images: add --validation-split 0.1 or --validation-data-dir DIR' });
    if (c.validation_resolution !== undefined && c.validation_resolution % 8 !== 0)
      ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['validation_resolution'], message: 'must be a multiple of 8' });
  });

export type TrainConfig = z.infer<typeof TrainConfigSchema>;
export type TrainConfigInput = z.input<typeof TrainConfigSchema>;

export class ConfigError extends Error {
  override name = 'ConfigError';
  constructor(readonly problems: string[]) {
    super(`invalid configuration:\n  - ${problems.join('\n  - ')}`);
  }
}

export const flagName = (key: string): string => `--${key.replace(/_/g, '-')}`;

/** Validates a merged config, reporting every problem with the flag it belongs to. */
export function parseTrainConfig(input: Record<string, unknown>): TrainConfig {
  const r = TrainConfigSchema.safeParse(input);
  if (r.success) return r.data;
  const problems = r.error.issues.map((i) => {
    const key = String(i.path[0] ?? '');
    if (i.code === 'unrecognized_keys') return `unknown option(s): ${i.keys.map(flagName).join(', ')}`;
    if (i.code === 'invalid_enum_value') return `${flagName(key)}: "${String(i.received)}" is not one of ${i.options.join(', ')}`;
    if (i.code === 'invalid_type' && i.received === 'undefined') return `${flagName(key)} is required`;
    return `${flagName(key)}: ${i.message}`;
  });
  throw new ConfigError(problems);
}

/** Other spellings of our keys found in training configs (kohya / older scripts). */
export const CONFIG_KEY_ALIASES: Record<string, string> = { lora_rank: 'rank', network_dim: 'rank', network_alpha: 'lora_alpha', model: 'pretrained_model_name_or_path' };

/** diffusers train_text_to_image_lora.py options that have no meaning here (hub, trackers, xformers ...). */
export const IGNORED_DIFFUSERS_KEYS = new Set([
  'report_to', 'logging_dir', 'revision', 'push_to_hub', 'hub_token', 'hub_model_id', 'local_rank', 'cache_dir',
  'enable_xformers_memory_efficient_attention', 'use_8bit_adam', 'tracker_project_name', 'dataset_config_name', 'dataset_name',
  'num_train_epochs',
]);

/** Reads a training_config.json (snake_case keys, as diffusers' scripts use). */
export function readConfigFile(file: string): Record<string, unknown> {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw new ConfigError([`--config ${file}: cannot read (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`]);
  }
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new ConfigError([`--config ${file}: not valid JSON (${(e as Error).message})`]);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new ConfigError([`--config ${file}: must hold a JSON object of options`]);
  const out: Record<string, unknown> = {};
  const ignored: string[] = [];
  for (const [k0, val] of Object.entries(v as Record<string, unknown>)) {
    const k = k0.replace(/-/g, '_');
    if (IGNORED_DIFFUSERS_KEYS.has(k)) ignored.push(k);
    else out[CONFIG_KEY_ALIASES[k] ?? k] = val;
  }
  if (ignored.length) process.stderr.write(`train-lora: ${file}: ignoring options that do not apply here: ${ignored.join(', ')}\n`);
  return out;
}

/** Effective LoRA alpha: the given one, or the rank (diffusers' script uses lora_alpha = rank). */
export function loraAlpha(c: TrainConfig): number {
  return c.lora_alpha ?? c.rank;
}

/**
 * The dataset options a configuration means: training, test-setup and `checkpoints export` (kohya tag frequency)
 * must read the same images the same way.
 */
export function datasetOptions(cfg: TrainConfig): DatasetOptions {
  return {
    captionColumn: cfg.caption_column,
    imageColumn: cfg.image_column,
    skipBadImages: cfg.skip_bad_images,
    skipUncaptioned: cfg.skip_uncaptioned,
    layout: cfg.dataset_layout,
    maxTrainSamples: cfg.max_train_samples,
    seed: cfg.seed,
  };
}

