/**
 * LoRA beyond attention (issue 16 item 4): ff, proj_in/proj_out (1x1 convs in SD 1.x) and LoCon (3x3 ResNet and sampler
 * convs at --conv-rank/--conv-alpha), the --lora-target-preset sets, the three export formats and kohya-file loading.
 *
 * Fixtures (test/fixtures/lora-targets): a 3-step run on models/tiny with --lora-target-preset full --rank 2
 * --lora-alpha 4 --conv-rank 1 --conv-alpha 0.5 (scripts/make-export-fixtures.js lora-targets) and its exports; golden.* from
 * scripts/golden/make_lora_targets_goldens.py: the UNet output with each file loaded by diffusers, peft and sd-scripts'
 * own network loader (all equal), the merged UNet, and sd-scripts' module sets on models/tiny and on SD 1.5.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { verifyCommand } from '../src/commands/checkpoints';
import { loraTargetModules, parseTrainConfig, type LoraTargetPreset } from '../src/config';
import { makeDemoData } from '../src/data/demo-data';
import { exportCheckpoint, LORA_FILES } from '../src/export/lora-export';
import { native, type HostTensor } from '../src/native';
import { byName, relativeError, relativeErrorOf, toNumbers } from '../src/tensors';
import { train } from '../src/train/train';
import { Quiet } from './helpers/quiet-reporter';
import { TINY_MODEL, tinyRunConfig } from './helpers/tiny-run';

const FIX = path.join(__dirname, 'fixtures', 'lora-targets');
const LORA = path.join(FIX, 'lora');
const CKPT = path.join(FIX, 'checkpoint-3');
const SD15 = path.join(__dirname, 'fixtures', 'sd15');
const TOL = 1e-4;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-lora-targets-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

/** [kohya module name, kind ("Linear" | "Conv2d1x1" | "Conv2d3x3"), rank, alpha] as sd-scripts' LoRANetwork builds them. */
type KohyaModule = [string, string, number, number];
interface Golden {
  sdscripts_tiny_default: KohyaModule[];
  sdscripts_tiny_conv: KohyaModule[];
  sdscripts_sd15_default: KohyaModule[];
  sdscripts_sd15_conv: KohyaModule[];
  sdscripts_modules_loaded: number;
  diffusers_config: { r: number; lora_alpha: number; rank_pattern: number; alpha_pattern: number };
  peft_config: { r: number; lora_alpha: number; rank_pattern: number; alpha_pattern: number };
}
const golden = JSON.parse(fs.readFileSync(path.join(FIX, 'golden.json'), 'utf8')) as Golden;
let preds: Map<string, HostTensor>;
let inputs: HostTensor[];

beforeAll(async () => {
  inputs = (await native().safetensorsRead(path.join(__dirname, 'fixtures', 'golden', 'tiny', 'inputs.safetensors'))).tensors.filter((t) =>
    ['latents', 'timesteps', 'encoder_hidden_states'].includes(t.name),
  );
  preds = byName((await native().safetensorsRead(path.join(FIX, 'golden.safetensors'))).tensors);
});

async function predWith(lora?: string, model = TINY_MODEL): Promise<HostTensor> {
  const p = await native().loadPipeline(model, { components: ['unet'] });
  try {
    return byName(await native().forward(p, inputs, lora ? { lora } : {})).get('noise_pred')!;
  } finally {
    native().dispose(p);
  }
}

const underscored = (s: string) => s.replace(/\./g, '_');

/** Module paths of a UNet's Linear (2-D weight) and Conv2d (4-D weight) layers, with the conv kernel, from a shape table. */
function layers(shapes: Record<string, number[]>): Map<string, string> {
  const out = new Map<string, string>();
  for (const [k, s] of Object.entries(shapes)) {
    if (!k.endsWith('.weight')) continue;
    if (s.length === 2) out.set(k.slice(0, -7), 'Linear');
    else if (s.length === 4) out.set(k.slice(0, -7), `Conv2d${s[2]}x${s[3]}`);
  }
  return out;
}

/** peft's rule (what inject_lora uses): a module matches a target when its path equals it or ends with "." + target. */
const matches = (p: string, targets: readonly string[]) => targets.some((t) => p === t || p.endsWith(`.${t}`));

describe('every format holds every module kind and loads like diffusers, peft and sd-scripts', () => {
  test('the fixture is strong, and the references agree (diffusers = peft = kohya converter = sd-scripts)', () => {
    const d = preds.get('noise_pred_diffusers')!;
    expect(relativeError(d, preds.get('noise_pred_base')!)).toBeGreaterThan(0.05);
    for (const k of ['noise_pred_peft', 'noise_pred_kohya', 'noise_pred_sdscripts']) expect(relativeError(preds.get(k)!, d)).toBeLessThan(1e-6);
    expect(golden.sdscripts_modules_loaded).toBe(117);
    // One adapter config: r/lora_alpha of the Linear and 1x1 modules, the 26 3x3 convs in rank_pattern/alpha_pattern.
    for (const c of [golden.diffusers_config, golden.peft_config]) expect(c).toEqual({ r: 2, lora_alpha: 4, rank_pattern: 26, alpha_pattern: 26 });
  });

  test.each([
    ['diffusers', LORA_FILES.diffusers],
    ['peft folder', 'lora_weights'],
    ['kohya', LORA_FILES.kohya],
  ])('forward --lora with the %s file gives the references\' output', async (_n, rel) => {
    expect(relativeError(await predWith(path.join(LORA, rel)), preds.get('noise_pred_sdscripts')!)).toBeLessThan(TOL);
  });

  test('a LoCon file written by sd-scripts itself (alpha 1, conv_alpha 1, dim 2 / conv_dim 1) loads for forward and generate', async () => {
    const f = path.join(FIX, 'sdscripts_locon.safetensors');
    const want = preds.get('noise_pred_sdscripts_file')!;
    expect(relativeError(want, preds.get('noise_pred_base')!)).toBeGreaterThan(0.05);
    expect(relativeError(await predWith(f), want)).toBeLessThan(TOL);
    // generate --lora applies it the same way (pipelineApplyLora), at --lora-scale.
    const p = await native().loadPipeline(TINY_MODEL, { components: ['unet'] });
    try {
      expect(await native().pipelineApplyLora(p, f, 1)).toBe(117);
      expect(relativeError(byName(await native().forward(p, inputs)).get('noise_pred')!, want)).toBeLessThan(TOL);
    } finally {
      native().dispose(p);
    }
  });

  test('checkpoints verify accepts a LoCon checkpoint (3x3 conv adapters at conv_rank)', async () => {
    const r = await verifyCommand(CKPT);
    expect([r.ok, r.text]).toEqual([true, expect.stringMatching(/: ok \(step 3/)]);
  });

  test('the checkpoint folder itself loads at its alphas (--lora-alpha for Linear/1x1, --conv-alpha for 3x3 convs)', async () => {
    expect(relativeError(await predWith(CKPT), preds.get('noise_pred_diffusers')!)).toBeLessThan(TOL);
  });

  test('the exporter still writes the golden-tested files (bit-identical), and --merge folds conv adapters in', async () => {
    const out = path.join(tmp, 'export');
    const r = await exportCheckpoint(CKPT, { formats: ['diffusers', 'peft', 'kohya'], out, model: TINY_MODEL, merge: true });
    expect(r.mergedPipeline).toBeDefined();
    // sd-scripts' record of a LoCon run: --network_args conv_dim=1 conv_alpha=0.5.
    expect((await native().safetensorsHeader(path.join(out, LORA_FILES.kohya))).metadata.ss_network_args).toBe('{"conv_dim": "1", "conv_alpha": "0.5"}');
    for (const f of [LORA_FILES.diffusers, LORA_FILES.peft, LORA_FILES.kohya]) {
      const [a, b] = await Promise.all([native().safetensorsRead(path.join(out, f)), native().safetensorsRead(path.join(LORA, f))]);
      expect(a.tensors.map((t) => [t.name, t.shape, Buffer.from(t.data).toString('base64')])).toEqual(b.tensors.map((t) => [t.name, t.shape, Buffer.from(t.data).toString('base64')]));
    }
    // base_model_name_or_path is where the fixture was made (an absolute path): the rest must be equal.
    const config = (file: string) => ({ ...JSON.parse(fs.readFileSync(file, 'utf8')), base_model_name_or_path: undefined });
    expect(config(path.join(out, 'lora_weights', 'adapter_config.json'))).toEqual(config(path.join(LORA, 'lora_weights', 'adapter_config.json')));
    const merged = await predWith(undefined, r.mergedPipeline!);
    expect(relativeError(merged, preds.get('noise_pred_merged')!)).toBeLessThan(TOL);
    expect(relativeError(merged, preds.get('noise_pred_diffusers')!)).toBeLessThan(TOL);
  }, 120000);
});

describe('module sets and kohya names', () => {
  test('--lora-target-preset full on models/tiny trains exactly sd-scripts\' conv_dim network, sized as sd-scripts sizes it', async () => {
    const f = await native().safetensorsRead(path.join(LORA, LORA_FILES.kohya));
    const downs = new Map(f.tensors.filter((t) => t.name.endsWith('.lora_down.weight')).map((t) => [t.name.slice(0, -'.lora_down.weight'.length), t]));
    const alphas = byName(f.tensors);
    expect([...downs.keys()].sort()).toEqual(golden.sdscripts_tiny_conv.map((m) => m[0]).sort());
    for (const [name, kind] of golden.sdscripts_tiny_conv) {
      // sd-scripts: 3x3 convs take conv_dim/conv_alpha (here 1 / 0.5), Linear and 1x1 convs network_dim/alpha (2 / 4).
      const conv3 = kind === 'Conv2d3x3';
      const d = downs.get(name)!;
      expect([name, d.shape[0], toNumbers(alphas.get(`${name}.alpha`)!)[0]]).toEqual([name, conv3 ? 1 : 2, conv3 ? 0.5 : 4]);
      expect([name, d.shape.length]).toEqual([name, kind === 'Linear' ? 2 : 4]);
    }
  });

  const sd15 = layers(JSON.parse(fs.readFileSync(path.join(SD15, 'unet_param_shapes.json'), 'utf8')) as Record<string, number[]>);
  const kohyaNames = (preset: LoraTargetPreset) => [...sd15.keys()].filter((p) => matches(p, loraTargetModules({ lora_target_preset: preset, lora_target_modules: [] }))).map((p) => `lora_unet_${underscored(p)}`);

  test('on SD 1.5: kohya is sd-scripts\' default set (192 modules), full its conv_dim set (278), attn and attn-ff the subsets', () => {
    expect(kohyaNames('kohya').sort()).toEqual(golden.sdscripts_sd15_default.map((m) => m[0]).sort());
    expect(golden.sdscripts_sd15_default).toHaveLength(192);
    expect(kohyaNames('full').sort()).toEqual(golden.sdscripts_sd15_conv.map((m) => m[0]).sort());
    expect(golden.sdscripts_sd15_conv).toHaveLength(278);
    expect(kohyaNames('attn')).toHaveLength(128);
    expect(kohyaNames('attn-ff')).toHaveLength(160);
    // proj_in/proj_out are 1x1 convs in SD 1.5 (use_linear_projection false): trained at --rank, as sd-scripts does.
    expect(sd15.get('down_blocks.0.attentions.0.proj_in')).toBe('Conv2d1x1');
  });

  // A1111's convert_diffusers_name_to_compvis (extensions-builtin/Lora/networks.py), re-stated: the kohya name of a
  // diffusers module -> the compvis (LDM) module it patches; every one must name a real SD 1.5 LDM weight.
  const resnet: Record<string, string> = { conv1: 'in_layers_2', conv2: 'out_layers_3', time_emb_proj: 'emb_layers_1', conv_shortcut: 'skip_connection' };
  function a1111(key: string): string | undefined {
    let m: RegExpMatchArray | null;
    const sfx = (kind: string, s: string) => (kind === 'resnets' ? (resnet[s] ?? s) : s);
    if ((m = key.match(/^lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)$/)))
      return `diffusion_model_input_blocks_${1 + +m[1] * 3 + +m[3]}_${m[2] === 'attentions' ? 1 : 0}_${sfx(m[2], m[4])}`;
    if ((m = key.match(/^lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)$/)))
      return `diffusion_model_middle_block_${m[1] === 'attentions' ? 1 : +m[2] * 2}_${sfx(m[1], m[3])}`;
    if ((m = key.match(/^lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)$/)))
      return `diffusion_model_output_blocks_${+m[1] * 3 + +m[3]}_${m[2] === 'attentions' ? 1 : 0}_${sfx(m[2], m[4])}`;
    if ((m = key.match(/^lora_unet_down_blocks_(\d+)_downsamplers_0_conv$/))) return `diffusion_model_input_blocks_${3 + +m[1] * 3}_0_op`;
    if ((m = key.match(/^lora_unet_up_blocks_(\d+)_upsamplers_0_conv$/))) return `diffusion_model_output_blocks_${2 + +m[1] * 3}_${+m[1] > 0 ? 2 : 1}_conv`;
    return undefined;
  }

  test('every kohya key of the full set maps under A1111\'s and ComfyUI\'s SD 1.5 naming (100%)', () => {
    const ldm = new Set(
      Object.keys(JSON.parse(fs.readFileSync(path.join(SD15, 'ldm_param_shapes.json'), 'utf8')) as Record<string, unknown>)
        .filter((k) => k.startsWith('model.diffusion_model.') && k.endsWith('.weight'))
        .map((k) => underscored(k.slice('model.'.length, -'.weight'.length))),
    );
    // ComfyUI's model_lora_keys_unet: lora_unet_ + the diffusers weight key without .weight, dots to underscores.
    const comfy = new Set([...sd15.keys()].map((p) => `lora_unet_${underscored(p)}`));
    const names = kohyaNames('full');
    expect(names).toHaveLength(278);
    expect(names.filter((n) => !comfy.has(n))).toEqual([]);
    expect(names.filter((n) => !ldm.has(a1111(n) ?? ''))).toEqual([]);
    // The rule is strict enough to fail: a name A1111 cannot place.
    expect(ldm.has(a1111('lora_unet_down_blocks_0_attentions_0_proj_inx') ?? '')).toBe(false);
  });
});

describe('training with every module kind', () => {
  const data = path.join(tmp, 'data');
  beforeAll(() => makeDemoData(data, { count: 4, size: 32, seed: 3 }));
  const full = { lora_target_preset: 'full', conv_rank: 2, conv_alpha: 1, max_train_steps: 4, checkpointing_steps: 2 };

  test('interrupted and resumed with conv LoRA: bit-identical weights and losses', async () => {
    const straight = path.join(tmp, 'straight');
    const a = new Quiet();
    await train(tinyRunConfig(straight, data, full), a, { installSignalHandlers: false });
    const resumed = path.join(tmp, 'resumed');
    const b = new Quiet();
    const r1 = await train(tinyRunConfig(resumed, data, full), b, { installSignalHandlers: false, stopAtStep: 2 });
    expect(r1.globalStep).toBe(2);
    const r2 = await train(tinyRunConfig(resumed, data, { ...full, resume_from_checkpoint: 'latest' }), b, { installSignalHandlers: false });
    expect(r2.finished).toBe(true);
    expect(b.steps.map((m) => m.loss)).toEqual(a.steps.map((m) => m.loss));
    const [x, y] = [straight, resumed].map((d) => fs.readFileSync(path.join(d, LORA_FILES.diffusers)));
    expect(x.equals(y)).toBe(true);
    // A changed --conv-rank or preset is refused on resume, naming the flag.
    await expect(train(tinyRunConfig(resumed, data, { ...full, conv_rank: 4, max_train_steps: 6, resume_from_checkpoint: 'latest' }), new Quiet(), { installSignalHandlers: false })).rejects.toThrow(/--conv-rank was 2, now 4/);
  }, 300000);

  test('gradient checkpointing and bf16 autocast train conv adapters (same trajectory within bf16 rounding)', async () => {
    const run = async (name: string, over: Record<string, unknown>) => {
      const out = path.join(tmp, name);
      await train(tinyRunConfig(out, data, { ...full, max_train_steps: 2, checkpointing_steps: 2, ...over }), new Quiet(), { installSignalHandlers: false });
      return (await native().safetensorsRead(path.join(out, 'checkpoints', 'checkpoint-2', 'model.safetensors'))).tensors;
    };
    const a = await run('fp32', {});
    const b = await run('bf16-ckpt', { mixed_precision: 'bf16', gradient_checkpointing: true });
    expect(b.map((t) => t.name)).toEqual(a.map((t) => t.name));
    expect(a.some((t) => t.name.endsWith('resnets.0.conv1.lora_A.weight') && t.shape.length === 4)).toBe(true);
    const flat = (ts: HostTensor[]) => Float64Array.from(ts.flatMap((t) => Array.from(toNumbers(t))));
    const err = relativeErrorOf(flat(b), flat(a));
    expect(err).toBeGreaterThan(0);
    expect(err).toBeLessThan(1e-2);
  }, 300000);

  test('--init-lora-weights from a kohya LoCon file starts from its weights (at this run\'s alphas)', async () => {
    const out = path.join(tmp, 'init');
    const cfg = tinyRunConfig(out, data, { lora_target_preset: 'full', rank: 2, lora_alpha: 4, conv_rank: 1, conv_alpha: 0.5, max_train_steps: 1, learning_rate: 1e-12, init_lora_weights: path.join(LORA, LORA_FILES.kohya) });
    const rep = new Quiet();
    await train(cfg, rep, { installSignalHandlers: false });
    expect(rep.messages.join('\n')).toMatch(/initialized 117 LoRA modules/);
    expect(relativeError(await predWith(path.join(out, LORA_FILES.diffusers)), preds.get('noise_pred_diffusers')!)).toBeLessThan(1e-3);
  }, 300000);
});

describe('bad input is refused by name', () => {
  test('config: full needs --conv-rank; --conv-rank needs a preset with convs; --conv-alpha needs --conv-rank', () => {
    const base = { pretrained_model_name_or_path: 'm', train_data_dir: 'd' };
    expect(() => parseTrainConfig({ ...base, lora_target_preset: 'full' })).toThrow(/--lora-target-preset: full adapts the 3x3 convolutions.*--conv-rank/);
    expect(() => parseTrainConfig({ ...base, lora_target_preset: 'kohya', conv_rank: 4 })).toThrow(/--conv-rank: --lora-target-preset kohya has no 3x3 convolution/);
    expect(() => parseTrainConfig({ ...base, conv_alpha: 4 })).toThrow(/--conv-alpha: needs --conv-rank/);
    expect(() => parseTrainConfig({ ...base, train_mode: 'full', lora_target_preset: 'kohya' })).toThrow(/--lora-target-preset: --train-mode full .* has no LoRA targets/);
    expect(() => parseTrainConfig({ ...base, lora_target_preset: 'everything' })).toThrow(/--lora-target-preset: "everything" is not one of attn, attn-ff, kohya, full/);
    // The preset and --lora-target-modules combine (union, preset first).
    expect(loraTargetModules(parseTrainConfig({ ...base, lora_target_preset: 'attn-ff', lora_target_modules: ['time_emb_proj', 'to_q'] }))).toEqual([
      'to_k', 'to_q', 'to_v', 'to_out.0', 'ff.net.0.proj', 'ff.net.2', 'time_emb_proj',
    ]);
  });

  test('SD 2.x-style UNet (use_linear_projection): proj_in/proj_out are Linear and get Linear adapters at --rank', async () => {
    const alt = path.join(__dirname, 'fixtures', 'models', 'alt');
    const p = await native().loadPipeline(alt, { components: ['unet'] });
    try {
      const { trainer: t } = await native().createTrainer(p, { alphasCumprod: [0.9, 0.8], rank: 2, targets: ['proj_in', 'proj_out'] });
      const s = await native().loraSummary({ trainer: t });
      expect(s.unet!.modules.length).toBeGreaterThan(0);
      expect(s.unet!.modules.every((m) => /proj_(in|out)$/.test(m))).toBe(true);
      expect([s.unet!.rank, s.unet!.rankPattern]).toEqual([2, {}]);
      const f = path.join(tmp, 'alt-kohya.safetensors');
      await native().loraExport({ trainer: t }, f, 'kohya');
      const downs = (await native().safetensorsHeader(f)).tensors.filter((x) => x.name.endsWith('.lora_down.weight'));
      expect(downs.every((x) => x.shape.length === 2)).toBe(true);
      native().dispose(t);
    } finally {
      native().dispose(p);
    }
  });

  test('--init-lora-weights with a LoCon file into a run without those targets names the flags', async () => {
    const p = await native().loadPipeline(TINY_MODEL, { components: ['unet'] });
    try {
      const { trainer } = await native().createTrainer(p, { alphasCumprod: [0.9, 0.8], rank: 2 });
      await expect(native().trainerLoadLora(trainer, path.join(LORA, LORA_FILES.kohya))).rejects.toThrow(
        /has an adapter for unet "[a-z_.0-9]+", which is not a LoRA target of this run \(see --lora-target-preset and --lora-target-modules\)/,
      );
      native().dispose(trainer);
    } finally {
      native().dispose(p);
    }
  });

  test('targets: unmatched names, non-layer modules, 3x3 convs without --conv-rank and --conv-rank without 3x3 convs', async () => {
    const p = await native().loadPipeline(TINY_MODEL, { components: ['unet'] });
    const make = (o: Record<string, unknown>) => native().createTrainer(p, { alphasCumprod: [0.9, 0.8], ...o });
    try {
      await expect(make({ targets: ['to_q', 'to_qq', 'norm1'] })).rejects.toThrow(/"to_qq" matches no module of this model; "norm1" matches only .*LoRA adapts Linear and Conv2d layers only/);
      await expect(make({ targets: ['conv1'] })).rejects.toThrow(/3x3 kernel \(e\.g\. down_blocks\.0\.resnets\.0\.conv1\): give their rank with --conv-rank/);
      await expect(make({ targets: ['to_q'], convRank: 2 })).rejects.toThrow(/--conv-rank is given but no LoRA target is a 3x3 convolution/);
    } finally {
      native().dispose(p);
    }
  });

  async function fileWith(name: string, tensors: Record<string, number[]>): Promise<string> {
    const f = path.join(tmp, name);
    await native().safetensorsWrite(
      f,
      Object.entries(tensors).map(([n, shape]) => ({ name: n, dtype: 'F32' as const, shape, data: Buffer.alloc(4 * shape.reduce((a, b) => a * b, 1)) })),
    );
    return f;
  }

  test.each([
    ['LoHa', { 'lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a': [32, 4], 'lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_b': [4, 32] }, /LyCORIS LoHa file .*Supported: plain LoRA/],
    ['LoKr', { 'lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1': [4, 4] }, /LyCORIS LoKr file/],
    ['SDXL', { 'lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight': [4, 32], 'lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight': [32, 4] }, /a LoRA for SDXL/],
    ['SD 2.x / another base (shape)', { 'lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight': [4, 64, 1, 1], 'lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight': [32, 4, 1, 1] }, /proj_in" has down \[4, 64, 1, 1\].*Conv2d layer .*takes \[4, 32, 1, 1\].*another base model/],
  ])('a %s file names the file and what is supported', async (name, tensors, re) => {
    const f = await fileWith(`${name.replace(/\W/g, '_')}.safetensors`, tensors);
    await expect(predWith(f)).rejects.toThrow(re);
    await expect(predWith(f)).rejects.toThrow(f);
  });
});
