/**
 * test-setup's memory estimate (src/commands/test-setup.ts): the arithmetic, its calibration against the measured
 * SD 1.5 peaks (`npm run bench -- --memory`, README "Performance"), and the check that fails a run that will not fit
 * the chosen device.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { estimateTrainingMemory, memoryEstimateCheck, memoryFitCheck, SD15_UNET_PARAMS, type MemoryEstimateInput } from '../src/commands/test-setup';
import type { DeviceInfo } from '../src/native';
import { TINY_MODEL, tinyRunConfig } from './helpers/tiny-run';

const GiB = 2 ** 30;
// SD 1.5: UNet 859.5 M, VAE 83.7 M, text encoder 123.1 M parameters.
const SD15_TOTAL = SD15_UNET_PARAMS + 83_653_863 + 123_060_480;
const sd15 = (over: Partial<MemoryEstimateInput> = {}): MemoryEstimateInput => ({
  device: 'cpu', totalParams: SD15_TOTAL, unetParams: SD15_UNET_PARAMS, weightBytes: 4, trainableParams: 797_184, trainMode: 'lora',
  resolution: 512, batch: 1, gradientCheckpointing: false, mixedPrecision: 'no', ...over,
});

test('SD 1.5 LoRA at 512 px, batch 1, fp32 on the CPU: within 25 % of the measured peaks, checkpointing lower', () => {
  // Peak RSS measured with `npm run bench -- --memory` (README "Performance").
  const measured = { plain: MEASURED_PEAK_GB.plain * GiB, checkpointed: MEASURED_PEAK_GB.checkpointed * GiB };
  const plain = estimateTrainingMemory(sd15()).bytes;
  const ckpt = estimateTrainingMemory(sd15({ gradientCheckpointing: true })).bytes;
  expect(Math.abs(plain / measured.plain - 1)).toBeLessThan(0.25);
  expect(Math.abs(ckpt / measured.checkpointed - 1)).toBeLessThan(0.25);
  expect(ckpt).toBeLessThan(plain);
});

test('activations scale with batch, resolution squared, the UNet size and half precision; full mode adds 16 bytes per UNet weight', () => {
  const base = estimateTrainingMemory(sd15());
  expect(estimateTrainingMemory(sd15({ batch: 4 })).parts.activations).toBeCloseTo(4 * base.parts.activations, 0);
  expect(estimateTrainingMemory(sd15({ resolution: 256 })).parts.activations).toBeCloseTo(base.parts.activations / 4, 0);
  expect(estimateTrainingMemory(sd15({ unetParams: SD15_UNET_PARAMS / 2 })).parts.activations).toBeCloseTo(base.parts.activations / 2, 0);
  expect(estimateTrainingMemory(sd15({ mixedPrecision: 'bf16' })).parts.activations).toBeCloseTo(0.6 * base.parts.activations, 0);
  expect(base.parts.weights).toBe(SD15_TOTAL * 4);
  const full = estimateTrainingMemory(sd15({ trainMode: 'full', trainableParams: SD15_UNET_PARAMS }));
  expect(full.parts.weights).toBe((SD15_TOTAL - SD15_UNET_PARAMS) * 4);
  expect(full.parts.trainable).toBe(SD15_UNET_PARAMS * 16);
});

test('the check fails a run that will not fit the device, names what to change, and passes one that fits', () => {
  const x = sd15({ device: 'cuda', batch: 8, weightBytes: 2, mixedPrecision: 'bf16' });
  const tooBig = memoryFitCheck(estimateTrainingMemory(x), 'cuda:0', 8 * GiB, x);
  expect(tooBig.ok).toBe(false);
  expect(tooBig.detail).toMatch(/will not fit in cuda:0's 8(\.0)? GiB/);
  expect(tooBig.fix).toMatch(/--train-batch-size/);
  expect(tooBig.fix).toMatch(/--gradient-checkpointing/);
  const fits = memoryFitCheck(estimateTrainingMemory(x), 'cuda:0', 80 * GiB, x);
  expect(fits.ok).toBe(true);
  expect(fits.detail).toMatch(/% of cuda:0's 80(\.0)? GiB/);
  const unknown = memoryFitCheck(estimateTrainingMemory(x), 'mps', undefined, x);
  expect(unknown.ok).toBe(true);
  expect(unknown.detail).toMatch(/does not report its memory/);
});

test('memoryEstimateCheck counts the model from its safetensors headers and compares with the device', async () => {
  const data = fs.mkdtempSync(path.join(os.tmpdir(), 'mem-est-'));
  const cfg = tinyRunConfig(path.join(data, 'out'), data, { device: 'cuda' });
  const gpu = (totalMemory: number): DeviceInfo[] => [{ type: 'cuda', index: 0, available: true, totalMemory }];
  const small = await memoryEstimateCheck(cfg, 'cuda:0', gpu(64 * 2 ** 20), 'no', 'fp32');
  expect(small.ok).toBe(false);
  expect(small.detail).toMatch(/will not fit in cuda:0's 64(\.0)? MiB/);
  const big = await memoryEstimateCheck(cfg, 'cuda:0', gpu(80 * GiB), 'no', 'fp32');
  expect(big.ok).toBe(true);
  // The tiny model's weights are counted (not SD 1.5's): a few MB.
  expect(big.detail).toMatch(/weights [\d.]+ (KiB|MiB)/);
  expect(TINY_MODEL).toBe(cfg.pretrained_model_name_or_path);
  fs.rmSync(data, { recursive: true, force: true });
});

/** Measured peaks (GiB; 6980 and 5930 MB) of the SD 1.5-shaped model, 512 px, batch 1, fp32, CPU: README "Performance". */
const MEASURED_PEAK_GB = { plain: 6980 / 1024, checkpointed: 5930 / 1024 };
