/**
 * Numerical parity with diffusers / transformers / peft on the same weights and inputs. The golden files in
 * test/fixtures/golden were made by scripts/golden/make_goldens.py (see the README there) in float64; fp32 must
 * agree within 1e-4 relative error per tensor.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { native, type HostTensor, type PipelineHandle } from '../src/native';
import { byName, relativeError } from '../src/tensors';
import { writeSparseSafetensors } from './helpers/sparse-safetensors';

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
  // SD 1.5's configs (assets/sd15-model) with weight files that have the real checkpoints' every name and shape
  // (test/fixtures/sd15/*_param_shapes.json) as sparse files: the pipeline loads them the way it loads real weights,
  // and loading refuses any missing, extra or misshapen tensor.
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-sd15-'));
  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
  const COMPONENTS = [
    ['unet', 'diffusion_pytorch_model', 686, 859520964],
    ['vae', 'diffusion_pytorch_model', 248, 83653863],
    ['text_encoder', 'model', 196, 123060480],
  ] as const;
  const realShapes = (kind: string) => JSON.parse(fs.readFileSync(path.join(fixtures, 'sd15', `${kind}_param_shapes.json`), 'utf8')) as Record<string, number[]>;
  const numel = (shapes: Record<string, number[]>) => Object.values(shapes).reduce((a, s) => a + s.reduce((x, y) => x * y, 1), 0);
  /** An SD 1.5 folder whose `kind` weights are `shapes` (the real ones unless given). */
  function sd15Folder(name: string, change?: { kind: string; shapes: Record<string, number[]> }): string {
    const dir = path.join(tmp, name);
    fs.cpSync(path.join(__dirname, '..', 'assets', 'sd15-model'), dir, { recursive: true });
    for (const [kind, stem] of COMPONENTS)
      writeSparseSafetensors(path.join(dir, kind, `${stem}.safetensors`), change?.kind === kind ? change.shapes : realShapes(kind));
    return dir;
  }

  test('the real checkpoints\' names and shapes load into the modules built from SD 1.5\'s config.json', async () => {
    for (const [kind, , count, params] of COMPONENTS) {
      expect([kind, Object.keys(realShapes(kind)).length, numel(realShapes(kind))]).toEqual([kind, count, params]);
    }
    const pipe = await native().loadPipeline(sd15Folder('real'));
    try {
      // Rank-4 LoRA on the attention projections: peft's count for SD 1.5 (diffusers' script prints the same).
      const { trainer, trainableParams, totalParams } = await native().createTrainer(pipe, { rank: 4, alphasCumprod: [0.5] });
      native().dispose(trainer);
      expect(trainableParams).toBe(797184);
      expect(totalParams).toBe(859520964 + 83653863 + 123060480 + 797184);
    } finally {
      native().dispose(pipe);
    }
  });

  test.each(COMPONENTS.map(([kind]) => [kind] as const))('%s: a missing, an extra or a misshapen tensor is refused, naming it', async (kind) => {
    const real = realShapes(kind);
    const [first, second] = Object.keys(real);
    const { [first]: _dropped, ...missing } = real;
    const cases: Array<[string, Record<string, number[]>, RegExp]> = [
      ['missing', missing, new RegExp(first.replace(/\./g, '\\.'))],
      ['extra', { ...real, 'extra.weight': [2] }, /extra\.weight/],
      ['misshapen', { ...real, [second]: [...real[second].slice(0, -1), real[second][real[second].length - 1] + 1] }, new RegExp(second.replace(/\./g, '\\.'))],
    ];
    for (const [what, shapes, named] of cases) {
      await expect(native().loadPipeline(sd15Folder(`${kind}-${what}`, { kind, shapes }), { components: [kind] })).rejects.toThrow(named);
    }
  });
});
