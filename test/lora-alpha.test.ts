/**
 * Every LoRA at its true strength (alpha / r), whatever form it comes in. The fixtures in test/fixtures/lora-alpha are
 * one peft adapter (r 4, lora_alpha 16: alpha != rank, random A and B) made by scripts/golden/make_lora_alpha_goldens.py
 * with peft, in the forms users have: the PEFT adapter folder, its adapter_model.safetensors, a checkpoint folder
 * (model.safetensors + trainer_state.json), a file with lora_rank / lora_alpha metadata and a bare PEFT-format file.
 * golden.safetensors holds peft's own UNet output (float64) for the inputs of test/fixtures/golden/tiny.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { CheckpointManager } from '../src/checkpoint/manager';
import { makeDemoData } from '../src/data/demo-data';
import { native, type HostTensor } from '../src/native';
import { byName, relativeError } from '../src/tensors';
import { train } from '../src/train/train';
import { Quiet } from './helpers/quiet-reporter';
import { TINY_MODEL, tinyRunConfig } from './helpers/tiny-run';

const FIX = path.join(__dirname, 'fixtures', 'lora-alpha');
const TOL = 1e-4;

let inputs: HostTensor[];
let golden: Map<string, HostTensor>;

beforeAll(async () => {
  inputs = (await native().safetensorsRead(path.join(__dirname, 'fixtures', 'golden', 'tiny', 'inputs.safetensors'))).tensors.filter((t) =>
    ['latents', 'timesteps', 'encoder_hidden_states'].includes(t.name),
  );
  golden = byName((await native().safetensorsRead(path.join(FIX, 'golden.safetensors'))).tensors);
});

/** noise_pred of the tiny UNet with `lora` applied by `forward` (a fresh pipeline each time). */
async function predWith(lora: string, loraAlpha?: number): Promise<HostTensor> {
  const p = await native().loadPipeline(TINY_MODEL, { components: ['unet'] });
  try {
    return byName(await native().forward(p, inputs, { lora, loraAlpha })).get('noise_pred')!;
  } finally {
    native().dispose(p);
  }
}

describe('a peft LoRA with r 4, lora_alpha 16 gives peft\'s UNet output in every form', () => {
  test('the fixture is strong enough that a wrong alpha fails', () => {
    expect(relativeError(golden.get('noise_pred_peft')!, golden.get('noise_pred_base')!)).toBeGreaterThan(0.05);
  });

  test.each([
    ['the PEFT adapter folder', 'peft_adapter'],
    ['the PEFT adapter folder with a trailing slash', 'peft_adapter/'],
    ['its adapter_model.safetensors (adapter_config.json beside it)', 'peft_adapter/adapter_model.safetensors'],
    ['a checkpoint folder (trainer_state.json)', 'checkpoint'],
    ["a checkpoint's model.safetensors (trainer_state.json beside it)", 'checkpoint/model.safetensors'],
    ['a file with lora_rank / lora_alpha metadata', 'lora_meta.safetensors'],
  ])('%s', async (_name, rel) => {
    const pred = await predWith(path.join(FIX, rel));
    expect(relativeError(pred, golden.get('noise_pred_peft')!)).toBeLessThan(TOL);
  });

  test('a bare PEFT-format file says its strength cannot be known and names --lora-alpha', async () => {
    await expect(predWith(path.join(FIX, 'bare_peft.safetensors'))).rejects.toThrow(/strength cannot be known[\s\S]*--lora-alpha[\s\S]*rank is 4/);
  });

  test('--lora-alpha sets the alpha of a file that does not carry it', async () => {
    expect(relativeError(await predWith(path.join(FIX, 'bare_peft.safetensors'), 16), golden.get('noise_pred_peft')!)).toBeLessThan(TOL);
    // ... and only then: a file that says its alpha keeps it.
    expect(relativeError(await predWith(path.join(FIX, 'peft_adapter'), 4), golden.get('noise_pred_peft')!)).toBeLessThan(TOL);
    expect(relativeError(await predWith(path.join(FIX, 'bare_peft.safetensors'), 4), golden.get('noise_pred_peft')!)).toBeGreaterThan(0.01);
  });

  test('pipelineApplyLora (generate --lora) takes the adapter folder at its alpha', async () => {
    const p = await native().loadPipeline(TINY_MODEL, { components: ['unet'] });
    try {
      expect(await native().pipelineApplyLora(p, path.join(FIX, 'peft_adapter'), 1)).toBe(48);
      const pred = byName(await native().forward(p, inputs)).get('noise_pred')!;
      expect(relativeError(pred, golden.get('noise_pred_peft')!)).toBeLessThan(TOL);
    } finally {
      native().dispose(p);
    }
  });

  test('folders without a LoRA, and full-training checkpoints, are refused by name', async () => {
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-lora-alpha-'));
    try {
      await expect(predWith(tmp)).rejects.toThrow(/a folder without a LoRA: expected a PEFT adapter folder/);
      const full = path.join(tmp, 'full');
      fs.cpSync(path.join(FIX, 'checkpoint'), full, { recursive: true });
      fs.writeFileSync(path.join(full, 'trainer_state.json'), JSON.stringify({ config: { train_mode: 'full', rank: 4 } }));
      await expect(predWith(full)).rejects.toThrow(/--train-mode full checkpoint holds no LoRA/);
      const peft = path.join(tmp, 'adapter');
      fs.cpSync(path.join(FIX, 'peft_adapter'), peft, { recursive: true });
      const cfg = JSON.parse(fs.readFileSync(path.join(peft, 'adapter_config.json'), 'utf8'));
      // alpha_pattern (peft's per-module alpha, what conv adapters use): literal module names are honoured, regexes refused.
      const everyModule = { to_q: 32, to_k: 32, to_v: 32, 'to_out.0': 32 };
      fs.writeFileSync(path.join(peft, 'adapter_config.json'), JSON.stringify({ ...cfg, alpha_pattern: everyModule }));
      expect(relativeError(await predWith(peft), await predWith(path.join(FIX, 'bare_peft.safetensors'), 32))).toBeLessThan(1e-6);
      fs.writeFileSync(path.join(peft, 'adapter_config.json'), JSON.stringify({ ...cfg, alpha_pattern: { 'to_.*': 2 } }));
      await expect(predWith(peft)).rejects.toThrow(/alpha_pattern entry "to_\.\*" is not a module path/);
      // rsLoRA: scale alpha / sqrt(r) = 16 / 2 = 8 = what alpha 32 gives at r 4.
      fs.writeFileSync(path.join(peft, 'adapter_config.json'), JSON.stringify({ ...cfg, use_rslora: true }));
      const rs = await predWith(peft);
      expect(relativeError(rs, await predWith(path.join(FIX, 'bare_peft.safetensors'), 32))).toBeLessThan(1e-6);
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  });
});

describe('checkpoints carry their rank and alpha', () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-lora-alpha-run-'));
  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

  test('model.safetensors metadata has lora_rank / lora_alpha, and the checkpoint loads like the exported LoRA', async () => {
    const data = path.join(tmp, 'data');
    await makeDemoData(data, { count: 4, size: 32, seed: 1 });
    const out = path.join(tmp, 'run');
    const r = await train(tinyRunConfig(out, data, { max_train_steps: 2, checkpointing_steps: 2, lora_alpha: 16 }), new Quiet(), { installSignalHandlers: false });
    expect(r.finished).toBe(true);
    const [ckpt] = await new CheckpointManager(out).list('quick');
    const model = path.join(ckpt.path, 'model.safetensors');
    const meta = (await native().safetensorsHeader(model)).metadata;
    expect([meta.lora_rank, meta.lora_alpha]).toEqual(['4', '16']);
    // The same strength from the file alone (no trainer_state.json beside it), the folder and the exported diffusers file.
    const alone = path.join(tmp, 'alone.safetensors');
    fs.copyFileSync(model, alone);
    const exported = await predWith(path.join(out, 'pytorch_lora_weights.safetensors'));
    for (const lora of [alone, ckpt.path, model]) expect(relativeError(await predWith(lora), exported)).toBeLessThan(1e-6);
  });
});
