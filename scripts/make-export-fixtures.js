#!/usr/bin/env node
// Writes the LoRA fixtures the export tests load: a LoRA checkpoint of a short seeded training run on
// test/fixtures/models/tiny (3 steps at lr 1e-2, so every lora_B is far from zero), and that checkpoint exported by
// train-lora in every format. Two sets, each regenerated on its own:
//   export        test/fixtures/export/: attention adapters at --rank 4 / --lora-alpha 8; then
//                 scripts/golden/make_export_goldens.py loads the files with peft / diffusers.
//   lora-targets  test/fixtures/lora-targets/: every module kind kohya trains (--lora-target-preset full: attention,
//                 ff, proj_in/proj_out (1x1 conv here), time_emb_proj, conv_shortcut at --rank 2 / --lora-alpha 4, and
//                 the 3x3 ResNet and sampler convs at --conv-rank 1 / --conv-alpha 0.5); then
//                 scripts/golden/make_lora_targets_goldens.py loads them with peft / diffusers / sd-scripts.
//
// Usage (after `npx tsc -p .` and the native build): node scripts/make-export-fixtures.js export|lora-targets
'use strict';
const fs = require('fs');
const os = require('os');
const path = require('path');

const root = path.resolve(__dirname, '..');
const { parseTrainConfig } = require(path.join(root, 'dist', 'config'));
const { makeDemoData } = require(path.join(root, 'dist', 'data', 'demo-data'));
const { train } = require(path.join(root, 'dist', 'train', 'train'));
const { exportCheckpoint } = require(path.join(root, 'dist', 'export', 'lora-export'));

const SETS = {
  export: { rank: 4, lora_alpha: 8 },
  'lora-targets': { rank: 2, lora_alpha: 4, lora_target_preset: 'full', conv_rank: 1, conv_alpha: 0.5 },
};

const quiet = { info() {}, warn() {}, error() {}, step() {} };

async function main(set) {
  if (!SETS[set]) throw new Error(`usage: node scripts/make-export-fixtures.js ${Object.keys(SETS).join('|')}`);
  const out = path.join(root, 'test', 'fixtures', set);
  const model = path.join(root, 'test', 'fixtures', 'models', 'tiny');
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), `tl-${set}-fixtures-`));
  try {
    const data = path.join(tmp, 'data');
    await makeDemoData(data, { count: 4, size: 32, seed: 0 });
    const run = path.join(tmp, 'run');
    const cfg = parseTrainConfig({
      pretrained_model_name_or_path: model,
      train_data_dir: data,
      output_dir: run,
      device: 'cpu',
      resolution: 32,
      train_batch_size: 2,
      gradient_accumulation_steps: 1,
      max_train_steps: 3,
      learning_rate: 1e-2,
      lr_scheduler: 'constant',
      lr_warmup_steps: 0,
      checkpointing_steps: 3,
      seed: 7,
      mixed_precision: 'no',
      save_format: [],
      ...SETS[set],
    });
    await train(cfg, quiet, { installSignalHandlers: false });
    fs.rmSync(out, { recursive: true, force: true });
    fs.mkdirSync(out, { recursive: true });
    fs.cpSync(path.join(run, 'checkpoints', 'checkpoint-3'), path.join(out, 'checkpoint-3'), { recursive: true });
    const r = await exportCheckpoint(path.join(out, 'checkpoint-3'), { formats: ['diffusers', 'peft', 'kohya'], out: path.join(out, 'lora'), model });
    console.log(r.files.map((f) => path.relative(root, f)).join('\n'));
  } finally {
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

main(process.argv[2]).catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
