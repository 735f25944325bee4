/**
 * Issue 16, items 6 and 7.
 *
 * (6) The kohya file's metadata as sd-scripts' train_network.py writes it for an SD 1.x LoRA: every ss_* key, the
 *     modelspec.* keys of library/sai_model_spec.py, values from the run (ss_output_name = the file's stem, 1-based
 *     ss_epoch, ss_tag_frequency from the captions, ss_sd_model_hash / ss_new_sd_model_hash recomputed here by
 *     train_util.model_hash / calculate_sha256's rule on the base UNet file).
 * (7) --merge on a --variant fp16 base: the merged UNet is unet/diffusion_pytorch_model.fp16.safetensors in F16, the
 *     other components keep their variant names (hard links), and diffusers' from_pretrained(final, variant="fp16")
 *     loads it and computes the merged UNet's output (Python check skipped, with a warning, when diffusers is not
 *     importable: set PYTHON and DIFFUSERS_SRC).
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { parseTrainConfig } from '../src/config';
import { makeDemoData } from '../src/data/demo-data';
import { baseModelHashes, kohyaHashes, pyJson, tagFrequency } from '../src/export/kohya';
import { baseModelHashFile, exportCheckpoint, exportLora, LORA_FILES, mergedFileName } from '../src/export/lora-export';
import { native, type HostTensor } from '../src/native';
import { byName, relativeError } from '../src/tensors';
import { quietTrain } from './helpers/quiet-reporter';
import { tinyRunConfig } from './helpers/tiny-run';

const fixtures = path.join(__dirname, 'fixtures');
const FIX = path.join(fixtures, 'export');
const tiny = path.join(fixtures, 'models', 'tiny');
const ckpt = path.join(FIX, 'checkpoint-3');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-export-meta-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

async function meta(file: string): Promise<Record<string, string>> {
  return (await native().safetensorsRead(file)).metadata;
}

/** Every key sd-scripts' train_network.py writes for an SD 1.x LoRA trained from train_data_dir (no --vae). */
const SD_SCRIPTS_KEYS = [
  'ss_session_id', 'ss_training_started_at', 'ss_output_name', 'ss_learning_rate', 'ss_text_encoder_lr', 'ss_unet_lr',
  'ss_num_train_images', 'ss_num_validation_images', 'ss_num_reg_images', 'ss_num_batches_per_epoch', 'ss_num_epochs',
  'ss_gradient_checkpointing', 'ss_gradient_accumulation_steps', 'ss_max_train_steps', 'ss_lr_warmup_steps', 'ss_lr_scheduler',
  'ss_network_module', 'ss_network_dim', 'ss_network_alpha', 'ss_network_dropout', 'ss_mixed_precision', 'ss_full_fp16', 'ss_v2',
  'ss_base_model_version', 'ss_clip_skip', 'ss_max_token_length', 'ss_cache_latents', 'ss_seed', 'ss_lowram', 'ss_noise_offset',
  'ss_multires_noise_iterations', 'ss_multires_noise_discount', 'ss_adaptive_noise_scale', 'ss_zero_terminal_snr',
  'ss_training_comment', 'ss_sd_scripts_commit_hash', 'ss_optimizer', 'ss_max_grad_norm', 'ss_caption_dropout_rate',
  'ss_caption_dropout_every_n_epochs', 'ss_caption_tag_dropout_rate', 'ss_face_crop_aug_range', 'ss_prior_loss_weight',
  'ss_min_snr_gamma', 'ss_scale_weight_norms', 'ss_ip_noise_gamma', 'ss_debiased_estimation', 'ss_noise_offset_random_strength',
  'ss_ip_noise_gamma_random_strength', 'ss_loss_type', 'ss_huber_schedule', 'ss_huber_scale', 'ss_huber_c', 'ss_fp8_base',
  'ss_fp8_base_unet', 'ss_validation_seed', 'ss_validation_split', 'ss_max_validation_steps', 'ss_validate_every_n_epochs',
  'ss_validate_every_n_steps', 'ss_resize_interpolation',
  'ss_batch_size_per_device', 'ss_total_batch_size', 'ss_resolution', 'ss_color_aug', 'ss_flip_aug', 'ss_random_crop',
  'ss_shuffle_caption', 'ss_enable_bucket', 'ss_bucket_no_upscale', 'ss_min_bucket_reso', 'ss_max_bucket_reso', 'ss_keep_tokens',
  'ss_dataset_dirs', 'ss_reg_dataset_dirs', 'ss_tag_frequency', 'ss_bucket_info',
  'ss_sd_model_hash', 'ss_new_sd_model_hash', 'ss_sd_model_name',
  'ss_training_finished_at', 'ss_steps', 'ss_epoch',
];

const BOOL = /^(True|False)$/;
const INT = /^\d+$/;
const FLOAT = /^-?\d+\.\d+(e[+-]\d+)?$|^-?\d(\.\d+)?e[+-]\d+$/;
const NONE_OR_FLOAT = new RegExp(`^None$|${FLOAT.source}`);
/** The format of each key's value. */
const FORMAT: Record<string, RegExp> = {
  ss_session_id: INT, ss_training_started_at: FLOAT, ss_training_finished_at: FLOAT, ss_learning_rate: FLOAT, ss_unet_lr: FLOAT,
  ss_text_encoder_lr: NONE_OR_FLOAT, ss_num_train_images: INT, ss_num_validation_images: INT, ss_num_reg_images: INT,
  ss_num_batches_per_epoch: INT, ss_num_epochs: INT, ss_gradient_accumulation_steps: INT, ss_max_train_steps: INT, ss_lr_warmup_steps: INT,
  ss_network_dim: INT, ss_network_alpha: FLOAT, ss_network_dropout: NONE_OR_FLOAT, ss_seed: INT, ss_noise_offset: NONE_OR_FLOAT,
  ss_max_grad_norm: FLOAT, ss_caption_dropout_rate: FLOAT, ss_min_snr_gamma: NONE_OR_FLOAT, ss_validation_split: FLOAT,
  ss_batch_size_per_device: INT, ss_total_batch_size: INT, ss_resolution: /^\(\d+, \d+\)$/, ss_keep_tokens: INT, ss_steps: INT, ss_epoch: INT,
  ss_sd_model_hash: /^[0-9a-f]{8}$/, ss_new_sd_model_hash: /^[0-9a-f]{64}$/, ss_mixed_precision: /^(no|fp16|bf16)$/,
  ss_dataset_dirs: /^\{.*\}$/, ss_reg_dataset_dirs: /^\{\}$/, ss_tag_frequency: /^\{.*\}$/, ss_bucket_info: /^null$/,
  ss_optimizer: /^torch\.optim\.adamw\.AdamW\(.*\)$/,
  ...Object.fromEntries(
    ['ss_gradient_checkpointing', 'ss_full_fp16', 'ss_v2', 'ss_cache_latents', 'ss_lowram', 'ss_zero_terminal_snr', 'ss_debiased_estimation',
     'ss_noise_offset_random_strength', 'ss_ip_noise_gamma_random_strength', 'ss_fp8_base', 'ss_fp8_base_unet', 'ss_color_aug', 'ss_flip_aug',
     'ss_random_crop', 'ss_shuffle_caption', 'ss_enable_bucket', 'ss_bucket_no_upscale'].map((k) => [k, BOOL]),
  ),
};

const MODELSPEC_KEYS = [
  'modelspec.sai_model_spec', 'modelspec.architecture', 'modelspec.implementation', 'modelspec.title', 'modelspec.resolution',
  'modelspec.date', 'modelspec.prediction_type', 'modelspec.implementation_version', 'modelspec.hash_sha256',
];

/** sd-scripts' train_util.model_hash and calculate_sha256, as documented there. */
function sdScriptsHashes(file: string): { legacy: string; sha256: string } {
  const b = fs.readFileSync(file);
  return {
    legacy: createHash('sha256').update(b.subarray(0x100000, 0x110000)).digest('hex').slice(0, 8),
    sha256: createHash('sha256').update(b).digest('hex'),
  };
}

function checkKeys(m: Record<string, string>): void {
  for (const k of SD_SCRIPTS_KEYS) expect([k, typeof m[k]]).toEqual([k, 'string']);
  for (const [k, re] of Object.entries(FORMAT)) expect([k, m[k]]).toEqual([k, expect.stringMatching(re)]);
  for (const k of ['ss_dataset_dirs', 'ss_reg_dataset_dirs', 'ss_tag_frequency', 'ss_bucket_info', 'ss_network_args']) expect(() => JSON.parse(m[k])).not.toThrow();
  for (const k of MODELSPEC_KEYS) expect([k, typeof m[k]]).toEqual([k, 'string']);
  expect(m).toMatchObject({
    'modelspec.sai_model_spec': '1.0.1',
    'modelspec.architecture': 'stable-diffusion-v1/lora',
    'modelspec.implementation': 'diffusers',
    'modelspec.prediction_type': 'epsilon',
    'modelspec.implementation_version': expect.stringMatching(/^train-lora\/\d+\.\d+\.\d+/),
    'modelspec.date': expect.stringMatching(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d$/),
    'modelspec.hash_sha256': `0x${m.sshs_model_hash}`,
  });
}

describe('(6) kohya metadata as sd-scripts writes it', () => {
  test('tagFrequency: comma-separated, stripped, lowercased, empty tags skipped; pyJson spells json.dumps', () => {
    const f = tagFrequency(['A Cat, sitting , cat', 'cat,, dog ', '', 'Dog', '1, 2']);
    expect([...f.entries()]).toEqual([['a cat', 1], ['sitting', 1], ['cat', 2], ['dog', 2], ['1', 1], ['2', 1]]);
    expect(pyJson(new Map([['d', f]]))).toBe('{"d": {"a cat": 1, "sitting": 1, "cat": 2, "dog": 2, "1": 1, "2": 1}}');
    expect(pyJson({ a: [1, 0.5, true, null], 'é': 'ü' })).toBe('{"a": [1, 0.5, true, null], "\\u00e9": "\\u00fc"}');
  });

  test('a known export: every ss_* and modelspec.* key, output name, 1-based epoch, tag frequency, model hashes', async () => {
    const st = JSON.parse(fs.readFileSync(path.join(ckpt, 'trainer_state.json'), 'utf8'));
    const cfg = parseTrainConfig({ ...st.config, train_data_dir: path.join(tmp, 'my-photos') });
    const file = path.join(tmp, 'known', 'my_style_v2.safetensors');
    const finished = Date.UTC(2026, 0, 2, 3, 4, 5, 500);
    await exportLora({
      source: { checkpoint: path.join(ckpt, 'model.safetensors'), alpha: 8 },
      outDir: path.dirname(file),
      file,
      formats: ['kohya'],
      baseModel: tiny,
      config: cfg,
      steps: 3,
      epoch: st.epoch, // the data loader's 0-based epoch (1 here: step 3 of 2 batches per epoch)
      numTrainImages: 4,
      captions: ['A Cat, sitting , cat', 'cat,, dog ', '', 'Dog'],
      mixedPrecision: 'no',
      trainingStartedAt: finished - 60_000,
      trainingFinishedAt: finished,
    });
    const m = await meta(file);
    checkKeys(m);
    const h = sdScriptsHashes(path.join(tiny, 'unet', 'diffusion_pytorch_model.safetensors'));
    expect(h.legacy).not.toBe('e3b0c442'); // the tiny UNet file is > 1.06 MiB: real bytes
    expect(m).toMatchObject({
      ss_output_name: 'my_style_v2',
      'modelspec.title': 'my_style_v2',
      ss_epoch: '2',
      ss_steps: '3',
      ss_num_epochs: '2', // ceil(3 steps / (2 batches of 2 images / 1 accumulation))
      ss_num_batches_per_epoch: '2',
      ss_total_batch_size: '2',
      ss_batch_size_per_device: '2',
      ss_tag_frequency: '{"my-photos": {"a cat": 1, "sitting": 1, "cat": 2, "dog": 2}}',
      ss_dataset_dirs: '{"my-photos": {"n_repeats": 1, "img_count": 4}}',
      ss_reg_dataset_dirs: '{}',
      ss_bucket_info: 'null',
      ss_sd_model_hash: h.legacy,
      ss_new_sd_model_hash: h.sha256,
      ss_sd_model_name: 'tiny',
      ss_resolution: '(32, 32)',
      'modelspec.resolution': '32x32',
      ss_training_finished_at: '1767323045.5',
      ss_training_started_at: '1767322985.5',
      ss_network_dim: '4',
      ss_network_alpha: '8.0',
      ss_num_validation_images: '0',
      ss_v2: 'False',
      ss_clip_skip: 'None',
      ss_random_crop: 'True',
      ss_flip_aug: 'False',
    });
    // sshs_* are still sd-scripts' hashes of the tensors and the ss_* metadata.
    expect(kohyaHashes(file)).toEqual({ modelHash: m.sshs_model_hash, legacyHash: m.sshs_legacy_hash });
    const hdr = await native().safetensorsHeader(file);
    expect(`0x${createHash('sha256').update(fs.readFileSync(file).subarray(hdr.dataStart)).digest('hex')}`).toBe(m['modelspec.hash_sha256']);
  });

  test('the hashed base file: a single file itself, else the UNet weights (the variant\'s first); a folder hashes as sd-scripts\' "IsADirectory"', async () => {
    const single = path.join(fixtures, 'models', 'tiny-single-file.safetensors');
    expect(baseModelHashFile(single)).toBe(single);
    expect(await baseModelHashes(single)).toEqual(sdScriptsHashes(single));
    expect(baseModelHashFile(tiny)).toBe(path.join(tiny, 'unet', 'diffusion_pytorch_model.safetensors'));
    expect(baseModelHashFile(tiny, 'fp16')).toBe(path.join(tiny, 'unet', 'diffusion_pytorch_model.safetensors')); // no fp16 file there
    const v = path.join(tmp, 'variant-base');
    fs.mkdirSync(path.join(v, 'unet'), { recursive: true });
    fs.writeFileSync(path.join(v, 'unet', 'diffusion_pytorch_model.fp16.safetensors'), 'small');
    expect(baseModelHashFile(v, 'fp16')).toBe(path.join(v, 'unet', 'diffusion_pytorch_model.fp16.safetensors'));
    // < 1 MiB: the old hash reads nothing (sha256 of b"").
    expect(await baseModelHashes(baseModelHashFile(v, 'fp16'))).toEqual({ legacy: 'e3b0c442', sha256: createHash('sha256').update('small').digest('hex') });
    expect(baseModelHashFile(v)).toBe(path.join(v, 'unet')); // sharded or absent: the folder
    expect(await baseModelHashes(path.join(v, 'unet'))).toEqual({ legacy: 'IsADirectory', sha256: 'IsADirectory' });
  });

  test('end of training and `checkpoints export` of its checkpoint: tag frequency of the run\'s captions, 1-based epoch', async () => {
    const data = path.join(tmp, 'shapes');
    await makeDemoData(data, { count: 4, size: 32, seed: 0 });
    // Known captions: one a list of variants (the first one counts, as sd-scripts reads a caption file's first line).
    const capFile = path.join(data, 'captions.json');
    const files = Object.keys(JSON.parse(fs.readFileSync(capFile, 'utf8')) as Record<string, unknown>);
    expect(files).toHaveLength(4);
    const caps: unknown[] = ['red, circle', ['Red, square', 'blue, ignored'], 'circle , white background', 'star'];
    fs.writeFileSync(capFile, JSON.stringify(Object.fromEntries(files.map((f, i) => [f, caps[i]]))));
    const out = path.join(tmp, 'run');
    const { result: r } = await quietTrain(tinyRunConfig(out, data, { train_batch_size: 2, max_train_steps: 3, save_format: ['kohya'], checkpointing_steps: 3 }));
    const want = '{"shapes": {"red": 2, "circle": 2, "square": 1, "white background": 1, "star": 1}}';
    const m = await meta(path.join(out, 'lora_kohya.safetensors'));
    checkKeys(m);
    expect(JSON.parse(m.ss_tag_frequency)).toEqual(JSON.parse(want));
    expect([m.ss_epoch, m.ss_steps, m.ss_output_name, m.ss_num_train_images]).toEqual(['2', '3', 'lora_kohya', '4']);
    expect(r.lastCheckpoint).toBeDefined();
    const e = await exportCheckpoint(r.lastCheckpoint!, { formats: ['kohya'], out: path.join(tmp, 'ck-export', 'exported.safetensors') });
    const m2 = await meta(e.files[0]);
    checkKeys(m2);
    expect(JSON.parse(m2.ss_tag_frequency)).toEqual(JSON.parse(want));
    expect([m2.ss_epoch, m2.ss_steps, m2.ss_output_name]).toEqual(['2', '3', 'exported']);
    // The data folder changed since: its captions are not the run's, so none are claimed.
    fs.writeFileSync(capFile, JSON.stringify(Object.fromEntries(files.map((f) => [f, 'other']))));
    const e3 = await exportCheckpoint(r.lastCheckpoint!, { formats: ['kohya'], out: path.join(tmp, 'ck-export2', 'x.safetensors') });
    expect((await meta(e3.files[0])).ss_tag_frequency).toBe('{}');
  }, 120_000);
});

// ---- (7) --merge with a --variant fp16 base ----

/** test/fixtures/models/tiny as an fp16-variant folder: every weight file F16 (float tensors) under `<stem>.fp16.safetensors`. */
async function makeFp16Variant(dst: string): Promise<void> {
  fs.cpSync(tiny, dst, { recursive: true });
  for (const [comp, stem] of [['unet', 'diffusion_pytorch_model'], ['vae', 'diffusion_pytorch_model'], ['text_encoder', 'model']]) {
    const f = path.join(dst, comp, `${stem}.safetensors`);
    const orig = await native().safetensorsRead(f);
    const half = byName((await native().safetensorsRead(f, { dtype: 'F16' })).tensors);
    const tensors = orig.tensors.map((t) => (t.dtype === 'F32' ? half.get(t.name)! : t));
    await native().safetensorsWrite(path.join(dst, comp, `${stem}.fp16.safetensors`), tensors, orig.metadata);
    fs.rmSync(f);
  }
}

const PYTHON = process.env.PYTHON ?? 'python3';
const pyEnv = { ...process.env, PYTHONPATH: [process.env.DIFFUSERS_SRC, process.env.PYTHONPATH].filter(Boolean).join(path.delimiter) };
const probe = spawnSync(PYTHON, ['-c', 'import torch, safetensors, diffusers'], { encoding: 'utf8', env: pyEnv });
const haveDiffusers = probe.status === 0;
if (!haveDiffusers)
  // eslint-disable-next-line no-console
  console.warn(
    `SKIPPING the diffusers load of a merged fp16-variant pipeline: ${PYTHON} cannot import torch, safetensors and diffusers ` +
      `(${(probe.stderr || String(probe.error)).trim().split('\n').pop()}). Set PYTHON to an interpreter that has torch and safetensors, and DIFFUSERS_SRC to diffusers' src/ (or install diffusers).`,
  );
const pyTest = haveDiffusers ? test : test.skip;

describe('(7) --merge on an fp16 variant base', () => {
  const fp16 = path.join(tmp, 'tiny-fp16');
  const out = path.join(tmp, 'merged-fp16');
  const final = path.join(out, 'final_pipeline');
  let unetInputs: HostTensor[];
  let withLora: HostTensor;

  beforeAll(async () => {
    await makeFp16Variant(fp16);
    const st = JSON.parse(fs.readFileSync(path.join(ckpt, 'trainer_state.json'), 'utf8'));
    await exportLora({
      source: { checkpoint: path.join(ckpt, 'model.safetensors'), alpha: 8 },
      outDir: out,
      formats: ['diffusers'],
      merge: true,
      baseModel: fp16,
      variant: 'fp16',
      config: parseTrainConfig({ ...st.config, variant: 'fp16' }),
      steps: 3,
      epoch: st.epoch,
      numTrainImages: 4,
      mixedPrecision: 'no',
      trainingStartedAt: Date.now(),
    });
    unetInputs = (await native().safetensorsRead(path.join(fixtures, 'golden', 'tiny', 'inputs.safetensors'))).tensors.filter((t) =>
      ['latents', 'timesteps', 'encoder_hidden_states'].includes(t.name),
    );
    // The fp16 base UNet with the LoRA applied at run time: what the merged UNet must compute (up to fp16 rounding).
    const base = await native().loadPipeline(fp16, { components: ['unet'], variant: 'fp16' });
    withLora = (await native().forward(base, unetInputs, { lora: path.join(out, LORA_FILES.diffusers) }))[0];
    native().dispose(base);
  });

  test('mergedFileName: the variant before .safetensors', () => {
    expect(mergedFileName('diffusion_pytorch_model.safetensors', 'fp16')).toBe('diffusion_pytorch_model.fp16.safetensors');
    expect(mergedFileName('model.safetensors', undefined)).toBe('model.safetensors');
  });

  test('file names and dtypes: the merged UNet is diffusion_pytorch_model.fp16.safetensors in F16; the rest are the base\'s variant files, linked', async () => {
    const names = (d: string) => fs.readdirSync(path.join(final, d)).sort();
    expect(names('unet')).toEqual(['config.json', 'diffusion_pytorch_model.fp16.safetensors']);
    expect(names('vae')).toEqual(['config.json', 'diffusion_pytorch_model.fp16.safetensors']);
    expect(names('text_encoder')).toEqual(['config.json', 'model.fp16.safetensors']);
    for (const f of ['vae/diffusion_pytorch_model.fp16.safetensors', 'text_encoder/model.fp16.safetensors'])
      expect([f, fs.statSync(path.join(final, f)).ino]).toEqual([f, fs.statSync(path.join(fp16, f)).ino]);
    const baseW = (await native().safetensorsRead(path.join(fp16, 'unet', 'diffusion_pytorch_model.fp16.safetensors'))).tensors;
    const merged = byName((await native().safetensorsRead(path.join(final, 'unet', 'diffusion_pytorch_model.fp16.safetensors'))).tensors);
    expect(merged.size).toBe(baseW.length);
    let changed = 0;
    for (const t of baseW) {
      const u = merged.get(t.name)!;
      expect([t.name, u.dtype, u.shape]).toEqual([t.name, t.dtype, t.shape]);
      if (!Buffer.from(t.data).equals(Buffer.from(u.data))) changed++;
    }
    expect(baseW.every((t) => t.dtype === 'F16')).toBe(true);
    expect(changed).toBe(48);
    // train-lora loads the folder with --variant fp16 and computes base + LoRA.
    const p = await native().loadPipeline(final, { components: ['unet'], variant: 'fp16' });
    const pred = (await native().forward(p, unetInputs))[0];
    native().dispose(p);
    expect(relativeError(pred, withLora)).toBeLessThan(5e-3);
  });

  pyTest('diffusers: from_pretrained(final_pipeline, variant="fp16") loads every component in fp16 and gives the merged UNet\'s output', () => {
    const predFile = path.join(tmp, 'py-pred.safetensors');
    const r = spawnSync(
      PYTHON,
      [path.join(__dirname, '..', 'scripts', 'golden', 'check_variant_merge.py'), final, 'fp16', path.join(fixtures, 'golden', 'tiny', 'inputs.safetensors'), predFile],
      { encoding: 'utf8', env: pyEnv, timeout: 300_000 },
    );
    expect(r.stderr.includes('Traceback') ? r.stderr : '').toBe('');
    expect(r.status).toBe(0);
    const info = JSON.parse(r.stdout.trim().split('\n').pop()!) as { components: string[]; dtypes: Record<string, string> };
    expect(info.components).toEqual(['scheduler', 'text_encoder', 'tokenizer', 'unet', 'vae']);
    expect(info.dtypes).toEqual({ unet: 'float16', vae: 'float16', text_encoder: 'float16' });
    return native()
      .safetensorsRead(predFile)
      .then(async (py) => {
        const pyPred = py.tensors[0];
        // Our merged UNet (same F16 weights, computed in float64 by diffusers) and the fp16 base + LoRA at run time.
        const p = await native().loadPipeline(final, { components: ['unet'], variant: 'fp16' });
        const ours = (await native().forward(p, unetInputs))[0];
        native().dispose(p);
        expect(relativeError(ours, pyPred)).toBeLessThan(1e-4);
        expect(relativeError(pyPred, withLora)).toBeLessThan(5e-3);
      });
  }, 300_000);
});
