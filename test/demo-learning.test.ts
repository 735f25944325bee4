/**
 * The demo does what it says: its model is the pre-trained base from assets/demo-base, and its validation pictures
 * move towards the training data over the run (measured on the PNGs the user gets, not on a log line).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { decodeRgb } from '../src/data/images';
import { DEMO_COLORS } from '../src/data/demo-data';
import { DEMO_BASE, makeTinyModel } from '../src/model-folders/model-folder';

const cli = path.resolve(__dirname, '..', 'dist', 'cli.js');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-demo-learn-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

type Rgb = readonly [number, number, number];

/** Mean colour of the outer `ring` pixels on each side of an image, and of its central `core` x `core` square. */
async function regions(file: string, ring = 3, core = 6): Promise<{ border: Rgb; centre: Rgb }> {
  const img = await decodeRgb(file);
  const { width: w, height: h } = img;
  const border = [0, 0, 0];
  const centre = [0, 0, 0];
  let nb = 0;
  let nc = 0;
  for (let y = 0; y < h; y++)
    for (let x = 0; x < w; x++) {
      const o = (y * w + x) * 3;
      if (x < ring || y < ring || x >= w - ring || y >= h - ring) {
        for (let c = 0; c < 3; c++) border[c] += img.data[o + c];
        nb++;
      } else if (Math.abs(x + 0.5 - w / 2) <= core / 2 && Math.abs(y + 0.5 - h / 2) <= core / 2) {
        for (let c = 0; c < 3; c++) centre[c] += img.data[o + c];
        nc++;
      }
    }
  return { border: [border[0] / nb, border[1] / nb, border[2] / nb], centre: [centre[0] / nc, centre[1] / nc, centre[2] / nc] };
}

/** Mean absolute difference per channel, 0-255. */
const distance = (a: Rgb, b: Rgb): number => (Math.abs(a[0] - b[0]) + Math.abs(a[1] - b[1]) + Math.abs(a[2] - b[2])) / 3;

test('the demo model ships the pre-trained base UNet and the text encoder it was trained with', async () => {
  const model = path.join(tmp, 'demo-model');
  await makeTinyModel(model, 'demo', 0);
  for (const f of ['unet/diffusion_pytorch_model.safetensors', 'text_encoder/model.safetensors'])
    expect(fs.readFileSync(path.join(model, f)).equals(fs.readFileSync(path.join(DEMO_BASE, f)))).toBe(true);
  const random = path.join(tmp, 'random-model');
  await makeTinyModel(random, 'demo', 0, { pretrainedBase: false });
  expect(fs.readFileSync(path.join(random, 'unet/diffusion_pytorch_model.safetensors')).equals(fs.readFileSync(path.join(DEMO_BASE, 'unet/diffusion_pytorch_model.safetensors')))).toBe(false);
  expect(JSON.parse(fs.readFileSync(path.join(model, 'unet', 'config.json'), 'utf8')).norm_num_groups).toBe(8);
});

test('npx train-lora --demo: the held-out loss falls and the validation pictures move towards the training data', async () => {
  const out = path.join(tmp, 'run');
  const r = spawnSync(process.execPath, [cli, '--demo', '--output-dir', out], { encoding: 'utf8', timeout: 540000, cwd: tmp, env: { ...process.env, TRAIN_LORA_CACHE: path.join(tmp, 'cache') } });
  expect({ status: r.status, tail: (r.stdout + r.stderr).slice(-2000) }).toMatchObject({ status: 0 });
  const dir = path.join(out, 'validation');
  const steps = fs.readdirSync(dir).map((n) => /^step(\d+)_grid\.png$/.exec(n)).filter((m) => m !== null).map((m) => Number(m[1])).sort((a, b) => a - b);
  expect(steps).toEqual([0, 50, 100, 150, 200]); // --validation-before-training shows the base at step 0
  const images = (step: number) => fs.readdirSync(dir).filter((n) => n.startsWith(`step${String(step).padStart(6, '0')}_prompt`)).sort();
  expect(images(0)).toHaveLength(4);
  expect(images(200)).toEqual(images(0).map((n) => n.replace('step000000', 'step000200')));

  // The LoRA learns: held-out loss at the end vs the base (measured: 0.00702 -> 0.00446).
  const valLoss = new Map(
    fs.readFileSync(path.join(out, 'logs', 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { step: number; val_loss?: number }).filter((m) => m.val_loss !== undefined).map((m) => [m.step, m.val_loss as number]),
  );
  expect(valLoss.get(200)).toBeLessThan(0.8 * (valLoss.get(0) as number));

  // The base draws backgrounds of muted colours (mid brightness); the training data's are white or black. Measured
  // |brightness - 127.5| of the borders, mean of the 4 images: 40 -> 61. The shapes keep the prompts' colours
  // (red, blue: the base knows them): centre distance 10 -> 29 of 255.
  const measure = async (step: number) => {
    let extreme = 0;
    let colour = 0;
    for (const n of images(step)) {
      const { border, centre } = await regions(path.join(dir, n));
      extreme += Math.abs((border[0] + border[1] + border[2]) / 3 - 127.5) / 4;
      colour += distance(centre, n.includes('_prompt0_') ? DEMO_COLORS.red : DEMO_COLORS.blue) / 4;
    }
    return { extreme, colour };
  };
  const before = await measure(0);
  const after = await measure(200);
  expect(after.extreme).toBeGreaterThan(before.extreme + 12);
  expect(after.colour).toBeLessThan(45);
}, 600000);
