/**
 * The training loop and its checkpoints on the tiny model (CPU): contents of a checkpoint, exact resume (bit for
 * bit) after interruptions mid-epoch, retention, the run lock.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { CheckpointManager, RunLock } from '../src/checkpoint/manager';
import { type TrainConfig } from '../src/config';
import { makeDemoData } from '../src/data/demo-data';
import { native } from '../src/native';
import { train, type StepMetrics } from '../src/train/train';
import { Quiet } from './helpers/quiet-reporter';
import { tinyRunConfig } from './helpers/tiny-run';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-train-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
const model = path.join(__dirname, 'fixtures', 'models', 'tiny');
const data = path.join(tmp, 'data');


function config(out: string, over: Record<string, unknown> = {}): TrainConfig {
  return tinyRunConfig(out, data, {
    random_flip: true,
    train_batch_size: 2,
    // 10 images / batch 2 = 5 micro-batches per epoch; accumulation 2 -> cycles of 2, 2, 1 per epoch.
    gradient_accumulation_steps: 2,
    max_train_steps: 8,
    learning_rate: 1e-3,
    lr_scheduler: 'cosine',
    lr_warmup_steps: 2,
    checkpointing_steps: 3,
    checkpoints_total_limit: 2,
    rank: 4,
    lora_alpha: 8,
    seed: 7,
    save_format: ['diffusers', 'peft', 'kohya'],
    ...over,
  });
}

async function loraBytes(out: string): Promise<Buffer> {
  return fs.readFileSync(path.join(out, 'pytorch_lora_weights.safetensors'));
}

beforeAll(async () => {
  await makeDemoData(data, { count: 10, size: 40, seed: 1 });
});

describe('training with checkpoints', () => {
  let straight: { out: string; steps: StepMetrics[] };

  beforeAll(async () => {
    const out = path.join(tmp, 'straight');
    const rep = new Quiet();
    const r = await train(config(out), rep, { installSignalHandlers: false });
    expect(r.finished).toBe(true);
    straight = { out, steps: rep.steps };
  });

  test('a checkpoint holds every state file, a manifest last, and is verifiable', async () => {
    const mgr = new CheckpointManager(straight.out);
    const list = await mgr.list('full');
    // Saved: 3, 6 (interval) and 8 (final). Limit 2 keeps the newest two, the final counting among them (as diffusers
    // does); 3 stays beyond them only if it is the best by train loss.
    const best = mgr.readBest();
    expect(best?.metric).toBe('train_loss');
    expect([3, 6, 8]).toContain(best!.step);
    expect(list.map((e) => e.step)).toEqual(best!.step === 3 ? [8, 6, 3] : [8, 6]);
    for (const e of list) expect([e.name, e.valid, e.problem]).toEqual([e.name, true, undefined]);
    const files = Object.keys(list[0].manifest!.files).sort();
    expect(files).toEqual(['model.safetensors', 'optimizer.json', 'optimizer.safetensors', 'random_states_0.json', 'scaler.json', 'scheduler.json', 'trainer_state.json']);
    const ts = JSON.parse(fs.readFileSync(path.join(list[0].path, 'trainer_state.json'), 'utf8'));
    expect(ts.global_step).toBe(8);
    expect(ts.config.rank).toBe(4);
    const opt = await native().safetensorsHeader(path.join(list[0].path, 'optimizer.safetensors'));
    expect(opt.tensors.some((t) => t.name.endsWith('.lora_A.weight.exp_avg_sq'))).toBe(true);
  });

  test('the losses are finite, the LR follows warmup then cosine, and clipping reports a norm', () => {
    const s = straight.steps;
    expect(s.length).toBe(8);
    expect(s.every((m) => Number.isFinite(m.loss) && Number.isFinite(m.gradNorm))).toBe(true);
    expect(s[0].lr).toBe(0); // warmup starts at 0, as LambdaLR does
    expect(s[1].lr).toBeCloseTo(5e-4, 12);
    expect(s[2].lr).toBeCloseTo(1e-3, 12);
    expect(s[7].lr).toBeLessThan(s[3].lr);
    // 5 micro-batches per epoch with accumulation 2: epochs end after optimizer steps 3 and 6.
    expect(s.map((m) => m.epoch)).toEqual([0, 0, 0, 1, 1, 1, 2, 2]);
  });

  test('exports the LoRA in diffusers, PEFT and kohya formats that all load back to the same weights', async () => {
    const out = straight.out;
    for (const f of ['pytorch_lora_weights.safetensors', 'lora_weights/adapter_model.safetensors', 'lora_weights/adapter_config.json', 'lora_kohya.safetensors'])
      expect(fs.existsSync(path.join(out, f))).toBe(true);
    const inputs = (await native().safetensorsRead(path.join(__dirname, 'fixtures', 'golden', 'tiny', 'inputs.safetensors'))).tensors;
    const unetIn = inputs.filter((t) => ['latents', 'timesteps', 'encoder_hidden_states'].includes(t.name));
    const p = await native().loadPipeline(model, { components: ['unet'] });
    const preds = [];
    for (const f of ['pytorch_lora_weights.safetensors', 'lora_weights/adapter_model.safetensors', 'lora_kohya.safetensors'])
      preds.push(Buffer.from((await native().forward(p, unetIn, { lora: path.join(out, f) }))[0].data));
    expect(preds[0].equals(preds[1])).toBe(true);
    expect(preds[0].equals(preds[2])).toBe(true);
    const cfg = JSON.parse(fs.readFileSync(path.join(out, 'lora_weights', 'adapter_config.json'), 'utf8'));
    expect([cfg.r, cfg.lora_alpha]).toEqual([4, 8]);
  });

  test.each([
    ['mid-epoch, inside the run', [2]],
    ['at an epoch end and again later', [3, 5]],
    ['after every step', [1, 2, 3, 4, 5, 6, 7]],
  ])('interrupted %s and resumed: bit-identical weights and losses', async (_label, stops) => {
    const out = path.join(tmp, `resumed-${stops.join('-')}`);
    const losses: number[] = [];
    let first = true;
    for (const stopAt of [...stops, undefined]) {
      const rep = new Quiet();
      const r = await train(config(out, first ? {} : { resume_from_checkpoint: 'latest' }), rep, { installSignalHandlers: false, stopAtStep: stopAt });
      first = false;
      losses.push(...rep.steps.map((m) => m.loss));
      if (stopAt !== undefined) {
        expect(r.signal).toBe('SIGINT');
        expect(r.globalStep).toBe(stopAt);
      } else {
        expect(r.finished).toBe(true);
      }
    }
    expect(losses).toEqual(straight.steps.map((m) => m.loss));
    expect((await loraBytes(out)).equals(await loraBytes(straight.out))).toBe(true);
  });

  test('a second trainer on the same output folder is refused, naming the holder', () => {
    const out = path.join(tmp, 'locked');
    const a = new RunLock(out);
    a.acquire();
    try {
      // The same pid holds it here, so simulate another live holder: the parent process.
      fs.writeFileSync(a.file, JSON.stringify({ pid: process.ppid, host: os.hostname(), started: 'now' }));
      expect(() => new RunLock(out).acquire()).toThrow(new RegExp(`in use by another train-lora process \\(pid ${process.ppid}`));
    } finally {
      fs.rmSync(a.file, { force: true });
    }
  });

  test('resuming with a different LoRA rank is refused with what differs', async () => {
    const err = await train(config(straight.out, { resume_from_checkpoint: 'latest', rank: 8, max_train_steps: 10 }), new Quiet(), { installSignalHandlers: false }).then(
      () => null,
      (e: Error) => e.message,
    );
    expect(err).toMatch(/cannot resume from .*checkpoint-8/);
    expect(err).toMatch(/--rank was 4, now 8/);
  });
});
