#!/usr/bin/env node
/**
 * train-lora: the command line. `train` is the default command; every subcommand lives in src/commands/.
 */
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';

import * as os from 'node:os';
import * as path from 'node:path';
import * as fs from 'node:fs';

import { formatBytes } from './checkpoint/fsutil';
import { exportCommand, keepCommand, listCheckpoints, listRuns, verifyCommand } from './commands/checkpoints';
import { runForwardCommand } from './commands/forward';
import { runGenerateCommand } from './commands/generate';
import { SCHEDULER_NAMES, type SchedulerName } from './inference/schedulers';
import { testSetup } from './commands/test-setup';
import { addTrainOptions, configFromArgv, normalizeTrainArgs } from './commands/train-options';
import { ConfigError } from './config';
import { launchPlan } from './distributed/env';
import { superviseWorkers } from './distributed/launcher';
import { makeDemoData } from './data/demo-data';
import { CliReporter } from './train/reporter';
import { checkOutputDir, nextRunDir, train } from './train/train';
import { DEMO_MODEL_VERSION, DEMO_RESOLUTION, makeTinyModel, type ModelPreset } from './models/model-folder';
import { native, type LoraFileFormat, type Precision } from './native';

function cacheDir(): string {
  return process.env.TRAIN_LORA_CACHE ?? path.join(process.env.XDG_CACHE_HOME ?? path.join(os.homedir(), '.cache'), 'train-lora');
}

/** The embedded default: a tiny generated model and a generated captioned shapes dataset, trained on the CPU. */
async function demoDefaults(log: CliReporter): Promise<Record<string, unknown>> {
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

/** Flags that take a value and that a resume/continue command replaces. */
const REPLACED_FLAGS = new Set(['output-dir', 'output_dir', 'out', 'resume-from-checkpoint', 'resume_from_checkpoint', 'max-train-steps', 'max_train_steps']);
/** Switches that belong to the first start only: a resume must not repeat them. */
const DROPPED_SWITCHES = new Set(['overwrite-output-dir', 'overwrite_output_dir']);

/**
 * The user's own command line with `extra` flags in place of the ones they replace (output folder, resume, steps), so
 * that "resume with" / "continue training with" repeat every other flag (model, data, --num-processes, ...).
 */
export function rerunCommand(args: readonly string[], extra: readonly string[]): string {
  const kept: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const m = /^--([^=]+)(=.*)?$/.exec(args[i]);
    if (m && REPLACED_FLAGS.has(m[1])) {
      if (m[2] === undefined) i++; // skip its value
      continue;
    }
    if (m && DROPPED_SWITCHES.has(m[1])) {
      if (m[2] === undefined && (args[i + 1] === 'true' || args[i + 1] === 'false')) i++;
      continue;
    }
    kept.push(args[i]);
  }
  const quote = (a: string) => (/^[\w@%+=:,./-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`);
  return ['npx', 'train-lora', ...kept, ...extra].map(quote).join(' ');
}

async function runTrain(argv: Record<string, unknown>): Promise<void> {
  if (!argv.demo && argv['pretrained-model-name-or-path'] === undefined && argv.config === undefined) {
    throw new ConfigError([
      '--pretrained-model-name-or-path is required (a local diffusers folder), with --train-data-dir. Try `train-lora --demo` for a complete run on generated data, or `train-lora --help`.',
    ]);
  }
  let extra: Record<string, unknown> = {};
  if (argv.demo) {
    const early = new CliReporter((argv['log-level'] as 'info' | undefined) ?? 'info');
    try {
      extra = await demoDefaults(early);
    } finally {
      early.close();
    }
  }
  const cfg = configFromArgv(argv, extra);
  // The log level of the merged configuration: --log-level, else the --config file's log_level, else info.
  const reporter = new CliReporter(cfg.log_level);
  const chosenDir = !cfg.output_dir;
  if (!cfg.output_dir) cfg.output_dir = nextRunDir();
  try {
    checkOutputDir(cfg.output_dir);
  } catch (e) {
    reporter.close();
    throw e;
  }
  const plan = launchPlan(cfg);
  if (plan.kind === 'supervise') {
    // --num-processes N: this process only starts and watches the workers (same arguments, one output folder).
    const args = [process.argv[1], ...process.argv.slice(2), ...(chosenDir ? ['--output-dir', cfg.output_dir] : [])];
    try {
      process.exitCode = await superviseWorkers({ ...plan, args, info: (m) => reporter.info(m), error: (m) => reporter.error(m) });
    } finally {
      reporter.close();
    }
    return;
  }
  const isMain = plan.kind === 'single' || plan.env.rank === 0;
  if (isMain) reporter.attach(cfg.output_dir);
  try {
    const r = await train(cfg, reporter);
    if (!isMain) {
      if (r.signal) process.exitCode = r.signal === 'SIGINT' ? 130 : 143;
      return;
    }
    const out = r.outputDir;
    const rel = path.relative(process.cwd(), out);
    const shown = rel && !rel.startsWith('..') ? rel : out;
    const resumeCmd = rerunCommand(process.argv.slice(2), ['--output-dir', shown, '--resume-from-checkpoint', 'latest']);
    if (r.signal) {
      reporter.info(`stopped by ${r.signal} at step ${r.globalStep}; checkpoint: ${r.lastCheckpoint}`);
      reporter.info(`resume with: ${resumeCmd}`);
      process.exitCode = r.signal === 'SIGINT' ? 130 : 143;
      return;
    }
    reporter.info(`finished ${r.globalStep} steps in ${out}`);
    for (const f of r.loraFiles) reporter.info(`${f.endsWith('diffusion_pytorch_model.safetensors') ? 'UNet' : 'LoRA'}: ${f}`);
    reporter.info(`checkpoints: ${path.join(out, 'checkpoints')} (latest: ${r.lastCheckpoint})`);
    reporter.info(`continue training with: ${rerunCommand(process.argv.slice(2), ['--output-dir', shown, '--resume-from-checkpoint', 'latest', '--max-train-steps', String(r.globalStep * 2)])}`);
  } finally {
    reporter.close();
  }
}

/** Subcommands whose options are not the training flags. */
const OTHER_COMMANDS = new Set(['devices', 'checkpoints', 'list-runs', 'make-tiny-model', 'make-demo-data', 'forward', 'generate']);

/** Training (the default command) and test-setup read the training flags: last one wins, negative numbers are values. */
function normalizeArgs(argv: readonly string[]): string[] {
  return OTHER_COMMANDS.has(argv[0]) ? [...argv] : normalizeTrainArgs(argv);
}

/** The training flags of a command line as yargs parses them for `train` (for tests and tools). */
export function parseTrainFlags(args: readonly string[]): Record<string, unknown> {
  return addTrainOptions(yargs(normalizeArgs(args)))
    .strict()
    .fail((msg, err) => {
      throw err ?? new ConfigError([msg]);
    })
    .parseSync() as Record<string, unknown>;
}

/** The options `forward` and `generate` share: the model they run, the LoRA's alpha, the device and dtype. */
const MODEL_FOLDER = { type: 'string', demandOption: true, describe: 'diffusers model folder' } as const;
const LORA_ALPHA = { type: 'number', describe: 'alpha of a LoRA file that does not carry it (a bare PEFT-format file); the scale is alpha / rank' } as const;
const RUN_DEVICE = { type: 'string', default: 'cpu' } as const;
const RUN_DTYPE = { choices: ['fp32', 'fp16', 'bf16'] as const, default: 'fp32' as const };

export async function main(argv: string[]): Promise<void> {
  await yargs(normalizeArgs(argv))
    .scriptName('train-lora')
    .usage('$0 [command] [options]\n\nLoRA fine-tuning of Stable Diffusion 1.5 on a folder of images and captions,\nwith checkpoints that survive crashes, Ctrl+C and full disks.')
    .command(
      'devices',
      'List the compute devices libtorch can use here',
      () => {},
      async () => {
        const v = native().version();
        console.log(`libtorch ${v.torch} (${v.cuda ? 'CUDA build' : 'CPU build'})`);
        for (const d of await native().devices()) {
          const name = d.type + (d.type === 'cuda' && d.available ? `:${d.index}` : '');
          const mem = d.totalMemory ? `, ${formatBytes(d.totalMemory)}` : '';
          console.log(d.available ? `  [OK]   ${name}: ${d.name ?? ''}${mem}${d.threads ? `, ${d.threads} threads` : ''}` : `  [--]   ${name}: ${d.reason}`);
        }
      },
    )
    .command('checkpoints', 'Inspect, verify, keep and export checkpoints', (y) =>
      y
        .command('list <run>', 'List a run\'s checkpoints (step, epoch, time, size, loss, latest/best, valid)', (c) =>
          c.positional('run', { type: 'string', demandOption: true }).option('full', { type: 'boolean', default: false, describe: 'verify sha256 of every file' }),
          async (a) => console.log(await listCheckpoints(a.run, a.full)))
        .command('verify <path>', 'Verify a checkpoint: manifest hashes, every file parses, shapes match (exit 0/1)', (c) => c.positional('path', { type: 'string', demandOption: true }),
          async (a) => {
            const r = await verifyCommand(a.path);
            console.log(r.text);
            if (!r.ok) process.exitCode = 1;
          })
        .command('keep <path>', 'Never delete this checkpoint in retention', (c) => c.positional('path', { type: 'string', demandOption: true }),
          (a) => console.log(keepCommand(a.path)))
        .command('export <path>', 'Write the LoRA of a checkpoint for inference (diffusers, peft, kohya), optionally a merged pipeline', (c) =>
          c.positional('path', { type: 'string', demandOption: true, describe: 'a checkpoint-<step> folder' })
            .option('format', { type: 'string', array: true, choices: ['diffusers', 'peft', 'kohya'], default: ['diffusers'], describe: 'one or more formats' })
            .option('merge', { type: 'boolean', default: false, describe: 'also write OUT/final_pipeline/: the base pipeline with the LoRA merged into the UNet' })
            .option('out', { type: 'string', describe: 'output folder [default: <run>/exports/<checkpoint>], or a .safetensors file for one format' })
            .option('model', { type: 'string', describe: 'the base model folder, if it moved since training (for --merge)' }),
          async (a) => console.log(await exportCommand(a.path, { formats: a.format as LoraFileFormat[], merge: a.merge, out: a.out, model: a.model })))
        .demandCommand(1, 'name a checkpoints subcommand: list, verify, keep or export'),
    )
    .command('list-runs [root]', 'List the runs under a folder (default outputs/)', (y) => y.positional('root', { type: 'string', default: 'outputs' }),
      async (a) => console.log(await listRuns(a.root)))
    .command(
      'test-setup',
      'Check this machine and configuration: data, models, LoRA, 5 steps, a checkpoint round trip, memory (same flags as training)',
      (y) => addTrainOptions(y),
      async (a) => {
        const argv = a as Record<string, unknown>;
        const reporter = new CliReporter('warn');
        const extra = argv.demo || (argv['pretrained-model-name-or-path'] === undefined && argv.config === undefined) ? await demoDefaults(reporter) : {};
        if (Object.keys(extra).length) console.log('test-setup: no model/data given, checking the embedded demo configuration');
        const results = await testSetup(configFromArgv(argv, extra));
        const bad = results.filter((r) => r.ok === false).length;
        console.log(bad ? `${bad} check(s) failed` : 'all checks passed');
        if (bad) process.exitCode = 1;
      },
    )
    .command(
      'make-tiny-model <out>',
      'Write a Stable-Diffusion-shaped model folder with seeded random weights (for tests, demos, benchmarks)',
      (y) =>
        y
          .positional('out', { type: 'string', demandOption: true, describe: 'output folder (diffusers layout)' })
          .option('preset', { choices: ['tiny', 'demo', 'sd15'] as const, default: 'tiny' as const, describe: 'tiny: a few MB; demo: what --demo uses (hand-set autoencoder VAE, pre-trained base UNet); sd15: the real SD 1.5 shapes (~4 GB)' })
          .option('seed', { type: 'number', default: 0 }),
      async (a) => {
        const t0 = Date.now();
        await makeTinyModel(a.out, a.preset as ModelPreset, a.seed);
        console.log(`wrote ${a.preset} model to ${a.out} in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
      },
    )
    .command(
      'make-demo-data <out>',
      'Write a small captioned dataset of coloured shapes (what --demo trains on)',
      (y) =>
        y
          .positional('out', { type: 'string', demandOption: true, describe: 'output folder' })
          .option('count', { type: 'number', default: 48, describe: 'number of images' })
          .option('size', { type: 'number', default: 64, describe: 'image side in pixels' })
          .option('seed', { type: 'number', default: 0 })
          .option('layout', { choices: ['captions.json', 'metadata.jsonl', 'txt'] as const, default: 'captions.json' as const, describe: 'dataset layout to write' }),
      async (a) => {
        const d = await makeDemoData(a.out, { count: a.count, size: a.size, seed: a.seed, layout: a.layout });
        console.log(`wrote ${d.items.length} images (${a.size}x${a.size}, ${d.layout}) to ${d.root}`);
      },
    )
    .command(
      'forward',
      'Run the networks on tensors from a safetensors file (parity checks against diffusers)',
      (y) =>
        y
          .option('model', MODEL_FOLDER)
          .option('inputs', { type: 'string', describe: 'safetensors with input_ids / latents+timesteps+encoder_hidden_states / image / vae_latents [/ target]' })
          .option('output', { type: 'string', demandOption: true, describe: 'where to write the outputs (safetensors)' })
          .option('lora', { type: 'string', describe: 'LoRA file (diffusers, peft or kohya keys), PEFT adapter folder or checkpoint folder, applied to the UNet' })
          .option('lora-scale', { type: 'number', default: 1 })
          .option('lora-alpha', LORA_ALPHA)
          .option('prompt', { type: 'string', array: true, describe: 'tokenize with the folder tokenizer; writes input_ids and text_embeddings' })
          .option('device', RUN_DEVICE)
          .option('dtype', RUN_DTYPE)
          .option('variant', { type: 'string', describe: 'weights variant, e.g. fp16 for *.fp16.safetensors' })
          .option('backward', { type: 'boolean', default: false, describe: 'with --lora and a `target` input: write loss and grad.<key> of every LoRA parameter' }),
      async (a) => {
        const names = await runForwardCommand({
          model: a.model,
          inputs: a.inputs,
          output: a.output,
          lora: a.lora,
          loraScale: a['lora-scale'],
          loraAlpha: a['lora-alpha'],
          prompt: a.prompt,
          device: a.device,
          dtype: a.dtype as Precision,
          variant: a.variant,
          backward: a.backward,
        });
        console.log(`wrote ${a.output}: ${names.join(', ')}`);
      },
    )
    .command(
      'generate',
      'Generate images from prompts with a model and optionally a LoRA (writes OUT/<prompt-index>_<image-index>.png)',
      (y) =>
        y
          .option('model', MODEL_FOLDER)
          .option('lora', { type: 'string', describe: 'LoRA .safetensors (diffusers, peft or kohya keys), a PEFT adapter folder or a training checkpoint folder' })
          .option('lora-scale', { type: 'number', default: 1, describe: 'LoRA strength' })
          .option('lora-alpha', LORA_ALPHA)
          .option('prediction-type', { choices: ['epsilon', 'v_prediction'] as const, describe: "override the scheduler config's (v_prediction for a v-prediction single-file model)" })
          .option('prompt', { type: 'string', array: true, demandOption: true, describe: 'prompt (repeat for several)' })
          .option('negative-prompt', { type: 'string', describe: 'one negative prompt for every image' })
          .option('num-images', { type: 'number', default: 1, describe: 'images per prompt' })
          .option('seed', { type: 'number', default: 0 })
          .option('num-inference-steps', { type: 'number', default: 25, alias: 'steps' })
          .option('guidance-scale', { type: 'number', default: 7.5 })
          .option('width', { type: 'number', describe: 'pixels, a multiple of 8 (default: the UNet sample_size * VAE scale)' })
          .option('height', { type: 'number', describe: 'pixels, a multiple of 8 (default: the UNet sample_size * VAE scale)' })
          .option('scheduler', { choices: SCHEDULER_NAMES, default: 'pndm' as SchedulerName })
          .option('device', RUN_DEVICE)
          .option('dtype', RUN_DTYPE)
          .option('out', { type: 'string', default: 'generated', describe: 'output folder' })
          .option('grid', { type: 'boolean', default: false, describe: 'also write OUT/grid.png with the prompts as labels' }),
      async (a) => {
        const files = await runGenerateCommand({
          model: a.model,
          lora: a.lora,
          loraScale: a['lora-scale'],
          loraAlpha: a['lora-alpha'],
          predictionType: a['prediction-type'],
          prompt: a.prompt.map(String),
          negativePrompt: a['negative-prompt'],
          numImages: a['num-images'],
          seed: a.seed,
          numInferenceSteps: a['num-inference-steps'],
          guidanceScale: a['guidance-scale'],
          width: a.width,
          height: a.height,
          scheduler: a.scheduler as SchedulerName,
          device: a.device,
          dtype: a.dtype as Precision,
          out: a.out,
          grid: a.grid,
        });
        console.log(`wrote ${files.length} file(s): ${files.join(', ')}`);
      },
    )
    .command(
      '$0',
      'Train a LoRA (the default command)',
      (y) => addTrainOptions(y),
      async (a) => {
        await runTrain(a as Record<string, unknown>);
      },
    )
    .strict()
    .wrap(Math.min(120, yargs().terminalWidth()))
    .demandCommand(0)
    .help()
    .alias('h', 'help')
    .version()
    .fail((msg, err) => {
      if (err) throw err;
      console.error(`train-lora: ${msg}\nRun \`train-lora --help\` for the commands and options.`);
      process.exit(2);
    })
    .parseAsync();
}

if (require.main === module) {
  main(hideBin(process.argv)).catch((e: unknown) => {
    const err = e as Error & { code?: string };
    // Some messages (the addon loader's) already name the program.
    console.error(err.message.startsWith('train-lora: ') ? err.message : `train-lora: ${err.message}`);
    process.exitCode = 1;
  });
}
