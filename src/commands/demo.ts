/** The embedded demo (`train-lora --demo`, and test-setup without a model): a tiny generated model and dataset. */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { makeDemoData } from '../data/demo-data';
import { DEMO_MODEL_VERSION, DEMO_RESOLUTION, makeTinyModel } from '../model-folders/model-folder';
import type { CliReporter } from '../train/reporter';

function cacheDir(): string {
  return process.env.TRAIN_LORA_CACHE ?? path.join(process.env.XDG_CACHE_HOME ?? path.join(os.homedir(), '.cache'), 'train-lora');
}

/** The embedded default: a tiny generated model and a generated captioned shapes dataset, trained on the CPU. */
export async function demoDefaults(log: CliReporter): Promise<Record<string, unknown>> {
  const root = path.join(cacheDir(), 'demo');
  const model = path.join(root, 'demo-model');
  const data = path.join(root, 'shapes');
  // A demo model made by an older train-lora (random UNet) is replaced; the marker is written after the folder is complete.
  const marker = path.join(model, 'train_lora_demo.json');
  const current = fs.existsSync(marker) && (JSON.parse(fs.readFileSync(marker, 'utf8')) as { version?: number }).version === DEMO_MODEL_VERSION;
  if (!current) {
    log.info(`making the demo model in ${model}`);
    await makeTinyModel(model, 'demo', 0);
    fs.writeFileSync(marker, `${JSON.stringify({ version: DEMO_MODEL_VERSION })}\n`);
  }
  if (!fs.existsSync(path.join(data, 'captions.json'))) {
    log.info(`making the demo dataset in ${data}`);
    await makeDemoData(data, { count: 48, size: 64, seed: 0 });
  }
  return {
    pretrained_model_name_or_path: model,
    train_data_dir: data,
    device: 'cpu',
    resolution: DEMO_RESOLUTION,
    random_flip: true,
    train_batch_size: 4,
    gradient_accumulation_steps: 1,
    max_train_steps: 200,
    learning_rate: 1e-3,
    lr_scheduler: 'cosine',
    lr_warmup_steps: 20,
    checkpointing_steps: 50,
    checkpoints_total_limit: 3,
    validation_steps: 50,
    validation_prompt: ['a red circle on a white background', 'a blue square on a black background'],
    num_validation_images: 2,
    // Step 0 shows the base model (backgrounds of random muted colours, as it was pre-trained); the tiny model's
    // pictures are cleanest with an ancestral sampler and mild guidance.
    validation_before_training: true,
    validation_scheduler: 'euler_a',
    validation_guidance_scale: 4,
    validation_num_inference_steps: 20,
    validation_split: 0.1,
  };
}

