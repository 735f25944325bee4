/**
 * The training configuration: one zod schema with defaults for LoRA fine-tuning of SD 1.5 on one GPU. Values come
 * from, in increasing precedence: defaults, `--config FILE.json` (diffusers' snake_case keys), command-line flags
 * (kebab-case, snake_case accepted as aliases). Every problem is reported at once, naming the flag.
 */
import * as fs from 'node:fs';

import { z } from 'zod';

import { SCHEDULER_NAMES } from './inference/schedulers';
import { LR_SCHEDULE_KINDS } from './schedules/lr';
import type { DatasetOptions } from './data/dataset';

const positiveInt = z.number().int().positive();

/**
 * --lora-target-preset: UNet module names (peft's suffix match) of each preset. kohya is sd-scripts' default SD1 set
 * (every Linear and 1x1 Conv2d inside a Transformer2DModel: 192 modules in SD 1.5); full adds what sd-scripts adapts
 * with conv_dim (LoCon): every ResnetBlock2D's conv1/conv2 (3x3, --conv-rank/--conv-alpha), conv_shortcut (1x1) and
 * time_emb_proj (Linear; both --rank/--lora-alpha, as sd-scripts sizes them), and the down/upsampler convs (3x3).
 */
export const LORA_TARGET_PRESETS = {
  attn: ['to_k', 'to_q', 'to_v', 'to_out.0'],
  'attn-ff': ['to_k', 'to_q', 'to_v', 'to_out.0', 'ff.net.0.proj', 'ff.net.2'],
  kohya: ['to_k', 'to_q', 'to_v', 'to_out.0', 'ff.net.0.proj', 'ff.net.2', 'proj_in', 'proj_out'],
  full: ['to_k', 'to_q', 'to_v', 'to_out.0', 'ff.net.0.proj', 'ff.net.2', 'proj_in', 'proj_out', 'conv1', 'conv2', 'conv_shortcut', 'time_emb_proj', 'downsamplers.0.conv', 'upsamplers.0.conv'],
} as const;
export const LORA_TARGET_PRESET_NAMES = ['attn', 'attn-ff', 'kohya', 'full'] as const;
export type LoraTargetPreset = (typeof LORA_TARGET_PRESET_NAMES)[number];
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
    // Aspect-ratio buckets, masked loss, caption tags (kohya's flag names; src/data/buckets.ts, captions.ts)
    enable_bucket: z.boolean().default(false),
    min_bucket_reso: positiveInt.default(256),
    max_bucket_reso: positiveInt.default(1024),
    bucket_reso_steps: positiveInt.default(64),
    bucket_no_upscale: z.boolean().default(false),
    masked_loss: z.boolean().default(false),
    alpha_mask: z.boolean().default(false),
    mask_dir: z.string().min(1).optional(),
    shuffle_caption: z.boolean().default(false),
    keep_tokens: nonNegInt.default(0),
    keep_tokens_separator: z.string().min(1).optional(),
    caption_extension: z.string().min(1).default('.txt'),
    // Training
    train_mode: z.enum(['lora', 'full']).default('lora'),
    rank: positiveInt.default(8),
    lora_alpha: z.number().positive().optional(),
    lora_dropout: z.number().min(0).max(1).default(0),
    lora_target_modules: z.array(z.string().min(1)).min(1).default(['to_k', 'to_q', 'to_v', 'to_out.0']),
    lora_target_preset: z.enum(LORA_TARGET_PRESET_NAMES).optional(),
    conv_rank: positiveInt.optional(),
    conv_alpha: z.number().positive().optional(),
    init_lora_weights: z.string().optional(),
    /** LoRA on the text encoder too (same --rank / --lora-alpha / --lora-dropout), in its own AdamW param group. */
    train_text_encoder: z.boolean().default(false),
    /** Text-encoder Linear modules that get adapters (needs --train-text-encoder); default TEXT_ENCODER_TARGETS. */
    text_encoder_target_modules: z.array(z.string().min(1)).min(1).optional(),
    /** The text encoder's learning rate (needs --train-text-encoder); default the (scaled) --learning-rate. */
    text_encoder_lr: z.number().positive().optional(),
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
    if (c.train_text_encoder && c.train_mode !== 'lora')
      ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['train_text_encoder'], message: 'trains LoRA adapters on the text encoder: it needs --train-mode lora (--train-mode full trains the UNet only)' });
    for (const k of ['text_encoder_target_modules', 'text_encoder_lr'] as const)
      if (c[k] !== undefined && !c.train_text_encoder)
        ctx.addIssue({ code: z.ZodIssueCode.custom, path: [k], message: 'applies to the text encoder\'s adapters: add --train-text-encoder (or leave it out)' });
    if (c.lora_target_preset === 'full' && c.conv_rank === undefined)
      ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['lora_target_preset'], message: 'full adapts the 3x3 convolutions of every ResNet block and down/upsampler: give their rank with --conv-rank (kohya\'s conv_dim), or use --lora-target-preset kohya' });
    if (c.conv_rank !== undefined && c.lora_target_preset !== undefined && c.lora_target_preset !== 'full')
      ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['conv_rank'], message: `--lora-target-preset ${c.lora_target_preset} has no 3x3 convolution for --conv-rank: use --lora-target-preset full (kohya's set + LoCon)` });
    for (const k of ['lora_target_preset', 'conv_rank', 'conv_alpha'] as const)
      if (c.train_mode === 'full' && c[k] !== undefined)
        ctx.addIssue({ code: z.ZodIssueCode.custom, path: [k], message: '--train-mode full trains every UNet weight and has no LoRA targets: drop it, or use --train-mode lora' });
    if (c.conv_alpha !== undefined && c.conv_rank === undefined)
      ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['conv_alpha'], message: 'needs --conv-rank (the rank of 3x3 conv adapters)' });
    if (c.validation_resolution !== undefined && c.validation_resolution % 8 !== 0)
      ctx.addIssue({ code: z.ZodIssueCode.custom, path: ['validation_resolution'], message: 'must be a multiple of 8' });
    for (const issue of dataFlagProblems(c)) ctx.addIssue({ code: z.ZodIssueCode.custom, path: [issue.key], message: issue.message });
  });

/** Bucket, mask and caption flags that only work together (every one of them must do what it says, or be refused). */
function dataFlagProblems(c: {
  enable_bucket: boolean; min_bucket_reso: number; max_bucket_reso: number; bucket_reso_steps: number; bucket_no_upscale: boolean;
  masked_loss: boolean; alpha_mask: boolean; mask_dir?: string; shuffle_caption: boolean; keep_tokens: number; keep_tokens_separator?: string;
}): Array<{ key: string; message: string }> {
  const out: Array<{ key: string; message: string }> = [];
  if (!c.enable_bucket) {
    const set = [
      c.min_bucket_reso !== 256 && 'min_bucket_reso', c.max_bucket_reso !== 1024 && 'max_bucket_reso', c.bucket_reso_steps !== 64 && 'bucket_reso_steps', c.bucket_no_upscale && 'bucket_no_upscale',
    ].filter((k): k is string => typeof k === 'string');
    for (const k of set) out.push({ key: k, message: 'only applies to aspect-ratio buckets: add --enable-bucket (or drop the flag)' });
  }
  if (c.min_bucket_reso > c.max_bucket_reso)
    out.push({ key: 'min_bucket_reso', message: `${c.min_bucket_reso} is larger than --max-bucket-reso ${c.max_bucket_reso}: make the minimum <= the maximum` });
  if (c.masked_loss && !c.alpha_mask && c.mask_dir === undefined)
    out.push({ key: 'masked_loss', message: 'needs masks: add --alpha-mask (the images\' alpha channel) or --mask-dir DIR (same-name mask images)' });
  if (c.alpha_mask && c.mask_dir !== undefined) out.push({ key: 'alpha_mask', message: 'use --alpha-mask or --mask-dir, not both' });
  if (!c.masked_loss && c.alpha_mask) out.push({ key: 'alpha_mask', message: 'only weights the loss with --masked-loss: add --masked-loss (or drop the flag)' });
  if (!c.masked_loss && c.mask_dir !== undefined) out.push({ key: 'mask_dir', message: 'only weights the loss with --masked-loss: add --masked-loss (or drop the flag)' });
  if (!c.shuffle_caption && c.keep_tokens > 0) out.push({ key: 'keep_tokens', message: 'keeps leading tags in place while the others are shuffled: add --shuffle-caption (or drop the flag)' });
  if (!c.shuffle_caption && c.keep_tokens_separator !== undefined)
    out.push({ key: 'keep_tokens_separator', message: 'marks the tags kept in place while the others are shuffled: add --shuffle-caption (or drop the flag)' });
  return out;
}

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
export const CONFIG_KEY_ALIASES: Record<string, string> = { lora_rank: 'rank', network_dim: 'rank', network_alpha: 'lora_alpha', conv_dim: 'conv_rank', model: 'pretrained_model_name_or_path' };

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

/** The text encoder's LoRA targets by default: its attention projections (diffusers' dreambooth LoRA scripts; kohya's attention set). */
export const TEXT_ENCODER_TARGETS: readonly string[] = ['q_proj', 'k_proj', 'v_proj', 'out_proj'];

/** The text encoder's LoRA targets of a run that trains it (--text-encoder-target-modules or the default). */
export function textEncoderTargets(c: TrainConfig): string[] {
  return [...(c.text_encoder_target_modules ?? TEXT_ENCODER_TARGETS)];
}

/**
 * The UNet modules that get adapters: the --lora-target-preset's modules plus --lora-target-modules (union, in that
 * order, without repeats); without a preset, --lora-target-modules alone (default: attention).
 */
export function loraTargetModules(c: Pick<TrainConfig, 'lora_target_modules' | 'lora_target_preset'>): string[] {
  const preset: readonly string[] = c.lora_target_preset ? LORA_TARGET_PRESETS[c.lora_target_preset] : [];
  return [...new Set([...preset, ...c.lora_target_modules])];
}

/** Effective alpha of 3x3 conv adapters: --conv-alpha, or --conv-rank (as --lora-alpha defaults to --rank). */
export function convAlpha(c: Pick<TrainConfig, 'conv_rank' | 'conv_alpha'>): number | undefined {
  return c.conv_rank === undefined ? undefined : (c.conv_alpha ?? c.conv_rank);
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
    ...(cfg.caption_extension !== '.txt' ? { captionExtension: cfg.caption_extension } : {}),
  };
}

