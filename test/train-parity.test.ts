/**
 * The training step against diffusers + peft + accelerate (golden files made by scripts/golden/make_train_golden.py,
 * see test/fixtures/golden/README.md "Training step"): 6 micro-steps with accumulation 2, gradient clipping that
 * really clips, cosine with 2 warmup steps, AdamW. Same initial LoRA, latents, noise, timesteps and captions.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { native } from '../src/native';
import { byName } from '../src/tensors';
import { lrAt, resolveLrSchedule } from '../src/schedules/lr';
import { NoiseSchedule } from '../src/schedules/noise';
import { expectAdaptersMatch, loadAdapters, renamedFrom, savedAdapters } from './helpers/trainer-state';

const fixtures = path.join(__dirname, 'fixtures');
const model = path.join(fixtures, 'models', 'tiny');
const golden = path.join(fixtures, 'golden', 'train');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-trainparity-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

const scenarios = [
  // name, tolerance on final weights, on losses / grad norms (bigstep uses lr 1.0: chaotic; its fp32-vs-fp64
  // floor is ~4e-3 on the weights and 2.6e-4 on the last grad norm)
  ['default', 1e-4, 1e-5],
  ['snr', 1e-4, 1e-5],
  ['bigstep', 2e-2, 2e-3],
] as const;

describe.each(scenarios)('scenario %s', (scenario, tol, scalarTol) => {
  test('per-micro-step losses, per-step LRs and grad norms, and final LoRA weights match diffusers + peft', async () => {
    const info = JSON.parse(fs.readFileSync(path.join(golden, `expected_${scenario}.json`), 'utf8')) as Record<string, number | string | boolean | null>;
    const inputs = byName((await native().safetensorsRead(path.join(golden, 'inputs.safetensors'))).tensors);
    const expected = byName((await native().safetensorsRead(path.join(golden, `expected_${scenario}.safetensors`))).tensors);

    const noise = NoiseSchedule.fromFile(path.join(model, 'scheduler', 'scheduler_config.json'), { predictionType: info.prediction_type as 'epsilon' });
    const pipe = await native().loadPipeline(model, { components: ['unet', 'text_encoder'] });
    const { trainer } = await native().createTrainer(pipe, {
      rank: 4,
      alpha: 8,
      predictionType: info.prediction_type as 'epsilon' | 'v_prediction',
      snrGamma: typeof info.snr_gamma === 'number' ? info.snr_gamma : undefined,
      alphasCumprod: Array.from(noise.alphasCumprod),
      maxGradNorm: info.max_grad_norm as number,
      adamWeightDecay: 1e-2,
      seed: 1234,
    });
    // Start from the reference's initial adapters (peft's gaussian init, drawn by torch's RNG in Python).
    const init = renamedFrom('lora_init.', inputs);
    await loadAdapters(trainer, path.join(tmp, scenario), init);

    const spec = resolveLrSchedule({ kind: 'cosine', baseLr: info.learning_rate as number, warmupSteps: 2, totalSteps: 3 });
    let step = 0;
    for (let i = 0; i < 6; i++) {
      const loss = await native().trainerMicroStep(
        trainer,
        { latents: inputs.get(`latents.${i}`)!, noise: inputs.get(`noise.${i}`)!, timesteps: inputs.get(`timesteps.${i}`)!, inputIds: inputs.get(`input_ids.${i}`)! },
        2,
      );
      expect({ i, rel: Math.abs(loss - (info[`loss.${i}`] as number)) / Math.abs(info[`loss.${i}`] as number) < scalarTol }).toEqual({ i, rel: true });
      if (i % 2 === 1) {
        const lr = lrAt(spec, step);
        expect(lr).toBeCloseTo(info[`lr.${step}`] as number, 12);
        const r = await native().trainerOptimizerStep(trainer, lr);
        expect(Math.abs(r.gradNorm - (info[`grad_norm.${step}`] as number)) / (info[`grad_norm.${step}`] as number)).toBeLessThan(scalarTol);
        step++;
      }
    }
    // Clipping really happened in this scenario (so matching the weights proves it is applied).
    expect([0, 1, 2].some((k) => info[`clipped.${k}`] === true)).toBe(true);

    const final = await savedAdapters(trainer, path.join(tmp, `${scenario}-out`));
    expect(expectAdaptersMatch(final, expected, byName(init), tol)).toHaveLength(96);
    native().dispose(pipe);
  });
});
