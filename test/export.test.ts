/**
 * LoRA export (src/export/lora-export.ts): the files train-lora writes load in diffusers and peft to the same UNet
 * outputs (goldens from scripts/golden/make_export_goldens.py on the committed exports in test/fixtures/export,
 * which scripts/make-export-fixtures.js wrote), the current exporter still writes those same files, kohya keys map
 * back one-to-one, --merge writes a pipeline that computes base + LoRA, and the CLI's `checkpoints export`.
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { CheckpointManager } from '../src/checkpoint/manager';
import { parseTrainConfig } from '../src/config';
import { makeDemoData } from '../src/data/demo-data';
import { kohyaHashes, pyFloat } from '../src/export/kohya';
import { exportCheckpoint, exportLora, LORA_FILES, targetNames } from '../src/export/lora-export';
import { native, type HostTensor, type LoraFileFormat, type PipelineHandle } from '../src/native';
import { byName, fromFloat32, relativeError } from '../src/tensors';
import { quietTrain } from './helpers/quiet-reporter';
import { tinyRunConfig } from './helpers/tiny-run';

const cli = path.resolve(__dirname, '..', 'dist', 'cli.js');
const fixtures = path.join(__dirname, 'fixtures');
const FIX = path.join(fixtures, 'export');
const tiny = path.join(fixtures, 'models', 'tiny');
const ckpt = path.join(FIX, 'checkpoint-3');
const TOL = 1e-4;
const FORMATS: LoraFileFormat[] = ['diffusers', 'peft', 'kohya'];
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-export-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

interface Golden {
  diffusers_config: { r: number; lora_alpha: number; target_modules: string[] };
  peft_config: { r: number; lora_alpha: number; target_modules: string[] };
  kohya_config: { r: number; lora_alpha: number; target_modules: string[] };
  kohya_key_map: Record<string, string>;
  kohya_network_alphas: Record<string, number>;
  kohya_hashes: { sshs_model_hash: string; sshs_legacy_hash: string };
  synthetic_kohya: { metadata: Record<string, string>; modules: number; rows: number; cols: number; model_hash: string; legacy_hash: string };
  final_pipeline_components: string[];
}
const golden = JSON.parse(fs.readFileSync(path.join(FIX, 'golden.json'), 'utf8')) as Golden;

function run(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [cli, ...args], { encoding: 'utf8', timeout: 120000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

async function read(file: string): Promise<{ t: Map<string, HostTensor>; meta: Record<string, string> }> {
  const r = await native().safetensorsRead(file);
  return { t: byName(r.tensors), meta: r.metadata };
}

function sameTensors(a: Map<string, HostTensor>, b: Map<string, HostTensor>): void {
  expect([...a.keys()].sort()).toEqual([...b.keys()].sort());
  for (const [k, t] of a) {
    const u = b.get(k)!;
    expect([k, t.dtype, t.shape]).toEqual([k, u.dtype, u.shape]);
    expect([k, Buffer.from(t.data).equals(Buffer.from(u.data))]).toEqual([k, true]);
  }
}

let unetInputs: HostTensor[];
let goldenOut: Map<string, HostTensor>;
let base: PipelineHandle;
let exported: string;

beforeAll(async () => {
  unetInputs = (await native().safetensorsRead(path.join(fixtures, 'golden', 'tiny', 'inputs.safetensors'))).tensors.filter((t) =>
    ['latents', 'timesteps', 'encoder_hidden_states'].includes(t.name),
  );
  goldenOut = byName((await native().safetensorsRead(path.join(FIX, 'golden.safetensors'))).tensors);
  base = await native().loadPipeline(tiny, { components: ['unet'] });
  exported = path.join(tmp, 'from-checkpoint');
  await exportCheckpoint(ckpt, { formats: FORMATS, out: exported, model: tiny, merge: true });
});

async function predWith(lora: string): Promise<HostTensor> {
  return (await native().forward(base, unetInputs, { lora }))[0];
}

describe('(a) the current exporter writes the committed fixtures', () => {
  test.each(FORMATS)('%s from the checkpoint: the same tensors (and kohya hash)', async (format) => {
    const got = await read(path.join(exported, LORA_FILES[format]));
    const want = await read(path.join(FIX, 'lora', LORA_FILES[format]));
    sameTensors(got.t, want.t);
    if (format === 'diffusers') expect(got.meta.lora_adapter_metadata).toBe(want.meta.lora_adapter_metadata);
    if (format === 'kohya') expect(got.meta.sshs_model_hash).toBe(want.meta.sshs_model_hash);
    if (format === 'peft')
      expect(fs.readFileSync(path.join(exported, 'lora_weights', 'adapter_config.json'), 'utf8').replace(/"base_model_name_or_path": "[^"]*"/, ''))
        .toBe(fs.readFileSync(path.join(FIX, 'lora', 'lora_weights', 'adapter_config.json'), 'utf8').replace(/"base_model_name_or_path": "[^"]*"/, ''));
  });

  test('from a live trainer holding the checkpoint: the same tensors in every format', async () => {
    const pipe = await native().loadPipeline(tiny, { components: ['unet'] });
    const { trainer } = await native().createTrainer(pipe, { rank: 4, alpha: 8, alphasCumprod: [0.5], init: 'zeros' });
    await native().trainerLoadState(trainer, ckpt, {});
    const st = JSON.parse(fs.readFileSync(path.join(ckpt, 'trainer_state.json'), 'utf8'));
    const out = path.join(tmp, 'from-trainer');
    const lines: string[] = [];
    const r = await exportLora(
      {
        source: { trainer },
        outDir: out,
        formats: FORMATS,
        baseModel: tiny,
        config: parseTrainConfig(st.config),
        steps: st.global_step,
        epoch: st.epoch,
        numTrainImages: st.dataset.size,
        mixedPrecision: 'no',
        trainingStartedAt: Date.now(),
      },
      (m) => lines.push(m),
    );
    expect(lines).toHaveLength(1);
    expect(lines[0]).toMatch(/^exported LoRA \(rank 4, alpha 8, unet, step 3\): .*pytorch_lora_weights\.safetensors, .*adapter_model\.safetensors, .*adapter_config\.json, .*lora_kohya\.safetensors$/);
    expect(r.files).toHaveLength(4);
    for (const f of FORMATS) sameTensors((await read(path.join(out, LORA_FILES[f]))).t, (await read(path.join(FIX, 'lora', LORA_FILES[f]))).t);
    native().dispose(pipe);
  });
});

describe('(b) our UNet with our LoRA equals diffusers / peft loading the same file', () => {
  test('the goldens differ from the base model (so the comparisons can fail)', () => {
    for (const k of ['noise_pred_diffusers', 'noise_pred_peft', 'noise_pred_kohya', 'noise_pred_merged'])
      expect([k, relativeError(goldenOut.get(k)!, goldenOut.get('noise_pred_base')!) > 1e-2]).toEqual([k, true]);
  });

  test.each([
    ['diffusers', 'noise_pred_diffusers'],
    ['peft', 'noise_pred_peft'],
    ['kohya', 'noise_pred_kohya'],
  ] as const)('%s file: noise_pred within 1e-4 of the Python loader', async (format, key) => {
    const fixture = await predWith(path.join(FIX, 'lora', LORA_FILES[format]));
    expect(relativeError(fixture, goldenOut.get(key)!)).toBeLessThan(TOL);
    const fresh = await predWith(path.join(exported, LORA_FILES[format]));
    expect(relativeError(fresh, goldenOut.get(key)!)).toBeLessThan(TOL);
  });

  test('without LoRA our UNet equals the base golden', async () => {
    const fresh = await native().loadPipeline(tiny, { components: ['unet'] }); // `base` keeps the adapters forward() applied
    const p = (await native().forward(fresh, unetInputs))[0];
    native().dispose(fresh);
    expect(relativeError(p, goldenOut.get('noise_pred_base')!)).toBeLessThan(TOL);
  });
});

describe('(c) kohya keys convert back to the PEFT keys one-to-one', () => {
  test('every module, both matrices and alpha', async () => {
    const peft = (await read(path.join(ckpt, 'model.safetensors'))).t; // unet.<module>.lora_{A,B}.weight
    const kohya = (await read(path.join(FIX, 'lora', LORA_FILES.kohya))).t;
    const modules = [...peft.keys()].map((k) => /^unet\.(.+)\.lora_A\.weight$/.exec(k)?.[1]).filter((m): m is string => m !== undefined);
    const byKohya = new Map(modules.map((m) => [`lora_unet_${m.replace(/\./g, '_')}`, m]));
    expect(byKohya.size).toBe(modules.length); // the underscored names are unique
    const seen = new Set<string>();
    for (const [k, t] of kohya) {
      const m = /^(lora_unet_.+)\.(lora_down\.weight|lora_up\.weight|alpha)$/.exec(k);
      expect([k, m !== null]).toEqual([k, true]);
      const mod = byKohya.get(m![1]);
      expect([k, mod !== undefined]).toEqual([k, true]);
      if (m![2] === 'alpha') {
        expect([k, t.dtype, t.shape, Buffer.from(t.data).readFloatLE(0)]).toEqual([k, 'F32', [], 8]);
        continue;
      }
      const peftKey = `unet.${mod}.lora_${m![2] === 'lora_down.weight' ? 'A' : 'B'}.weight`;
      expect(seen.has(peftKey)).toBe(false);
      seen.add(peftKey);
      expect([k, Buffer.from(t.data).equals(Buffer.from(peft.get(peftKey)!.data))]).toEqual([k, true]);
      // diffusers, loading the kohya file, put this tensor into the same module's PEFT adapter.
      expect(golden.kohya_key_map[k]).toBe(peftKey.slice('unet.'.length));
    }
    expect(seen.size).toBe(peft.size);
    expect(Object.keys(golden.kohya_key_map)).toHaveLength(peft.size);
    expect(Object.values(golden.kohya_network_alphas).every((a) => a === 8)).toBe(true);
    expect(Object.keys(golden.kohya_network_alphas)).toHaveLength(modules.length);
  });
});

describe('(d) --merge writes a complete pipeline with the LoRA folded into the UNet', () => {
  test('final_pipeline: base + LoRA without a LoRA, equal to diffusers loading it', async () => {
    const final = path.join(exported, 'final_pipeline');
    for (const d of ['model_index.json', 'scheduler/scheduler_config.json', 'tokenizer/vocab.json', 'vae/diffusion_pytorch_model.safetensors', 'text_encoder/model.safetensors', 'unet/config.json', 'unet/diffusion_pytorch_model.safetensors'])
      expect([d, fs.existsSync(path.join(final, d))]).toEqual([d, true]);
    // Unchanged components are hard links to the base files; the UNet is a new file, its config a copy.
    expect(fs.statSync(path.join(final, 'vae', 'diffusion_pytorch_model.safetensors')).ino).toBe(fs.statSync(path.join(tiny, 'vae', 'diffusion_pytorch_model.safetensors')).ino);
    expect(fs.statSync(path.join(final, 'text_encoder', 'model.safetensors')).ino).toBe(fs.statSync(path.join(tiny, 'text_encoder', 'model.safetensors')).ino);
    expect(fs.readFileSync(path.join(final, 'unet', 'config.json'), 'utf8')).toBe(fs.readFileSync(path.join(tiny, 'unet', 'config.json'), 'utf8'));
    expect(fs.statSync(path.join(final, 'unet', 'diffusion_pytorch_model.safetensors')).ino).not.toBe(fs.statSync(path.join(tiny, 'unet', 'diffusion_pytorch_model.safetensors')).ino);
    expect(golden.final_pipeline_components).toEqual(['scheduler', 'text_encoder', 'tokenizer', 'unet', 'vae']);

    // Same tensor names, dtypes and shapes as the base UNet file; only the adapted weights changed.
    const baseW = (await read(path.join(tiny, 'unet', 'diffusion_pytorch_model.safetensors'))).t;
    const merged = (await read(path.join(final, 'unet', 'diffusion_pytorch_model.safetensors'))).t;
    const adapted = new Set((await native().loraSummary({ checkpoint: path.join(ckpt, 'model.safetensors'), alpha: 8 })).unet!.modules.map((m) => `${m}.weight`));
    expect(adapted.size).toBe(48);
    expect([...merged.keys()].sort()).toEqual([...baseW.keys()].sort());
    for (const [k, t] of merged) expect([k, t.dtype, t.shape, Buffer.from(t.data).equals(Buffer.from(baseW.get(k)!.data))]).toEqual([k, baseW.get(k)!.dtype, baseW.get(k)!.shape, !adapted.has(k)]);

    const p = await native().loadPipeline(final, { components: ['unet'] });
    const mergedPred = (await native().forward(p, unetInputs))[0];
    native().dispose(p);
    const withLora = await predWith(path.join(exported, LORA_FILES.diffusers));
    expect(relativeError(mergedPred, withLora)).toBeLessThan(TOL);
    expect(relativeError(mergedPred, goldenOut.get('noise_pred_merged')!)).toBeLessThan(TOL);
  });
});

describe('(e) metadata', () => {
  test('diffusers: lora_adapter_metadata as diffusers writes it; diffusers and peft read rank 4, alpha 8', async () => {
    const { meta } = await read(path.join(FIX, 'lora', LORA_FILES.diffusers));
    const m = JSON.parse(meta.lora_adapter_metadata);
    expect(meta.format).toBe('pt');
    expect([m['unet.r'], m['unet.lora_alpha'], m['unet.target_modules'], m['unet.peft_type']]).toEqual([4, 8, ['to_k', 'to_out.0', 'to_q', 'to_v'], 'LORA']);
    expect(meta.lora_adapter_metadata).toBe(JSON.stringify(m, Object.keys(m).sort(), 2)); // indent 2, sorted keys
    for (const c of [golden.diffusers_config, golden.peft_config, golden.kohya_config]) expect(c).toEqual({ r: 4, lora_alpha: 8, target_modules: ['to_k', 'to_out.0', 'to_q', 'to_v'] });
    expect([meta['train_lora.rank'], meta['train_lora.alpha'], meta['train_lora.steps']]).toEqual(['4', '8', '3']);
    const cfg = JSON.parse(fs.readFileSync(path.join(FIX, 'lora', 'lora_weights', 'adapter_config.json'), 'utf8'));
    expect([cfg.r, cfg.lora_alpha, cfg.peft_type, cfg.target_modules]).toEqual([4, 8, 'LORA', ['to_k', 'to_out.0', 'to_q', 'to_v']]);
    const peftKeys = [...(await read(path.join(FIX, 'lora', LORA_FILES.peft))).t.keys()];
    expect(peftKeys.every((k) => /^base_model\.model\..+\.lora_[AB]\.weight$/.test(k))).toBe(true);
  });

  test('kohya: sd-scripts ss_* keys and sshs_* hashes equal to sd-scripts\' own computation', async () => {
    const file = path.join(FIX, 'lora', LORA_FILES.kohya);
    const { meta } = await read(file);
    expect(meta).toMatchObject({
      ss_network_module: 'networks.lora',
      ss_network_dim: '4',
      ss_network_alpha: '8.0',
      ss_steps: '3',
      ss_resolution: '(32, 32)',
      ss_num_train_images: '4',
      ss_base_model_version: 'sd_v1',
      ss_learning_rate: '0.01',
      ss_lr_scheduler: 'constant',
      ss_max_train_steps: '3',
      ss_seed: '7',
      ss_mixed_precision: 'no',
      ss_output_name: 'lora_kohya',
      ss_sd_model_name: 'tiny',
      ss_v2: 'False',
    });
    for (const k of ['ss_epoch', 'ss_training_started_at', 'ss_training_finished_at']) expect([k, meta[k]]).toEqual([k, expect.stringMatching(/^\d+(\.\d+)?$/)]);
    expect({ sshs_model_hash: meta.sshs_model_hash, sshs_legacy_hash: meta.sshs_legacy_hash }).toEqual(golden.kohya_hashes);
    // The model hash is the sha256 of the file's data section as written.
    const h = await native().safetensorsHeader(file);
    expect(createHash('sha256').update(fs.readFileSync(file).subarray(h.dataStart)).digest('hex')).toBe(meta.sshs_model_hash);
    // Freshly exported: the same hashes (the legacy hash depends on the ss_* header length only through its size).
    expect(kohyaHashes(path.join(exported, LORA_FILES.kohya)).modelHash).toBe(golden.kohya_hashes.sshs_model_hash);
  });

  test('kohya hashes of a > 1 MiB file (the legacy hash reads real bytes) equal sd-scripts\'', async () => {
    const s = golden.synthetic_kohya;
    const tensors: HostTensor[] = [];
    for (let i = 0; i < s.modules; i++) {
      const v = new Float32Array(s.rows * s.cols);
      for (let j = 0; j < v.length; j++) v[j] = ((j + 1000 * i) % 251) / 8;
      tensors.push(fromFloat32(`lora_unet_m${i}.lora_down.weight`, [s.rows, s.cols], v));
      tensors.push(fromFloat32(`lora_unet_m${i}.alpha`, [], [i + 1]));
    }
    tensors.sort((a, b) => (a.name < b.name ? -1 : 1));
    const f = path.join(tmp, 'synthetic.safetensors');
    await native().safetensorsWrite(f, tensors, { ...s.metadata, other: 'not hashed' });
    expect(kohyaHashes(f)).toEqual({ modelHash: s.model_hash, legacyHash: s.legacy_hash });
    expect(s.legacy_hash).not.toBe('e3b0c442'); // not the hash of nothing
  });

  test('pyFloat spells floats as Python str() does', () => {
    expect([8, 0.0001, 1e-5, 1e-4, 0.5, 1.5e20, 3000, 1e16, 123.25].map(pyFloat)).toEqual(['8.0', '0.0001', '1e-05', '0.0001', '0.5', '1.5e+20', '3000.0', '1e+16', '123.25']);
  });

  test('targetNames: leaf names, two parts for to_out.0', () => {
    expect(targetNames(['a.attn1.to_q', 'b.attn2.to_out.0', 'c.to_q', 'text_model.encoder.layers.0.self_attn.q_proj'])).toEqual(['q_proj', 'to_out.0', 'to_q']);
  });
});

describe('checkpoints export (CLI)', () => {
  test('several formats and --merge into --out; the log line lists the files', () => {
    const out = path.join(tmp, 'cli-out');
    const r = run('checkpoints', 'export', ckpt, '--format', 'kohya', 'peft', '--merge', '--out', out, '--model', tiny);
    expect(r.stderr).toBe('');
    expect(r.status).toBe(0);
    expect(r.stdout).toMatch(/exported LoRA \(rank 4, alpha 8, unet, step 3\): .*lora_kohya\.safetensors, .*lora_weights\/adapter_model\.safetensors, .*adapter_config\.json, .*final_pipeline\/unet\/diffusion_pytorch_model\.safetensors; merged pipeline .*final_pipeline \(unet: 48 weights \(F32\)\)/);
    for (const f of ['lora_kohya.safetensors', 'lora_weights/adapter_model.safetensors', 'lora_weights/adapter_config.json', 'final_pipeline/model_index.json'])
      expect([f, fs.existsSync(path.join(out, f))]).toEqual([f, true]);
    expect(fs.existsSync(path.join(out, 'pytorch_lora_weights.safetensors'))).toBe(false);
  });

  test('--out FILE.safetensors writes one format to that file', async () => {
    const f = path.join(tmp, 'one', 'my_lora.safetensors');
    const r = run('checkpoints', 'export', ckpt, '--format', 'diffusers', '--out', f);
    expect(r.status).toBe(0);
    sameTensors((await read(f)).t, (await read(path.join(FIX, 'lora', LORA_FILES.diffusers))).t);
    const two = run('checkpoints', 'export', ckpt, '--format', 'diffusers', 'kohya', '--out', f);
    expect(two.status).toBe(1);
    expect(two.stderr).toMatch(/a single output file takes exactly one --format and no --merge/);
  });

  test('clear errors: unknown format, no model.safetensors, a full-training checkpoint, a moved base model', async () => {
    const bad = run('checkpoints', 'export', ckpt, '--format', 'onnx', '--out', path.join(tmp, 'x'));
    expect(bad.status).toBe(2);
    expect(bad.stderr).toMatch(/Invalid values:[\s\S]*format[\s\S]*onnx[\s\S]*diffusers/);
    await expect(exportLora({ formats: ['onnx' as LoraFileFormat] } as never)).rejects.toThrow('unknown LoRA format "onnx" (use diffusers, peft, kohya)');

    const empty = path.join(tmp, 'checkpoint-9');
    fs.mkdirSync(empty);
    fs.copyFileSync(path.join(ckpt, 'trainer_state.json'), path.join(empty, 'trainer_state.json'));
    const noModel = run('checkpoints', 'export', empty);
    expect(noModel.status).toBe(1);
    expect(noModel.stderr).toMatch(/checkpoint-9: has no model\.safetensors, so there are no weights to export/);

    // A valid checkpoint of a full-UNet run.
    const mgr = new CheckpointManager(path.join(tmp, 'full-run'));
    const full = await mgr.save(5, async (d) => {
      for (const f of fs.readdirSync(ckpt)) if (f !== 'manifest.json' && f !== 'trainer_state.json') fs.copyFileSync(path.join(ckpt, f), path.join(d, f));
      const st = JSON.parse(fs.readFileSync(path.join(ckpt, 'trainer_state.json'), 'utf8'));
      st.config.train_mode = 'full';
      st.global_step = 5; // verify checks that trainer_state.json and the manifest name the same step
      fs.writeFileSync(path.join(d, 'trainer_state.json'), JSON.stringify(st));
    });
    const f = run('checkpoints', 'export', full.path);
    expect(f.status).toBe(1);
    expect(f.stderr).toMatch(/is a --train-mode full checkpoint: its model\.safetensors holds the whole UNet, not a LoRA/);

    const moved = run('checkpoints', 'export', ckpt, '--merge', '--out', path.join(tmp, 'y'), '--model', path.join(tmp, 'nowhere'));
    expect(moved.status).toBe(1);
    expect(moved.stderr).toMatch(/--merge: the base model .*nowhere .*does not exist; pass its folder with --model/);
  });

  test('default --out: <run>/exports/<checkpoint>/', async () => {
    const run0 = path.join(tmp, 'run0');
    fs.cpSync(ckpt, path.join(run0, 'checkpoints', 'checkpoint-3'), { recursive: true });
    const r = run('checkpoints', 'export', path.join(run0, 'checkpoints', 'checkpoint-3'));
    expect(r.status).toBe(0);
    expect(fs.existsSync(path.join(run0, 'exports', 'checkpoint-3', 'pytorch_lora_weights.safetensors'))).toBe(true);
  });
});

describe('end of training', () => {
  test('train() with --merge and --save-format kohya: one export call writes the LoRA and final_pipeline, logged once', async () => {
    const data = path.join(tmp, 'train-data');
    await makeDemoData(data, { count: 2, size: 32, seed: 0 });
    const out = path.join(tmp, 'train-run');
    const { result: r, rep } = await quietTrain(tinyRunConfig(out, data, { train_batch_size: 2, max_train_steps: 1, save_format: ['kohya'], merge: true }));
    expect(r.loraFiles).toEqual([path.join(out, 'lora_kohya.safetensors'), path.join(out, 'final_pipeline', 'unet', 'diffusion_pytorch_model.safetensors')]);
    const { meta } = await read(path.join(out, 'lora_kohya.safetensors'));
    expect([meta.ss_steps, meta.ss_network_dim, meta.ss_network_alpha, meta.ss_num_train_images]).toEqual(['1', '4', '4.0', '2']);
    expect(kohyaHashes(path.join(out, 'lora_kohya.safetensors'))).toEqual({ modelHash: meta.sshs_model_hash, legacyHash: meta.sshs_legacy_hash });
    expect(fs.existsSync(path.join(out, 'final_pipeline', 'vae', 'diffusion_pytorch_model.safetensors'))).toBe(true);
    expect(fs.existsSync(path.join(out, 'pytorch_lora_weights.safetensors'))).toBe(false);
    expect(rep.messages.filter((m) => m.startsWith('exported LoRA'))).toEqual([expect.stringMatching(/lora_kohya\.safetensors, .*; merged pipeline .*final_pipeline \(unet: 48 weights \(F32\)\)$/)]);
  });
});
