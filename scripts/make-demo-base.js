#!/usr/bin/env node
// Writes assets/demo-base/: the demo model's pre-trained base UNet and the text encoder it was trained with.
//
// A LoRA changes what a model already does; on a random UNet it has nothing to change, and the demo's validation
// pictures stay noise. So the demo model's UNet is pre-trained once, by train-lora itself (--train-mode full), on
// the demo's coloured shapes on backgrounds of random muted colours ("a red circle on a muted background"), starting
// from the seeded random demo model. The demo's LoRA then trains on the same shapes on white or black backgrounds
// ("a red circle on a white background") and its validation grid shows the backgrounds turn white and black.
// The text encoder is the seeded random one the UNet was trained against (kept with it, so that a different
// random-number implementation elsewhere cannot pair the UNet with other text embeddings).
//
// Usage (after `npx tsc -p .` and the native build; ~25 min on 2 CPU cores):
//   node scripts/make-demo-base.js [--steps 3000] [--keep]
'use strict';
const { spawnSync } = require('child_process');
const fs = require('fs');
const os = require('os');
const path = require('path');

const root = path.resolve(__dirname, '..');
const { makeDemoData } = require(path.join(root, 'dist', 'data', 'demo-data'));
const { makeTinyModel, DEMO_RESOLUTION, DEMO_BASE } = require(path.join(root, 'dist', 'model-folders', 'model-folder'));
const { native } = require(path.join(root, 'dist', 'native'));

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : fallback;
}

async function main() {
  const steps = Number(arg('steps', '3000'));
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-demo-base-'));
  const model = path.join(tmp, 'random-model');
  const data = path.join(tmp, 'shapes-random-backgrounds');
  const run = path.join(tmp, 'run');
  await makeTinyModel(model, 'demo', 0, { pretrainedBase: false });
  await makeDemoData(data, { background: 'random', count: 192, size: 64, seed: 1 });
  const flags = [
    '--pretrained-model-name-or-path', model, '--train-data-dir', data, '--output-dir', run, '--device', 'cpu',
    '--resolution', String(DEMO_RESOLUTION), '--center-crop', '--cache-latents', '--caption-dropout-rate', '0.1',
    '--train-mode', 'full', '--train-batch-size', '16', '--gradient-accumulation-steps', '1',
    '--max-train-steps', String(steps), '--learning-rate', '1e-3', '--lr-scheduler', 'cosine', '--lr-warmup-steps', '50',
    '--snr-gamma', '5', '--noise-offset', '0.1', '--seed', '0', '--checkpointing-steps', '500', '--checkpoints-total-limit', '1',
  ];
  const t0 = Date.now();
  const r = spawnSync(process.execPath, [path.join(root, 'dist', 'cli.js'), ...flags], { stdio: 'inherit' });
  if (r.status !== 0) throw new Error(`pre-training failed (exit ${r.status}); its files are in ${tmp}`);
  const seconds = (Date.now() - t0) / 1000;

  const metrics = fs.readFileSync(path.join(run, 'logs', 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l)).filter((m) => m.loss !== undefined);
  const last = metrics.slice(-50);
  const meanLoss = last.reduce((a, m) => a + m.loss, 0) / last.length;

  fs.rmSync(DEMO_BASE, { recursive: true, force: true });
  const write = async (component, file, src, dtype, note) => {
    fs.mkdirSync(path.join(DEMO_BASE, component), { recursive: true });
    const { tensors } = await native().safetensorsRead(src, { dtype });
    await native().safetensorsWrite(path.join(DEMO_BASE, component, file), tensors, { format: 'pt', 'train_lora.note': note });
  };
  const note = `train-lora demo base: scripts/make-demo-base.js, ${steps} full-UNet steps on shapes on random backgrounds`;
  await write('unet', 'diffusion_pytorch_model.safetensors', path.join(run, 'unet', 'diffusion_pytorch_model.safetensors'), 'fp16', note);
  await write('text_encoder', 'model.safetensors', path.join(model, 'text_encoder', 'model.safetensors'), 'fp32', note);
  const provenance = {
    made_by: 'node scripts/make-demo-base.js',
    base: 'make-tiny-model --preset demo, seed 0 (random UNet and text encoder)',
    data: 'makeDemoData({ background: "random", count: 192, size: 64, seed: 1 })',
    flags: flags.map((f) => f.replace(tmp, '<tmp>')),
    steps,
    seconds: Math.round(seconds),
    mean_loss_last_50_steps: Number(meanLoss.toFixed(5)),
    unet_dtype: 'F16',
  };
  fs.writeFileSync(path.join(DEMO_BASE, 'provenance.json'), `${JSON.stringify(provenance, null, 2)}\n`);
  if (process.argv.includes('--keep')) console.log(`kept ${tmp}`);
  else fs.rmSync(tmp, { recursive: true, force: true });
  console.log(`wrote ${DEMO_BASE} (${steps} steps in ${Math.round(seconds)} s, loss ${meanLoss.toFixed(4)})`);
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
