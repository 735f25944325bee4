/** val_loss on held-out images, --monitor val_loss, and stage-aware retention, on the tiny model (CPU). */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import type { ConfigError } from '../src/config';
import { loadDataset } from '../src/data/dataset';
import { makeDemoData } from '../src/data/demo-data';
import { train, type TrainerStateFile } from '../src/train/train';
import { splitDataset } from '../src/data/split';
import { Quiet } from './helpers/quiet-reporter';
import { tinyRunConfig } from './helpers/tiny-run';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-val-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));
const data = path.join(tmp, 'data');
const data2 = path.join(tmp, 'data2');

const cfg = (out: string, over: Record<string, unknown> = {}) => tinyRunConfig(out, data, { max_train_steps: 6, ...over });
const state = (ckpt: string): TrainerStateFile => JSON.parse(fs.readFileSync(path.join(ckpt, 'trainer_state.json'), 'utf8')) as TrainerStateFile;
const ckpts = (out: string) => fs.readdirSync(path.join(out, 'checkpoints')).filter((n) => /^checkpoint-\d+$/.test(n)).sort();

beforeAll(async () => {
  await makeDemoData(data, { count: 20, size: 32, seed: 2 });
  await makeDemoData(data2, { count: 12, size: 32, seed: 9 });
});

describe('splitDataset', () => {
  test('is seeded, disjoint and complete', async () => {
    const ds = await loadDataset(data);
    const a = splitDataset(ds, 0.2, 7);
    const b = splitDataset(ds, 0.2, 7);
    const c = splitDataset(ds, 0.2, 8);
    expect(a.val.items.map((i) => i.file)).toEqual(b.val.items.map((i) => i.file));
    expect(a.val.items.map((i) => i.file)).not.toEqual(c.val.items.map((i) => i.file));
    expect(a.val.items).toHaveLength(4);
    expect(a.train.items).toHaveLength(16);
    const all = new Set([...a.train.items, ...a.val.items].map((i) => i.file));
    expect(all.size).toBe(20);
  });
});

describe('config', () => {
  test('val_loss needs held-out data; split and dir exclude each other', () => {
    const bad = (over: Record<string, unknown>) => {
      try {
        cfg(path.join(tmp, 'x'), over);
      } catch (e) {
        return (e as ConfigError).problems;
      }
      return [];
    };
    expect(bad({ monitor: 'val_loss' })).toEqual([expect.stringMatching(/--monitor: val_loss needs held-out images: add --validation-split/)]);
    expect(bad({ validation_split: 0.1, validation_data_dir: data2 })).toEqual([expect.stringMatching(/--validation-split: use --validation-split or --validation-data-dir, not both/)]);
    expect(bad({ validation_split: 1.5 })).toEqual([expect.stringMatching(/--validation-split/)]);
  });
});

describe('val_loss', () => {
  test('is measured on the held-out split, recorded in checkpoints, and does not change the training trajectory', async () => {
    const withVal = new Quiet();
    const outA = path.join(tmp, 'val-a');
    await train(cfg(outA, { validation_split: 0.2, validation_steps: 2, monitor: 'val_loss', checkpoints_total_limit: 1 }), withVal, { installSignalHandlers: false });
    const noVal = new Quiet();
    const outB = path.join(tmp, 'val-b');
    await train(cfg(outB, { validation_split: 0.2, validation_steps: 1000 }), noVal, { installSignalHandlers: false });
    // Validation draws nothing from the training RNG: same losses and same LoRA.
    expect(withVal.steps.map((m) => m.loss)).toEqual(noVal.steps.map((m) => m.loss));
    const lora = (d: string) => fs.readFileSync(path.join(d, 'pytorch_lora_weights.safetensors'));
    expect(lora(outA).equals(lora(outB))).toBe(true);
    // Steps 2, 4, 6 (the last one is the end of training); B validates only at the end.
    expect(withVal.validations.map((v) => v.step)).toEqual([2, 4, 6]);
    expect(noVal.validations.map((v) => v.step)).toEqual([6]);
    for (const v of withVal.validations) expect(Number.isFinite(v.valLoss)).toBe(true);
    // Fixed noise and timesteps: the same weights give the same val_loss.
    expect(Math.abs(withVal.validations[2].valLoss! / noVal.validations[0].valLoss! - 1)).toBeLessThan(1e-6);
    expect(withVal.messages.some((m) => /4 images held out for val_loss, 16 train/.test(m))).toBe(true);
    // Checkpoints carry val_loss; the best one by val_loss is recorded and survives a limit of 1.
    const vals = new Map(withVal.validations.map((v) => [v.step, v.valLoss!]));
    const bestStep = [...vals.entries()].sort((x, y) => x[1] - y[1])[0][0];
    const best = JSON.parse(fs.readFileSync(path.join(outA, 'checkpoints', 'best.json'), 'utf8')) as { step: number; metric: string; value: number };
    expect(best).toMatchObject({ step: bestStep, metric: 'val_loss', value: vals.get(bestStep) });
    const names = ckpts(outA);
    expect(names).toContain(`checkpoint-${bestStep}`);
    expect(names).toContain('checkpoint-6');
    expect(state(path.join(outA, 'checkpoints', 'checkpoint-6')).val_loss).toBe(vals.get(6));
    expect(state(path.join(outA, 'checkpoints', 'checkpoint-6')).best_metric).toMatchObject({ name: 'val_loss', step: bestStep });
    // metrics.jsonl is written by the CLI reporter; here the reporter saw every val_loss.
  }, 600000);

  test('--validation-data-dir holds out a separate folder; the metric is also measured at checkpoint steps between validations', async () => {
    const rep = new Quiet();
    const out = path.join(tmp, 'val-dir');
    await train(cfg(out, { validation_data_dir: data2, validation_steps: 1000, monitor: 'val_loss', max_train_steps: 4, checkpoints_total_limit: 5 }), rep, { installSignalHandlers: false });
    expect(rep.messages.some((m) => /--validation-data-dir: 12 held-out images/.test(m))).toBe(true);
    expect(ckpts(out)).toEqual(['checkpoint-2', 'checkpoint-4']);
    const s2 = state(path.join(out, 'checkpoints', 'checkpoint-2'));
    expect(typeof s2.val_loss).toBe('number');
    expect(s2.best_metric?.name).toBe('val_loss');
  }, 600000);
});

describe('retention with stages', () => {
  test('the last checkpoint of an earlier stage is kept beyond the limit; the final counts among the newest N', async () => {
    const out = path.join(tmp, 'stages');
    const best = () => (JSON.parse(fs.readFileSync(path.join(out, 'checkpoints', 'best.json'), 'utf8')) as { step: number }).step;
    const has = (step: number) => ckpts(out).includes(`checkpoint-${step}`);
    await train(cfg(out, { max_train_steps: 4, checkpoints_total_limit: 1 }), new Quiet(), { installSignalHandlers: false });
    expect(has(4)).toBe(true);
    // Stage 2: another dataset, continued from stage 1's weights (checkpoints 6, 8, 10).
    await train(cfg(out, { train_data_dir: data2, max_train_steps: 10, checkpoints_total_limit: 1, resume_from_checkpoint: 'latest', allow_dataset_change: true }), new Quiet(), { installSignalHandlers: false });
    expect(has(4) && has(10)).toBe(true); // stage 1's last; the final, which is the newest (limit 1)
    expect(has(8)).toBe(best() === 8);
    expect(has(6)).toBe(best() === 6);
    expect(state(path.join(out, 'checkpoints', 'checkpoint-10')).stage).not.toBe(state(path.join(out, 'checkpoints', 'checkpoint-4')).stage);
    // A named third stage (checkpoints 12, 15, 16): stage 2's last is kept; older regulars go (unless best).
    await train(cfg(out, { train_data_dir: data2, max_train_steps: 16, checkpointing_steps: 3, checkpoints_total_limit: 1, resume_from_checkpoint: 'latest', allow_dataset_change: true, stage: 'polish' }), new Quiet(), { installSignalHandlers: false });
    expect(has(4) && has(10) && has(16)).toBe(true);
    expect(has(15)).toBe(best() === 15);
    expect(has(12)).toBe(best() === 12);
    expect(has(8)).toBe(best() === 8);
    expect(state(path.join(out, 'checkpoints', 'checkpoint-16')).stage).toBe('polish');
  }, 600000);
});

describe('validation images', () => {
  test('a few dozen steps with validation every 10 steps write decodable, non-constant PNGs and a labelled grid', async () => {
    const sharp = (await import('sharp')).default;
    const out = path.join(tmp, 'val-img');
    const rep = new Quiet();
    await train(
      cfg(out, {
        max_train_steps: 24,
        checkpointing_steps: 12,
        validation_steps: 10,
        validation_prompt: ['a red circle on a white background', 'a blue square on a black background'],
        num_validation_images: 2,
        validation_num_inference_steps: 5,
        validation_scheduler: 'euler_a',
        validation_split: 0.2,
      }),
      rep,
      { installSignalHandlers: false },
    );
    expect(rep.validations.map((v) => v.step)).toEqual([10, 20, 24]);
    const dir = path.join(out, 'validation');
    for (const step of [10, 20, 24]) {
      const s = String(step).padStart(6, '0');
      for (const p of [0, 1])
        for (const i of [0, 1]) {
          const file = path.join(dir, `step${s}_prompt${p}_img${i}.png`);
          const { data, info } = await sharp(file).raw().toBuffer({ resolveWithObject: true });
          expect([info.width, info.height, info.channels]).toEqual([32, 32, 3]);
          expect(Math.max(...data) - Math.min(...data)).toBeGreaterThan(10);
        }
      const grid = await sharp(path.join(dir, `step${s}_grid.png`)).metadata();
      expect(grid.width).toBeGreaterThanOrEqual(2 * 128);
      expect(grid.height).toBeGreaterThan(2 * 128);
    }
    // The LoRA changes the pictures between validations (same seed, same prompts).
    const a = fs.readFileSync(path.join(dir, 'step000010_prompt0_img0.png'));
    const b = fs.readFileSync(path.join(dir, 'step000024_prompt0_img0.png'));
    expect(a.equals(b)).toBe(false);
    // Each validation carries val_loss and the grid for TensorBoard.
    for (const v of rep.validations) {
      expect(Number.isFinite(v.valLoss)).toBe(true);
      expect(v.pngs[0].tag).toBe('validation/grid');
      expect(v.images).toHaveLength(4);
    }
  }, 600000);
});
