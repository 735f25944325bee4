/**
 * Numerical parity with diffusers / transformers / peft on the same weights and inputs. The golden files in
 * test/fixtures/golden were made by scripts/golden/make_goldens.py (see the README there) in float64; fp32 must
 * agree within 1e-4 relative error per tensor.
 */
import * as path from 'node:path';

import { native, type HostTensor, type PipelineHandle } from '../src/native';
import { byName, relativeError } from '../src/tensors';

const fixtures = path.join(__dirname, 'fixtures');
const TOL = 1e-4;

async function read(file: string): Promise<Map<string, HostTensor>> {
  return byName((await native().safetensorsRead(file)).tensors);
}

function pick(m: Map<string, HostTensor>, names: string[]): HostTensor[] {
  return names.map((n) => {
    const t = m.get(n);
    if (!t) throw new Error(`golden input ${n} missing`);
    return t;
  });
}

/** Maps a gradient key of any LoRA format to the diffusers key used in the golden outputs. */
function diffusersGradKey(key: string, kohyaToPath: Map<string, string>): string {
  const k = key.slice('grad.'.length);
  const kohya = /^lora_unet_(.+)\.lora_(down|up)\.weight$/.exec(k);
  if (kohya) {
    const p = kohyaToPath.get(kohya[1]);
    if (!p) throw new Error(`no module for kohya key ${k}`);
    return `grad.unet.${p}.lora.${kohya[2]}.weight`;
  }
  return 'grad.' + k.replace(/\.lora_A\.weight$/, '.lora.down.weight').replace(/\.lora_B\.weight$/, '.lora.up.weight');
}

describe.each(['tiny', 'alt'])('%s model', (name) => {
  let inputs: Map<string, HostTensor>;
  let ref: Map<string, HostTensor>;
  let unet: PipelineHandle;
  const golden = path.join(fixtures, 'golden', name);
  const unetInputs = ['latents', 'timesteps', 'encoder_hidden_states'];

  beforeAll(async () => {
    inputs = await read(path.join(golden, 'inputs.safetensors'));
    ref = await read(path.join(golden, 'outputs.safetensors'));
    unet = await native().loadPipeline(path.join(fixtures, 'models', name), { components: ['unet'] });
  });

  test('UNet noise_pred', async () => {
    const out = byName(await native().forward(unet, pick(inputs, unetInputs)));
    const err = relativeError(out.get('noise_pred')!, ref.get('noise_pred')!);
    expect(err).toBeLessThan(TOL);
  });

  test.each(['pytorch_lora_weights', 'lora_peft', 'lora_kohya'])('UNet with LoRA from %s: noise_pred, loss and every gradient', async (file) => {
    const out = await native().forward(unet, pick(inputs, [...unetInputs, 'target']), {
      lora: path.join(golden, `${file}.safetensors`),
      backward: true,
    });
    const m = byName(out);
    expect(relativeError(m.get('noise_pred')!, ref.get('noise_pred_lora')!)).toBeLessThan(TOL);
    expect(relativeError(m.get('loss')!, ref.get('loss_lora')!)).toBeLessThan(TOL);
    // kohya names map back to module paths through the diffusers key list.
    const kohyaToPath = new Map<string, string>();
    for (const k of ref.keys()) {
      const mm = /^grad\.unet\.(.+)\.lora\.down\.weight$/.exec(k);
      if (mm) kohyaToPath.set(mm[1].replace(/\./g, '_'), mm[1]);
    }
    const grads = out.filter((t) => t.name.startsWith('grad.'));
    const refGrads = [...ref.keys()].filter((k) => k.startsWith('grad.'));
    expect(grads.length).toBe(refGrads.length);
    for (const g of grads) {
      const want = ref.get(diffusersGradKey(g.name, kohyaToPath));
      expect(want).toBeDefined();
      expect({ key: g.name, err: relativeError(g, want!) }).toEqual({ key: g.name, err: expect.any(Number) });
      expect(relativeError(g, want!)).toBeLessThan(TOL);
    }
  });

  test('LoRA really changes the output (the comparison above is not vacuous)', () => {
    expect(relativeError(ref.get('noise_pred_lora')!, ref.get('noise_pred')!)).toBeGreaterThan(0.05);
  });
});

describe.each(['tiny', 'alt'])('%s model: text encoder and VAE', (name) => {
  let inputs: Map<string, HostTensor>;
  let ref: Map<string, HostTensor>;
  let pipe: PipelineHandle;
  const golden = path.join(fixtures, 'golden', name);

  beforeAll(async () => {
    inputs = await read(path.join(golden, 'inputs.safetensors'));
    ref = await read(path.join(golden, 'outputs.safetensors'));
    pipe = await native().loadPipeline(path.join(fixtures, 'models', name), { components: ['text_encoder', 'vae'] });
  });

  test('text_embeddings (CLIP last_hidden_state)', async () => {
    const out = byName(await native().forward(pipe, pick(inputs, ['input_ids'])));
    expect(relativeError(out.get('text_embeddings')!, ref.get('text_embeddings')!)).toBeLessThan(TOL);
  });

  test('VAE encode (latent_dist mean and std) and decode', async () => {
    const out = byName(await native().forward(pipe, pick(inputs, ['image', 'vae_latents'])));
    for (const k of ['vae_mean', 'vae_std', 'vae_decoded']) expect({ k, err: relativeError(out.get(k)!, ref.get(k)!) < TOL }).toEqual({ k, err: true });
  });
});

describe('text-encoder LoRA and gradient checkpointing (tiny)', () => {
  const golden = path.join(fixtures, 'golden', 'tiny');
  test.each(['text_lora_peft', 'text_lora_kohya'])('text_embeddings with the LoRA from %s', async (file) => {
    const inputs = await read(path.join(golden, 'inputs.safetensors'));
    const ref = await read(path.join(golden, 'outputs.safetensors'));
    const pipe = await native().loadPipeline(path.join(fixtures, 'models', 'tiny'), { components: ['text_encoder'] });
    const out = byName(await native().forward(pipe, pick(inputs, ['input_ids']), { lora: path.join(golden, `${file}.safetensors`) }));
    expect(relativeError(out.get('text_embeddings')!, ref.get('text_embeddings_lora')!)).toBeLessThan(TOL);
    expect(relativeError(ref.get('text_embeddings_lora')!, ref.get('text_embeddings')!)).toBeGreaterThan(0.05);
  });

  test('gradients through checkpointed blocks equal the plain backward', async () => {
    const inputs = await read(path.join(golden, 'inputs.safetensors'));
    const pipe = await native().loadPipeline(path.join(fixtures, 'models', 'tiny'), { components: ['unet'] });
    const batch = pick(inputs, ['latents', 'timesteps', 'encoder_hidden_states', 'target']);
    const lora = path.join(golden, 'lora_peft.safetensors');
    const plain = byName(await native().forward(pipe, batch, { lora, backward: true }));
    const ckpt = byName(await native().forward(pipe, batch, { lora, backward: true, gradientCheckpointing: true }));
    const grads = [...plain.keys()].filter((k) => k.startsWith('grad.'));
    expect(grads.length).toBe(96);
    for (const k of grads) {
      const g = ckpt.get(k)!;
      // A gradient that checkpointing lost would be all zeros: relative error 1.
      expect({ k, ok: relativeError(g, plain.get(k)!) < 1e-6 }).toEqual({ k, ok: true });
    }
  });
});

describe('SD 1.5 architecture (names and shapes of the real checkpoints)', () => {
  test.each([
    ['unet', 686, 859520964],
    ['vae', 248, 83653863],
    ['text_encoder', 196, 123060480],
  ] as const)('%s built from the SD 1.5 config.json has every parameter name and shape of the real checkpoint', async (kind, count, params) => {
    const ours = await native().componentParamShapes(path.join(__dirname, '..', 'assets', 'sd15-model', kind), kind);
    const real = JSON.parse(require('node:fs').readFileSync(path.join(fixtures, 'sd15', `${kind}_param_shapes.json`), 'utf8')) as Record<string, number[]>;
    expect(Object.keys(real).length).toBe(count);
    expect(Object.keys(ours).sort()).toEqual(Object.keys(real).sort());
    for (const [k, shape] of Object.entries(real)) expect([k, ours[k]]).toEqual([k, shape]);
    expect(Object.values(ours).reduce((a, s) => a + s.reduce((x, y) => x * y, 1), 0)).toBe(params);
  });
});
