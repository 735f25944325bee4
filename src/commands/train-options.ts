/**
 * The training flags: one table gives each option's group, type and help; yargs gets kebab-case flags with the
 * diffusers snake_case spelling as an alias. Defaults live in the zod schema (src/config.ts), not here, so that
 * `--config FILE` values are not overridden by defaults.
 */
import type { Argv, Options } from 'yargs';

import { readConfigFile, parseTrainConfig, type TrainConfig } from '../config';
import { SCHEDULER_NAMES } from '../inference/schedulers';

type Kind = 'string' | 'number' | 'boolean' | 'array' | 'numarray';
interface Opt {
  key: keyof TrainConfig | 'config' | 'demo';
  group: string;
  kind: Kind;
  describe: string;
  choices?: readonly string[];
  aliases?: string[];
}

const MODEL = 'Model:';
const DATA = 'Data:';
const TRAINING = 'Training:';
const PRECISION = 'Precision & memory:';
const DIST = 'Distributed:';
const CKPT = 'Checkpointing:';
const VALID = 'Validation:';
const OUTPUT = 'Output & logging:';

/** The options of one help group: each row gets the group. */
const group = (name: string, opts: Array<Omit<Opt, 'group'>>): Opt[] => opts.map((o) => ({ ...o, group: name }));

/** The options, in help order: Model, Data, Training, Precision & memory, Checkpointing, Validation, Distributed, Output. */
export const TRAIN_OPTIONS: readonly Opt[] = [
  ...group(MODEL, [
    { key: 'pretrained_model_name_or_path', kind: 'string', describe: 'local Stable Diffusion 1.x folder in diffusers layout', aliases: ['model'] },
    { key: 'variant', kind: 'string', describe: 'weights variant, e.g. fp16 loads *.fp16.safetensors' },
    { key: 'device', kind: 'string', describe: 'auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps [default: auto]' },
  ]),
  ...group(DATA, [
    { key: 'train_data_dir', kind: 'string', describe: 'images + captions.json, metadata.jsonl, or .txt captions beside images', aliases: ['data'] },
    { key: 'caption_column', kind: 'string', describe: 'metadata.jsonl caption field [default: text, then caption]' },
    { key: 'image_column', kind: 'string', describe: 'metadata.jsonl image field [default: file_name, then image]' },
    { key: 'max_train_samples', kind: 'number', describe: 'use a seeded random subset of this many images' },
    { key: 'resolution', kind: 'number', describe: 'shorter side is resized to this, then cropped square [default: 512]' },
    { key: 'center_crop', kind: 'boolean', describe: 'center crop instead of a random crop' },
    { key: 'random_flip', kind: 'boolean', describe: 'random horizontal flips' },
    { key: 'image_interpolation_mode', kind: 'string', describe: 'resize filter [default: lanczos]', choices: ['lanczos', 'bilinear', 'bicubic', 'nearest', 'area'] },
    { key: 'skip_bad_images', kind: 'boolean', describe: 'leave out missing, unreadable or damaged images (every image is decoded at start; listed) instead of stopping' },
    { key: 'caption_dropout_rate', kind: 'number', describe: 'train this fraction of samples with the empty caption (seeded; 0.05-0.1 keeps classifier-free guidance working) [default: 0]' },
    { key: 'skip_uncaptioned', kind: 'boolean', describe: 'skip images that have no caption instead of stopping' },
    { key: 'dataset_layout', kind: 'string', describe: 'force a layout instead of detecting it', choices: ['captions.json', 'metadata.jsonl', 'txt'] },
    { key: 'image_resampler', kind: 'string', describe: 'auto (sharp where it equals PIL), sharp, or pil (bit-exact with diffusers\' PIL resize) [default: auto]', choices: ['auto', 'sharp', 'pil'] },
    { key: 'cache_latents', kind: 'boolean', describe: 'encode each image once (needs no random crop/flip)' },
    { key: 'dataloader_num_workers', kind: 'number', describe: 'image decoding concurrency [default: 2]' },
    { key: 'enable_bucket', kind: 'boolean', describe: 'aspect-ratio buckets: each image is resized to cover the bucket of closest aspect ratio (area <= resolution²) and cropped to it; every batch comes from one bucket' },
    { key: 'min_bucket_reso', kind: 'number', describe: 'smallest bucket side [default: 256]' },
    { key: 'max_bucket_reso', kind: 'number', describe: 'largest bucket side [default: 1024]' },
    { key: 'bucket_reso_steps', kind: 'number', describe: 'bucket sides are multiples of this; must be a multiple of the model\'s pixel stride (64 for SD 1.5) [default: 64]' },
    { key: 'bucket_no_upscale', kind: 'boolean', describe: 'never enlarge: an image that fits gets a bucket of its own size (rounded down to the step)' },
    { key: 'masked_loss', kind: 'boolean', describe: 'weight the loss by a mask per image (--alpha-mask or --mask-dir); images without one count fully' },
    { key: 'alpha_mask', kind: 'boolean', describe: 'with --masked-loss: the mask is the image\'s alpha channel' },
    { key: 'mask_dir', kind: 'string', describe: 'with --masked-loss: folder of masks named as the images (same relative path, any image extension; first channel, white = full weight)' },
    { key: 'shuffle_caption', kind: 'boolean', describe: 'shuffle the comma-separated tags of each caption (seeded per sample and epoch)' },
    { key: 'keep_tokens', kind: 'number', describe: 'with --shuffle-caption: the first N tags stay in place [default: 0]' },
    { key: 'keep_tokens_separator', kind: 'string', describe: 'with --shuffle-caption: tags before this separator stay in place (and after a second one, at the end)' },
    { key: 'caption_extension', kind: 'string', describe: 'extension of the caption files beside the images (.txt layout) [default: .txt]' },
  ]),
  ...group(TRAINING, [
    { key: 'train_mode', kind: 'string', describe: 'lora: train adapters; full: train every UNet weight [default: lora]', choices: ['lora', 'full'] },
    { key: 'rank', kind: 'number', describe: 'LoRA rank [default: 8]', aliases: ['lora-rank', 'lora_rank'] },
    { key: 'lora_alpha', kind: 'number', describe: 'LoRA alpha; scale = alpha / rank [default: rank]' },
    { key: 'lora_dropout', kind: 'number', describe: 'dropout on the LoRA input [default: 0]' },
    { key: 'lora_target_modules', kind: 'array', describe: 'UNet Linear/Conv2d modules that get adapters (added to --lora-target-preset) [default: to_k to_q to_v to_out.0]' },
    { key: 'lora_target_preset', kind: 'string', describe: 'module set: attn, attn-ff (+ ff), kohya (sd-scripts\' default: + proj_in/proj_out), full (kohya + LoCon ResNet/sampler convs; needs --conv-rank)', choices: ['attn', 'attn-ff', 'kohya', 'full'] },
    { key: 'conv_rank', kind: 'number', describe: 'rank of 3x3 conv adapters (LoCon; kohya\'s conv_dim)', aliases: ['conv-dim', 'conv_dim'] },
    { key: 'conv_alpha', kind: 'number', describe: 'alpha of 3x3 conv adapters; scale = conv alpha / conv rank [default: conv rank]' },
    { key: 'train_text_encoder', kind: 'boolean', describe: 'LoRA on the text encoder too (same rank, alpha, dropout), saved in checkpoints and every export; needs --train-mode lora' },
    { key: 'text_encoder_target_modules', kind: 'array', describe: 'text-encoder Linear modules that get adapters, e.g. add fc1 fc2 (the MLP) [default: q_proj k_proj v_proj out_proj]' },
    { key: 'text_encoder_lr', kind: 'number', describe: 'learning rate of the text encoder\'s adapters (own AdamW group, same schedule) [default: --learning-rate]' },
    { key: 'init_lora_weights', kind: 'string', describe: 'start from a LoRA file (diffusers, PEFT or kohya)' },
    { key: 'train_batch_size', kind: 'number', describe: 'images per micro-batch [default: 2]' },
    { key: 'gradient_accumulation_steps', kind: 'number', describe: 'micro-batches per optimizer step [default: 8]' },
    { key: 'max_train_steps', kind: 'number', describe: 'optimizer steps to train [default: 3000]' },
    { key: 'learning_rate', kind: 'number', describe: 'AdamW learning rate [default: 1e-4]' },
    { key: 'scale_lr', kind: 'boolean', describe: 'multiply the LR by accumulation × batch size × processes' },
    { key: 'lr_scheduler', kind: 'string', describe: 'constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial [default: cosine]' },
    { key: 'lr_warmup_steps', kind: 'number', describe: 'warmup optimizer steps [default: 500]' },
    { key: 'lr_num_cycles', kind: 'number', describe: 'cycles of cosine_with_restarts [default: 1]' },
    { key: 'lr_power', kind: 'number', describe: 'power of the polynomial schedule [default: 1]' },
    { key: 'adam_beta1', kind: 'number', describe: '[default: 0.9]' },
    { key: 'adam_beta2', kind: 'number', describe: '[default: 0.999]' },
    { key: 'adam_weight_decay', kind: 'number', describe: '[default: 1e-2]' },
    { key: 'adam_epsilon', kind: 'number', describe: '[default: 1e-8]' },
    { key: 'max_grad_norm', kind: 'number', describe: 'clip the trainable gradients to this norm; 0 disables [default: 1]' },
    { key: 'max_nonfinite_steps', kind: 'number', describe: 'a step with NaN/inf loss or gradients is skipped (weights and AdamW untouched); stop, saving the last good state, after this many in a row [default: 10]' },
    { key: 'seed', kind: 'number', describe: 'seeds data order, augmentation, noise and init [default: 42]' },
    { key: 'prediction_type', kind: 'string', describe: "override the scheduler's prediction type", choices: ['epsilon', 'v_prediction'] },
    { key: 'noise_offset', kind: 'number', describe: 'noise offset [default: 0]' },
    { key: 'snr_gamma', kind: 'number', describe: 'min-SNR loss weighting gamma (5.0 is common)' },
  ]),
  ...group(PRECISION, [
    { key: 'mixed_precision', kind: 'string', describe: 'autocast dtype of the UNet (trainable weights stay fp32); auto: bf16 on CUDA GPUs with bf16 (Ampere+), fp16 on older ones, no (fp32) on MPS and CPU [default: auto]', choices: ['auto', 'no', 'fp16', 'bf16'] },
    { key: 'allow_tf32', kind: 'boolean', describe: 'TF32 matmuls and convolutions on Ampere+ GPUs: faster fp32, ~1e-3 relative error (off: results match a CPU reference)' },
    { key: 'gradient_checkpointing', kind: 'boolean', describe: 'recompute activations in backward to save memory' },
    { key: 'cuda_graphs', kind: 'boolean', describe: 'CUDA: replay each LoRA micro-step (UNet forward + backward) from a CUDA graph per batch shape; eager where impossible, logged (not yet run on a GPU)' },
  ]),
  ...group(CKPT, [
    { key: 'output_dir', kind: 'string', describe: 'run folder [default: outputs/run-NNN]', aliases: ['out'] },
    { key: 'overwrite_output_dir', kind: 'boolean', describe: 'start a new run in a folder that holds another run\'s checkpoints or LoRA: they are moved into a dated folder under OUT/previous/ (nothing is deleted)' },
    { key: 'checkpointing_steps', kind: 'number', describe: 'save every N optimizer steps [default: 500]' },
    { key: 'checkpointing_minutes', kind: 'number', describe: 'also save when this many minutes passed since the last save (same retention; reason "time")' },
    { key: 'checkpoints_total_limit', kind: 'number', describe: 'keep the newest N checkpoints, the final one among them (beyond N only the best, kept ones and earlier stages\' last) [default: 5]' },
    { key: 'checkpoint_every_epoch', kind: 'boolean', describe: 'also save at the end of every epoch' },
    { key: 'resume_from_checkpoint', kind: 'string', describe: 'latest | a checkpoint folder | another run folder; a diffusers/accelerate checkpoint-N folder is imported (LoRA weights and step N)' },
    { key: 'strict_resume', kind: 'boolean', describe: 'fail instead of skipping invalid checkpoints' },
    { key: 'reset_optimizer', kind: 'boolean', describe: 'on resume: keep the weights, fresh optimizer and LR schedule' },
    { key: 'allow_dataset_change', kind: 'boolean', describe: 'on resume: accept a changed dataset' },
    { key: 'on_save_error', kind: 'string', describe: 'stop or continue when a checkpoint cannot be written [default: stop]', choices: ['stop', 'continue'] },
    { key: 'monitor', kind: 'string', describe: 'metric that picks the best checkpoint [default: train_loss]', choices: ['train_loss', 'val_loss'] },
    { key: 'monitor_mode', kind: 'string', describe: '[default: min]', choices: ['min', 'max'] },
    { key: 'stage', kind: 'string', describe: 'name of this training stage; the last checkpoint of each earlier stage is kept [default: derived from dataset and mode]' },
  ]),
  ...group(VALID, [
    { key: 'validation_prompt', kind: 'array', describe: 'prompt(s) rendered during training (repeatable)' },
    { key: 'validation_prompts_file', kind: 'string', describe: 'one prompt per line' },
    { key: 'num_validation_images', kind: 'number', describe: 'images per prompt [default: 4]' },
    { key: 'validation_steps', kind: 'number', describe: 'render every N steps [default: 500]' },
    { key: 'validation_epochs', kind: 'number', describe: 'render every N epochs' },
    { key: 'validation_before_training', kind: 'boolean', describe: 'render once before the first step' },
    { key: 'validation_negative_prompt', kind: 'string', describe: 'negative prompt for validation images [default: none]' },
    { key: 'validation_scheduler', kind: 'string', describe: 'sampler for validation images [default: pndm]', choices: SCHEDULER_NAMES },
    { key: 'validation_num_inference_steps', kind: 'number', describe: 'sampling steps per validation image [default: 30]' },
    { key: 'validation_guidance_scale', kind: 'number', describe: 'classifier-free guidance scale [default: 7.5]' },
    { key: 'validation_seed', kind: 'number', describe: 'seed of the validation images (same noise every time) [default: --seed]' },
    { key: 'validation_resolution', kind: 'number', describe: 'validation image size, multiple of 8 [default: --resolution]' },
    { key: 'validation_split', kind: 'number', describe: 'hold out this fraction of the images for val_loss (e.g. 0.1)' },
    { key: 'validation_data_dir', kind: 'string', describe: 'held-out images for val_loss (same layouts as --train-data-dir)' },
  ]),
  ...group(DIST, [
    { key: 'num_processes', kind: 'number', describe: 'data-parallel worker processes on this machine (one per GPU; CPU workers for testing); effective batch = batch × accumulation × all processes [default: 1]' },
    { key: 'nnodes', kind: 'number', describe: 'machines taking part (each runs train-lora with the same flags and its --node-rank) [default: 1]' },
    { key: 'node_rank', kind: 'number', describe: 'this machine\'s index, 0..nnodes-1 [default: 0]' },
    { key: 'master_addr', kind: 'string', describe: 'address of node 0 for the rendezvous [default: 127.0.0.1; MASTER_ADDR under torchrun]' },
    { key: 'master_port', kind: 'number', describe: 'rendezvous port on node 0 [default: a free port on one node, 29500 on several]' },
    { key: 'dist_backend', kind: 'string', describe: 'c10d backend: auto (nccl on CUDA when built with it, else gloo) [default: auto]', choices: ['auto', 'gloo', 'nccl'] },
    { key: 'dist_timeout', kind: 'number', describe: 'seconds a rank waits for the others (rendezvous, collectives, checkpoint barriers) before failing [default: 1800]' },
  ]),
  ...group(OUTPUT, [
    { key: 'config', kind: 'string', describe: 'JSON file of options (snake_case keys, as training_config.json); flags override it' },
    { key: 'demo', kind: 'boolean', describe: 'train the embedded demo: a tiny generated model on generated shapes, on the CPU' },
    { key: 'save_format', kind: 'array', describe: 'final LoRA files: diffusers, peft, kohya [default: diffusers peft]' },
    { key: 'merge', kind: 'boolean', describe: 'also write OUT/final_pipeline/: a complete diffusers pipeline with the LoRA merged into the UNet weights' },
    { key: 'log_level', kind: 'string', describe: '[default: info]', choices: ['trace', 'debug', 'info', 'warn', 'error'] },
  ]),
];

const kebab = (k: string) => k.replace(/_/g, '-');

export function addTrainOptions<T>(y: Argv<T>): Argv<T> {
  let out = y;
  for (const o of TRAIN_OPTIONS) {
    const flag = kebab(o.key);
    const aliases = [...(o.key !== flag ? [o.key] : []), ...(o.aliases ?? [])];
    const opt: Options = { group: o.group, describe: o.describe, alias: aliases };
    if (o.kind === 'array') Object.assign(opt, { type: 'string', array: true });
    else opt.type = o.kind === 'numarray' ? 'number' : o.kind;
    if (o.choices) opt.choices = o.choices;
    out = out.option(flag, opt) as Argv<T>;
  }
  return out;
}

/** A command that reads the training flags (training itself, test-setup): `run` gets them as yargs parsed them. */
export function commandWithTrainFlags<T>(cli: Argv<T>, command: string, describe: string, run: (argv: Record<string, unknown>) => Promise<void>): Argv<T> {
  return cli.command(command, describe, (y) => addTrainOptions(y), (a) => run(a as Record<string, unknown>));
}

/** A number as a value of a flag, negative ones included (yargs takes "-1e-3" for the short flags -1 -e -3). */
const NUMBER_RE = /^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$/i;

/**
 * The training command line made unambiguous before yargs parses it, as argparse reads it:
 *  - a flag given twice: the last one wins (under any of its spellings); array options (--validation-prompt,
 *    --save-format, --lora-target-modules) are meant to repeat and keep every value;
 *  - a negative number after a flag is its value (`--learning-rate -1e-3` becomes `--learning-rate=-1e-3`), and the
 *    configuration's validation decides whether it is allowed.
 * Anything else (unknown flags, positionals, what follows `--`) is passed through for yargs to judge.
 */
export function normalizeTrainArgs(args: readonly string[]): string[] {
  const camel = (s: string) => s.replace(/[-_]([a-z0-9])/g, (_m, c: string) => c.toUpperCase());
  const byName = new Map<string, Opt>();
  for (const o of TRAIN_OPTIONS)
    for (const n of [kebab(o.key), o.key, ...(o.aliases ?? [])]) {
      byName.set(n, o);
      byName.set(camel(n), o);
    }
  const items: Array<{ key?: string; tokens: string[] }> = [];
  for (let i = 0; i < args.length; i++) {
    const tok = args[i];
    if (tok === '--') {
      items.push({ tokens: args.slice(i) });
      break;
    }
    const m = /^--([^=]+)(=[\s\S]*)?$/.exec(tok);
    let opt = m ? byName.get(m[1]) : undefined;
    const negated = !opt && m !== null && m[1].startsWith('no-') && byName.get(m[1].slice(3))?.kind === 'boolean';
    if (negated) opt = byName.get(m![1].slice(3));
    if (!m || !opt) {
      items.push({ tokens: [tok] });
      continue;
    }
    const next = args[i + 1];
    if (opt.kind === 'boolean') {
      const tokens = [tok];
      if (m[2] === undefined && !negated && (next === 'true' || next === 'false')) tokens.push(args[++i]);
      items.push({ key: opt.key, tokens });
    } else if (opt.kind === 'array' || opt.kind === 'numarray') {
      items.push({ tokens: [tok] }); // its values follow as plain tokens; repeats accumulate
    } else if (m[2] === undefined && next !== undefined && (!next.startsWith('-') || NUMBER_RE.test(next))) {
      items.push({ key: opt.key, tokens: [`--${m[1]}=${next}`] });
      i++;
    } else {
      items.push({ key: opt.key, tokens: [tok] });
    }
  }
  const last = new Map<string, number>();
  items.forEach((it, i) => it.key !== undefined && last.set(it.key, i));
  return items.filter((it, i) => it.key === undefined || last.get(it.key) === i).flatMap((it) => it.tokens);
}

/**
 * Merges defaults < --config file < explicit flags and validates. `argv` is yargs' parsed object; only keys the
 * user actually typed are taken (yargs sets no defaults for these options).
 */
export function configFromArgv(argv: Record<string, unknown>, extra: Record<string, unknown> = {}): TrainConfig {
  const fromFile = typeof argv.config === 'string' ? readConfigFile(argv.config) : {};
  const fromFlags: Record<string, unknown> = {};
  for (const o of TRAIN_OPTIONS) {
    if (o.key === 'config' || o.key === 'demo') continue;
    const v = argv[kebab(o.key)];
    if (v !== undefined) fromFlags[o.key] = v;
  }
  return parseTrainConfig({ ...extra, ...fromFile, ...fromFlags });
}

/** The README's flag reference: one markdown table per group, in help order (kept in sync by a test). */
export function flagTableMarkdown(): string {
  const groups = new Map<string, Opt[]>();
  for (const o of TRAIN_OPTIONS) groups.set(o.group, [...(groups.get(o.group) ?? []), o]);
  const esc = (s: string) => s.replace(/\|/g, '\\|');
  const out: string[] = [];
  for (const [g, opts] of groups) {
    out.push(`**${g.replace(/:$/, '')}**`, '', '| flag | also | what it does |', '|---|---|---|');
    for (const o of opts) {
      const flag = kebab(o.key);
      const also = [...(o.key !== flag ? [o.key] : []), ...(o.aliases ?? [])].map((a) => `\`--${a}\``).join(' ');
      const kind = o.kind === 'boolean' ? '' : o.choices ? ` ${o.choices.join('\\|')}` : o.kind === 'array' ? ' X...' : o.kind === 'number' ? ' N' : ' X';
      out.push(`| \`--${flag}${kind}\` | ${also} | ${esc(o.describe)} |`);
    }
    out.push('');
  }
  return out.join('\n').trimEnd();
}
