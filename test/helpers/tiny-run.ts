import * as path from 'node:path';

import { parseTrainConfig, type TrainConfig } from '../../src/config';

/** The tiny fixture model (random weights, diffusers layout). */
export const TINY_MODEL = path.join(__dirname, '..', 'fixtures', 'models', 'tiny');

/**
 * A short CPU training config on the tiny model: 32 px, batch 4, no accumulation, constant LR 1e-3, rank 4, a checkpoint
 * every 2 steps. `over` replaces any of it (snake_case keys, validated like a config file).
 */
export function tinyRunConfig(out: string, data: string, over: Record<string, unknown> = {}): TrainConfig {
  return parseTrainConfig({
    pretrained_model_name_or_path: TINY_MODEL,
    train_data_dir: data,
    output_dir: out,
    device: 'cpu',
    resolution: 32,
    train_batch_size: 4,
    gradient_accumulation_steps: 1,
    max_train_steps: 4,
    learning_rate: 1e-3,
    lr_scheduler: 'constant',
    lr_warmup_steps: 0,
    checkpointing_steps: 2,
    rank: 4,
    seed: 5,
    ...over,
  });
}
