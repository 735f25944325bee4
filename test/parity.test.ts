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
