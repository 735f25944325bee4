/**
 * The content of a checkpoint's state files, as zod schemas. A hash in the manifest proves that a file is what was
 * written, not that what was written is complete: a random_states_0.json missing its data cursor (and a manifest
 * re-made over it) would otherwise verify, resume without a word and continue differently. `verify`, `latest` and
 * every load at resume check each file against its schema and the files against each other.
 *
 * The schemas name what train-lora reads back; unknown extra keys are allowed (newer versions add fields), missing or
 * mistyped ones are not.
 */
import { z } from 'zod';

import { lrScheduleFromJSON } from '../schedules/lr';

const int = z.number().int();
const nonNegInt = int.nonnegative();
const posInt = int.positive();
const finite = z.number().finite();

export const ManifestSchema = z.object({
  format: z.literal('train-lora-checkpoint'),
  version: z.literal(1),
  step: nonNegInt,
  created: z.string(),
  files: z.record(z.object({ size: nonNegInt, sha256: z.string().regex(/^[0-9a-f]{64}$/, 'must be 64 hex digits') })),
  reason: z.string().optional(),
});

/** random_states_<rank>.json: every generator stream (base64) and the data cursor. */
export const RandomStatesSchema = z.object({
  torch: z
    .record(z.string().min(1, 'is empty'))
    .refine((t) => typeof t.cpu === 'string', { message: 'has no "cpu" generator state' }),
  data: z.object({
    sampler: z.object({
      version: z.literal(1),
      seed: int,
      numSamples: posInt,
      epoch: nonNegInt,
      position: nonNegInt,
      // --enable-bucket (src/data/buckets.ts): the bucket table and global batch the cursor counts in.
      bucketKey: z.string().optional(),
      globalBatch: posInt.optional(),
    }),
    seed: int,
  }),
});

export const OptimizerJsonSchema = z.object({
  kind: z.literal('AdamW'),
  betas: z.tuple([finite, finite]),
  eps: finite,
  weight_decay: finite,
  per_parameter_steps: z.record(nonNegInt),
});

export const SchedulerJsonSchema = z.object({
  spec: z.unknown().superRefine((v, ctx) => {
    try {
      lrScheduleFromJSON(v);
    } catch (e) {
      ctx.addIssue({ code: z.ZodIssueCode.custom, message: (e as Error).message });
    }
  }),
  scheduler_steps: nonNegInt,
  num_processes: posInt.optional(),
  next_lr: finite.optional(),
});

export const ScalerJsonSchema = z.object({
  enabled: z.boolean(),
  scale: finite.positive(),
  growthTracker: nonNegInt,
});

/** The part of the run configuration that resume (compatibility, schedule) and export read back. */
const CheckpointConfigSchema = z
  .object({
    pretrained_model_name_or_path: z.string(),
    train_data_dir: z.string(),
    train_mode: z.enum(['lora', 'full']),
    rank: posInt,
    lora_alpha: z.number().positive().optional(),
    lora_dropout: z.number().min(0).max(1),
    lora_target_modules: z.array(z.string()).min(1),
    train_batch_size: posInt,
    gradient_accumulation_steps: posInt,
    max_train_steps: posInt,
    learning_rate: finite,
    lr_scheduler: z.string(),
    resolution: posInt,
    seed: int,
    mixed_precision: z.string(),
  })
  .passthrough();

export const TrainerStateSchema = z.object({
  version: posInt,
  global_step: nonNegInt,
  scheduler_steps: nonNegInt,
  epoch: nonNegInt,
  position: nonNegInt,
  world_size: posInt.optional(),
  samples_seen: nonNegInt,
  max_train_steps: posInt,
  train_loss: finite.nullable(),
  val_loss: finite.nullable().optional(),
  stage: z.string().optional(),
  best_metric: z.object({ name: z.string(), value: finite, step: nonNegInt, mode: z.enum(['min', 'max']) }).nullable(),
  base_model: z.object({ path: z.string(), fingerprint: z.string().min(1) }),
  dataset: z.object({ path: z.string(), fingerprint: z.string().min(1), size: posInt }),
  config: CheckpointConfigSchema,
  device: z.string().optional(),
  mixed_precision: z.enum(['no', 'fp16', 'bf16']).optional(),
  resumed_from: z.string().nullable(),
  versions: z.object({ train_lora: z.string(), torch: z.string(), node: z.string() }).partial(),
  time: z.string(),
  host: z.string(),
});

/** zod's issues as one line: `data.sampler.position: Required; torch: has no "cpu" generator state`. */
export function describeIssues(err: z.ZodError): string {
  return err.issues
    .slice(0, 4)
    .map((i) => `${i.path.length ? i.path.join('.') : '(top level)'}: ${i.message}`)
    .concat(err.issues.length > 4 ? [`and ${err.issues.length - 4} more`] : [])
    .join('; ');
}

// The state files by name (which schema checks which file, the files every checkpoint needs, readStateFile) live in
// state.ts, the one place for a checkpoint's files; re-exported here for existing imports. Kept last: state.ts reads
// the schemas above when it loads.
export { crossFileProblem, readStateFile, REQUIRED_FILES, stateFileProblem, stateSchemaFor } from './state';
