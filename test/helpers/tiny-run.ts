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

/** The CLI as users run it (built by `npm test`'s tsc). */
export const CLI = path.join(__dirname, '..', '..', 'dist', 'cli.js');

export type CliFlags = Record<string, string | number | boolean | Array<string | number> | undefined>;

/**
 * `node` arguments for a short CPU run of the CLI on the tiny model at 32 px (the CLI's twin of tinyRunConfig).
 * `flags`: snake_case keys written as kebab-case flags (true = a switch, false/undefined = left out, a list = several
 * values); `extra` is appended as given.
 */
export function tinyCliArgs(out: string, data: string, flags: CliFlags = {}, extra: string[] = []): string[] {
  const all: CliFlags = { pretrained_model_name_or_path: TINY_MODEL, train_data_dir: data, output_dir: out, device: 'cpu', resolution: 32, ...flags };
  const args = [CLI];
  for (const [k, v] of Object.entries(all)) {
    if (v === undefined || v === false) continue;
    args.push(`--${k.replace(/_/g, '-')}`);
    if (v !== true) args.push(...(Array.isArray(v) ? v : [v]).map(String));
  }
  return [...args, ...extra];
}
