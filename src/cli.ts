#!/usr/bin/env node
/**
 * train-lora: the command line. `train` is the default command; every command lives in src/commands/ and is added
 * here in help order.
 */
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';

import { checkpointsCommand, listRunsCommand } from './commands/checkpoints';
import { devicesCommand } from './commands/devices';
import { forwardCommand } from './commands/forward';
import { generateCommand } from './commands/generate';
import { makeDemoDataCommand, makeTinyModelCommand } from './commands/make';
import { testSetupCommand } from './commands/test-setup';
import { trainCommand } from './commands/train';
import { addTrainOptions, normalizeTrainArgs } from './commands/train-options';
import { ConfigError } from './config';

export { rerunCommand } from './commands/train';

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

const COMMANDS = [
  devicesCommand,
  checkpointsCommand,
  listRunsCommand,
  testSetupCommand,
  makeTinyModelCommand,
  makeDemoDataCommand,
  forwardCommand,
  generateCommand,
  trainCommand,
];

export async function main(argv: string[]): Promise<void> {
  let cli = yargs(normalizeArgs(argv))
    .scriptName('train-lora')
    .usage('$0 [command] [options]\n\nLoRA fine-tuning of Stable Diffusion 1.5 on a folder of images and captions,\nwith checkpoints that survive crashes, Ctrl+C and full disks.');
  for (const add of COMMANDS) cli = add(cli);
  await cli
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
