/** The demo model's hand-set VAE is an autoencoder (so the demo's pictures show what the LoRA learned) with diffusers' parameter names. */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { makeDemoData } from '../src/data/demo-data';
import { processImage } from '../src/data/images';
import { DEMO_RESOLUTION, makeTinyModel } from '../src/model-folders/model-folder';
import { native } from '../src/native';
import { fromFloat32 } from '../src/tensors';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-dvae-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

test('encode then decode gives the image back (2x2-averaged) within 0.02, with the tiny preset\'s names and shapes', async () => {
  const model = path.join(tmp, 'demo-model');
  await makeTinyModel(model, 'demo', 0);
  const tinyHeader = await native().safetensorsHeader(path.join(__dirname, 'fixtures', 'models', 'tiny', 'vae', 'diffusion_pytorch_model.safetensors'));
  const tinyShapes = Object.fromEntries(tinyHeader.tensors.map((t) => [t.name, t.shape]));
  const h = await native().safetensorsHeader(path.join(model, 'vae', 'diffusion_pytorch_model.safetensors'));
  expect(Object.fromEntries(h.tensors.map((t) => [t.name, t.shape]))).toEqual(tinyShapes);
  const data = await makeDemoData(path.join(tmp, 'data'), { count: 4, size: 64, seed: 1 });
  const pipe = await native().loadPipeline(model, { components: ['vae'] });
  const r = DEMO_RESOLUTION;
  for (const item of data.items) {
    const { pixels } = await processImage(path.join(data.root, item.file), { resolution: r, centerCrop: true, randomFlip: false, interpolation: 'lanczos' });
    const [mean, std] = await native().vaeEncode(pipe, fromFloat32('image', [1, 3, r, r], pixels));
    expect(mean.shape).toEqual([1, 4, r / 2, r / 2]);
    const s = new Float32Array(std.data.buffer.slice(std.data.byteOffset, std.data.byteOffset + std.data.byteLength));
    expect(Math.max(...s)).toBeLessThan(1e-5);
    const [dec] = (await native().forward(pipe, [{ ...mean, name: 'vae_latents' }])).filter((t) => t.name === 'vae_decoded');
    const d = new Float32Array(dec.data.buffer.slice(dec.data.byteOffset, dec.data.byteOffset + dec.data.byteLength));
    let err = 0;
    for (let c = 0; c < 3; c++)
      for (let y = 0; y < r; y++)
        for (let x = 0; x < r; x++) {
          const at = (yy: number, xx: number) => pixels[c * r * r + yy * r + xx];
          const y0 = y - (y % 2);
          const x0 = x - (x % 2);
          const avg = (at(y0, x0) + at(y0, x0 + 1) + at(y0 + 1, x0) + at(y0 + 1, x0 + 1)) / 4;
          err = Math.max(err, Math.abs(d[c * r * r + y * r + x] - avg));
        }
    expect(err).toBeLessThan(0.02);
  }
  native().dispose(pipe);
}, 120000);
