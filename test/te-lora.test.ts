/**
 * Text-encoder LoRA (--train-text-encoder) against transformers + peft + diffusers (goldens by
 * scripts/golden/make_te_lora_goldens.py, test/fixtures/golden/te_lora/): the training step with the text encoder's
 * adapters in their own AdamW group, and the three export formats loaded by diffusers / peft.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { parseTrainConfig, type TrainConfig } from '../src/config';
import { exportLora } from '../src/export/lora-export';
import { native, type HostTensor, type PipelineHandle } from '../src/native';
import { byName, relativeError, toNumbers } from '../src/tensors';
import { lrAt, resolveLrSchedule } from '../src/schedules/lr';
import { NoiseSchedule } from '../src/schedules/noise';
import { textEncoderLr } from '../src/train/train';
import { tinyRunConfig } from './helpers/tiny-run';
import { expectAdaptersMatch, loadAdapters, renamedFrom, savedAdapters } from './helpers/trainer-state';

const fixtures = path.join(__dirname, 'fixtures');
const tiny = path.join(fixtures, 'models', 'tiny');
const G = path.join(fixtures, 'golden', 'te_lora');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-telora-'));
const parse = (o: Record<string, unknown>): TrainConfig => parseTrainConfig({ pretrained_model_name_or_path: tiny, train_data_dir: tmp, ...o });
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

async function read(file: string): Promise<{ t: Map<string, HostTensor>; meta: Record<string, string> }> {
  const r = await native().safetensorsRead(file);
  return { t: byName(r.tensors), meta: r.metadata };
}

/** Same keys, and every tensor equal to fp32 rounding (relative error < 1e-6). */
function sameValues(got: Map<string, HostTensor>, want: Map<string, HostTensor>): void {
  expect([...got.keys()].sort()).toEqual([...want.keys()].sort());
  for (const [k, t] of want) expect([k, got.get(k)!.shape, relativeError(got.get(k)!, t) < 1e-6]).toEqual([k, t.shape, true]);
}

describe('training step: UNet + text-encoder LoRA equal diffusers + transformers + peft', () => {
  test('losses, grad norms (both models), both param groups\' LRs and the final adapters of both models', async () => {
    const info = JSON.parse(fs.readFileSync(path.join(G, 'expected_train.json'), 'utf8')) as Record<string, number | boolean | string[]>;
    const inputs = byName((await native().safetensorsRead(path.join(fixtures, 'golden', 'train', 'inputs.safetensors'))).tensors);
    const expected = byName((await native().safetensorsRead(path.join(G, 'expected_train.safetensors'))).tensors);
    const noise = NoiseSchedule.fromFile(path.join(tiny, 'scheduler', 'scheduler_config.json'));
    const pipe = await native().loadPipeline(tiny, { components: ['unet', 'text_encoder'] });
    const { trainer } = await native().createTrainer(pipe, {
      rank: 4,
      alpha: 8,
      trainTextEncoder: true,
      textEncoderTargets: info.te_targets as string[],
      alphasCumprod: Array.from(noise.alphasCumprod),
      maxGradNorm: info.max_grad_norm as number,
      adamWeightDecay: 1e-2,
      seed: 1234,
      // the cache must be bypassed while the text encoder trains (a stale embedding would change every loss after step 1)
      textEmbeddingCacheMb: 64,
    });
    const init = [...renamedFrom('lora_init.', inputs), ...renamedFrom('te_lora_init.', expected)];
    await loadAdapters(trainer, path.join(tmp, 'init'), init);

    const spec = resolveLrSchedule({ kind: 'cosine', baseLr: info.unet_lr as number, warmupSteps: 2, totalSteps: 3 });
    const cfg = { train_text_encoder: true, text_encoder_lr: info.te_lr } as TrainConfig;
    let step = 0;
    for (let i = 0; i < 6; i++) {
      const loss = await native().trainerMicroStep(
        trainer,
        { latents: inputs.get(`latents.${i}`)!, noise: inputs.get(`noise.${i}`)!, timesteps: inputs.get(`timesteps.${i}`)!, inputIds: inputs.get(`input_ids.${i}`)! },
        2,
      );
      expect({ i, rel: Math.abs(loss - (info[`loss.${i}`] as number)) / Math.abs(info[`loss.${i}`] as number) < 1e-5 }).toEqual({ i, rel: true });
      if (i % 2 === 1) {
        const lr = lrAt(spec, step);
        const teLr = textEncoderLr(cfg, spec, step)!;
        expect(lr).toBeCloseTo(info[`lr.${step}`] as number, 15);
        expect(teLr).toBeCloseTo(info[`te_lr.${step}`] as number, 15);
        const r = await native().trainerOptimizerStep(trainer, lr, teLr);
        expect(Math.abs(r.gradNorm - (info[`grad_norm.${step}`] as number)) / (info[`grad_norm.${step}`] as number)).toBeLessThan(1e-5);
        step++;
      }
    }
    expect([0, 1, 2].map((k) => info[`clipped.${k}`])).toContain(true);
    expect([0, 1, 2].map((k) => info[`clipped.${k}`])).toContain(false);

    const out = path.join(tmp, 'trained');
    const keys = expectAdaptersMatch(await savedAdapters(trainer, out), expected, byName(init), 1e-4);
    // 5 layers x 6 targets x (A, B), and optimizer state for each.
    expect(keys.filter((k) => k.startsWith('text_encoder.'))).toHaveLength(60);
    const optim = byName((await native().safetensorsRead(path.join(out, 'optimizer.safetensors'))).tensors);
    expect(optim.has('text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_B.weight.exp_avg_sq')).toBe(true);
    native().dispose(pipe);
  });

  test('a target that matches nothing, full mode, and flags without --train-text-encoder are errors naming the flag', async () => {
    const pipe = await native().loadPipeline(tiny, { components: ['unet', 'text_encoder'] });
    await expect(native().createTrainer(pipe, { trainTextEncoder: true, textEncoderTargets: ['q_proj', 'to_q', 'mlp.fc9'], alphasCumprod: [0.5] })).rejects.toThrow(
      /--text-encoder-target-modules: "to_q", "mlp.fc9" match no Linear module of the text encoder/,
    );
    await expect(native().createTrainer(pipe, { mode: 'full', trainTextEncoder: true, alphasCumprod: [0.5] })).rejects.toThrow(/--train-text-encoder .*--train-mode lora/);
    native().dispose(pipe);
    expect(() => parse({ train_text_encoder: true, train_mode: 'full' })).toThrow(/--train-text-encoder: .*--train-mode lora/);
    expect(() => parse({ text_encoder_lr: 1e-5 })).toThrow(/--text-encoder-lr: .*add --train-text-encoder/);
    expect(() => parse({ text_encoder_target_modules: ['fc1'] })).toThrow(/--text-encoder-target-modules: .*add --train-text-encoder/);
    const c = parse({ train_text_encoder: true, learning_rate: 2e-4, lr_scheduler: 'constant' });
    expect(textEncoderLr(c, resolveLrSchedule({ kind: 'constant', baseLr: 2e-4, warmupSteps: 0, totalSteps: 10 }), 3)).toBe(2e-4);
    expect(textEncoderLr(parse({}), resolveLrSchedule({ kind: 'constant', baseLr: 2e-4, warmupSteps: 0, totalSteps: 10 }), 3)).toBeUndefined();
  });
});

describe('a trained text encoder under gradient checkpointing and mixed precision', () => {
  /** The parity run's first 2 optimizer steps with these options; returns the losses and the text encoder's adapters. */
  async function run(o: { gc?: boolean; mixed?: 'bf16'; cacheMb?: number }): Promise<{ losses: number[]; te: Map<string, HostTensor> }> {
    const inputs = byName((await native().safetensorsRead(path.join(fixtures, 'golden', 'train', 'inputs.safetensors'))).tensors);
    const expected = byName((await native().safetensorsRead(path.join(G, 'expected_train.safetensors'))).tensors);
    const noise = NoiseSchedule.fromFile(path.join(tiny, 'scheduler', 'scheduler_config.json'));
    const pipe = await native().loadPipeline(tiny, { components: ['unet', 'text_encoder'], dtype: o.mixed ?? 'fp32' });
    const { trainer } = await native().createTrainer(pipe, {
      rank: 4,
      alpha: 8,
      trainTextEncoder: true,
      textEncoderTargets: ['q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1', 'fc2'],
      alphasCumprod: Array.from(noise.alphasCumprod),
      gradientCheckpointing: o.gc ?? false,
      mixedPrecision: o.mixed ?? 'no',
      textEmbeddingCacheMb: o.cacheMb,
      seed: 1234,
    });
    const init = [...renamedFrom('lora_init.', inputs), ...renamedFrom('te_lora_init.', expected)];
    const dir = fs.mkdtempSync(path.join(tmp, 'run-'));
    await loadAdapters(trainer, dir, init);
    const losses: number[] = [];
    for (let i = 0; i < 4; i++) {
      losses.push(await native().trainerMicroStep(trainer, { latents: inputs.get(`latents.${i}`)!, noise: inputs.get(`noise.${i}`)!, timesteps: inputs.get(`timesteps.${i}`)!, inputIds: inputs.get(`input_ids.${i}`)! }, 2));
      if (i % 2 === 1) await native().trainerOptimizerStep(trainer, 1e-2, 1e-2);
    }
    const te = new Map([...(await savedAdapters(trainer, dir))].filter(([k]) => k.startsWith('text_encoder.')));
    native().dispose(pipe);
    return { losses, te };
  }
  const maxRel = (a: Map<string, HostTensor>, b: Map<string, HostTensor>): number => Math.max(...[...a].map(([k, t]) => relativeError(t, b.get(k)!)));

  test('checkpointing recomputes each encoder layer: the same trajectory; the embedding cache is not used; bf16 trains it along the fp32 trajectory', async () => {
    const plain = await run({ cacheMb: 0 });
    const gc = await run({ gc: true, cacheMb: 0 });
    // measured 4.3e-6: the same computation with a different order of accumulation in backward
    expect(maxRel(gc.te, plain.te)).toBeLessThan(2e-5);
    // A text-embedding cache left on while the text encoder trains would serve stale embeddings (step 2's loss).
    const cached = await run({ cacheMb: 256 });
    expect(cached.losses).toEqual(plain.losses);
    expect(maxRel(cached.te, plain.te)).toBe(0);
    const bf16 = await run({ mixed: 'bf16', gc: true });
    expect(bf16.losses.every(Number.isFinite)).toBe(true);
    // bf16 (frozen weights bf16, autocast): the fp32 trajectory up to bf16 rounding. Measured at lr 1e-2: A within
    // 0.6-2.8e-2; B (pure AdamW updates from 0, whose tiny elements flip sign under bf16 rounding) within 0.05-0.33.
    // An untrained text encoder (B = 0) would be 1.
    for (const [k, t] of bf16.te) {
      const e = relativeError(t, plain.te.get(k)!);
      expect([k, e > 0 && e < (k.endsWith('lora_B.weight') ? 0.6 : 6e-2)]).toEqual([k, true]);
    }
  });
});

describe('exports with text-encoder adapters: what diffusers / peft write, and what they compute when they load ours', () => {
  const E = path.join(G, 'export');
  let out: string;
  let outputs: Map<string, HostTensor>;
  let pipe: PipelineHandle;

  beforeAll(async () => {
    out = path.join(tmp, 'export');
    outputs = (await read(path.join(E, 'outputs.safetensors'))).t;
    await exportLora({
      source: { checkpoint: path.join(E, 'checkpoint.safetensors'), alpha: 8 },
      outDir: out,
      formats: ['diffusers', 'peft', 'kohya'],
      merge: true,
      baseModel: tiny,
      config: parse({ rank: 4, lora_alpha: 8, train_text_encoder: true }),
      steps: 1,
      epoch: 0,
      numTrainImages: 1,
      mixedPrecision: 'no',
      trainingStartedAt: Date.now(),
    });
  });
  afterAll(() => {
    if (pipe) native().dispose(pipe);
  });

  async function textEmbeddings(lora?: string, model = tiny): Promise<HostTensor> {
    const p = await native().loadPipeline(model, { components: ['text_encoder', 'unet'] });
    try {
      return (await native().forward(p, [outputs.get('input_ids')!], lora ? { lora } : {}))[0];
    } finally {
      native().dispose(p);
    }
  }

  test('diffusers: the tensors save_lora_weights writes (text_encoder.*.lora_linear_layer.*) and its rank/alpha metadata', async () => {
    const got = await read(path.join(out, 'pytorch_lora_weights.safetensors'));
    const want = await read(path.join(E, 'diffusers.safetensors'));
    // diffusers writes transformers 5's module names (no text_model. level); ours are the SD files' (with it), which
    // diffusers loads the same (checked by make_te_lora_goldens.py's kohya/diffusers loads and below).
    const norm = new Map([...want.t].map(([k, v]) => [k.replace(/^text_encoder\.(?!text_model\.)/, 'text_encoder.text_model.'), v]));
    sameValues(got.t, norm);
    const meta = JSON.parse(got.meta.lora_adapter_metadata) as Record<string, unknown>;
    expect([meta['text_encoder.r'], meta['text_encoder.lora_alpha'], meta['text_encoder.target_modules']]).toEqual([4, 8, ['k_proj', 'out_proj', 'q_proj', 'v_proj']]);
  });

  test('peft: lora_weights/text_encoder/ is the adapter PeftModel(CLIPTextModel).save_pretrained writes', async () => {
    const got = await read(path.join(out, 'lora_weights', 'text_encoder', 'adapter_model.safetensors'));
    sameValues(got.t, (await read(path.join(E, 'peft_text_encoder', 'adapter_model.safetensors'))).t);
    const cfg = JSON.parse(fs.readFileSync(path.join(out, 'lora_weights', 'text_encoder', 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
    expect([cfg.r, cfg.lora_alpha, cfg.peft_type, cfg.target_modules]).toEqual([4, 8, 'LORA', ['k_proj', 'out_proj', 'q_proj', 'v_proj']]);
  });

  test('kohya: the sd-scripts / A1111 key names (lora_te_text_model_encoder_layers_N_...), alpha 8', async () => {
    const got = await read(path.join(out, 'lora_kohya.safetensors'));
    expect([...got.t.keys()].sort()).toEqual(JSON.parse(fs.readFileSync(path.join(E, 'kohya_keys.json'), 'utf8')));
    expect(Array.from(toNumbers(got.t.get('lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha')!))).toEqual([8]);
  });

  test('the golden LoRA output differs from the base model (so the comparisons below can fail)', async () => {
    expect(relativeError(outputs.get('lora')!, outputs.get('base')!)).toBeGreaterThan(1e-2);
    expect(relativeError(await textEmbeddings(), outputs.get('base')!)).toBeLessThan(1e-5);
  });

  test.each([
    ['diffusers file', 'pytorch_lora_weights.safetensors'],
    ['peft folder (its text_encoder/ adapter is read too)', 'lora_weights'],
    ['peft text-encoder adapter alone', path.join('lora_weights', 'text_encoder')],
    ['kohya file', 'lora_kohya.safetensors'],
  ])('our text encoder with our %s equals transformers + peft', async (_what, rel) => {
    expect(relativeError(await textEmbeddings(path.join(out, rel)), outputs.get('lora')!)).toBeLessThan(1e-5);
  });

  test('files diffusers and peft wrote load here the same way', async () => {
    expect(relativeError(await textEmbeddings(path.join(E, 'diffusers.safetensors')), outputs.get('lora')!)).toBeLessThan(1e-5);
    expect(relativeError(await textEmbeddings(path.join(E, 'peft_text_encoder')), outputs.get('lora')!)).toBeLessThan(1e-5);
  });

  test('--merge folds the adapters into final_pipeline/text_encoder', async () => {
    expect(relativeError(await textEmbeddings(undefined, path.join(out, 'final_pipeline')), outputs.get('lora')!)).toBeLessThan(1e-5);
  });

  test('--init-lora-weights: text-encoder weights start the text encoder\'s adapters, or are an error when it is not trained', async () => {
    pipe = await native().loadPipeline(tiny, { components: ['unet', 'text_encoder'] });
    const file = path.join(out, 'lora_kohya.safetensors');
    const frozen = await native().createTrainer(pipe, { rank: 4, alpha: 8, alphasCumprod: [0.5] });
    await expect(native().trainerLoadLora(frozen.trainer, file)).rejects.toThrow(/text-encoder LoRA weights \(20 modules\), which this run would ignore: add --train-text-encoder/);
    native().dispose(frozen.trainer);
    native().dispose(pipe);
    pipe = await native().loadPipeline(tiny, { components: ['unet', 'text_encoder'] });
    const { trainer } = await native().createTrainer(pipe, { rank: 4, alpha: 8, trainTextEncoder: true, alphasCumprod: [0.5] });
    const n = await native().trainerLoadLora(trainer, file);
    const ckpt = (await read(path.join(E, 'checkpoint.safetensors'))).t;
    expect(n).toBe(ckpt.size / 2);
    const saved = path.join(tmp, 'init-te');
    fs.mkdirSync(saved);
    await native().trainerSaveState(trainer, saved);
    sameValues((await read(path.join(saved, 'model.safetensors'))).t, ckpt);
  });
});

describe('training runs with --train-text-encoder: checkpoints and exact resume', () => {
  const data = path.join(tmp, 'data');
  const cfgFor = (out: string, over: Record<string, unknown> = {}): TrainConfig =>
    tinyRunConfig(out, data, {
      random_flip: true,
      train_batch_size: 2,
      gradient_accumulation_steps: 2,
      max_train_steps: 5,
      learning_rate: 1e-3,
      lr_scheduler: 'cosine',
      lr_warmup_steps: 1,
      checkpointing_steps: 2,
      rank: 4,
      lora_alpha: 8,
      seed: 11,
      train_text_encoder: true,
      text_encoder_lr: 5e-3,
      text_encoder_target_modules: ['q_proj', 'k_proj', 'v_proj', 'out_proj', 'fc1'],
      gradient_checkpointing: true,
      save_format: ['diffusers', 'kohya'],
      // validation images mid-run, from the pipeline whose text encoder is being trained (eval mode for the render)
      validation_prompt: ['a red square'],
      num_validation_images: 1,
      validation_steps: 4,
      validation_num_inference_steps: 2,
      validation_resolution: 32,
      ...over,
    });
  let straight: { out: string; losses: number[] };

  beforeAll(async () => {
    const { makeDemoData } = await import('../src/data/demo-data');
    const { train } = await import('../src/train/train');
    const { Quiet } = await import('./helpers/quiet-reporter');
    await makeDemoData(data, { count: 6, size: 40, seed: 3 });
    const out = path.join(tmp, 'run-straight');
    const rep = new Quiet();
    expect((await train(cfgFor(out), rep, { installSignalHandlers: false })).finished).toBe(true);
    straight = { out, losses: rep.steps.map((m) => m.loss) };
  });

  test('checkpoints and exports hold the text encoder\'s adapters (trained: B moved from 0) and their AdamW state', async () => {
    const ckpt = path.join(straight.out, 'checkpoints', 'checkpoint-4');
    const model = (await read(path.join(ckpt, 'model.safetensors'))).t;
    const te = [...model.keys()].filter((k) => k.startsWith('text_encoder.'));
    expect(te).toHaveLength(5 * 5 * 2);
    expect(Math.max(...toNumbers(model.get('text_encoder.text_model.encoder.layers.2.mlp.fc1.lora_B.weight')!).map(Math.abs))).toBeGreaterThan(0);
    const optim = (await read(path.join(ckpt, 'optimizer.safetensors'))).t;
    expect(te.every((k) => optim.has(`${k}.exp_avg`) && optim.has(`${k}.exp_avg_sq`))).toBe(true);
    const kohya = (await read(path.join(straight.out, 'lora_kohya.safetensors'))).t;
    expect([...kohya.keys()].filter((k) => k.startsWith('lora_te_text_model_encoder_layers_')).length).toBe(5 * 5 * 3);
    expect((await read(path.join(straight.out, 'lora_kohya.safetensors'))).meta.ss_text_encoder_lr).toBe('0.005');
    expect(fs.readdirSync(path.join(straight.out, 'validation'))).toContain('step000004_prompt0_img0.png');
  });

  test('interrupted twice and resumed: bit-identical losses and LoRA (text encoder included)', async () => {
    const { train } = await import('../src/train/train');
    const { Quiet } = await import('./helpers/quiet-reporter');
    const out = path.join(tmp, 'run-resumed');
    const losses: number[] = [];
    let first = true;
    for (const stopAt of [2, 3, undefined]) {
      const rep = new Quiet();
      const r = await train(cfgFor(out, first ? {} : { resume_from_checkpoint: 'latest' }), rep, { installSignalHandlers: false, stopAtStep: stopAt });
      first = false;
      losses.push(...rep.steps.map((m) => m.loss));
      expect(r.globalStep).toBe(stopAt ?? 5);
    }
    expect(losses).toEqual(straight.losses);
    const file = (d: string) => fs.readFileSync(path.join(d, 'pytorch_lora_weights.safetensors'));
    expect(file(out).equals(file(straight.out))).toBe(true);
  });

  test('resuming without --train-text-encoder is refused, saying what differs', async () => {
    const { train } = await import('../src/train/train');
    const { Quiet } = await import('./helpers/quiet-reporter');
    const err = await train(cfgFor(straight.out, { resume_from_checkpoint: 'latest', max_train_steps: 7, train_text_encoder: false, text_encoder_lr: undefined, text_encoder_target_modules: undefined }), new Quiet(), {
      installSignalHandlers: false,
    }).then(
      () => null,
      (e: Error) => e.message,
    );
    expect(err).toMatch(/--train-text-encoder was on, now off: the checkpoint holds text-encoder adapters/);
  });
});
