/** Generated fixtures: a model folder with seeded random weights, and a captioned shapes dataset. */
import type { Argv } from 'yargs';

import { makeDemoData } from '../data/demo-data';
import { makeTinyModel, type ModelPreset } from '../model-folders/model-folder';

/** `make-tiny-model <out>`. */
export function makeTinyModelCommand<T>(cli: Argv<T>): Argv<T> {
  return cli.command(
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
  );
}

/** `make-demo-data <out>`. */
export function makeDemoDataCommand<T>(cli: Argv<T>): Argv<T> {
  return cli.command(
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
  );
}
