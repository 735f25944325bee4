/** The default command: train (and launch the workers of --num-processes), then say how to resume or continue. */
import * as path from 'node:path';

import type { Argv } from 'yargs';

import { ConfigError } from '../config';
import { launchPlan } from '../distributed/env';
import { superviseWorkers } from '../distributed/launcher';
import { CliReporter } from '../train/reporter';
import { checkOutputDir, nextRunDir } from '../train/resume';
import { train } from '../train/train';
import { demoDefaults } from './demo';
import { commandWithTrainFlags, configFromArgv } from './train-options';

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

/** `$0`: training is the default command. */
export function trainCommand<T>(cli: Argv<T>): Argv<T> {
  return commandWithTrainFlags(cli, '$0', 'Train a LoRA (the default command)', runTrain);
}
