/**
 * Issue 17 end to end with the real CLI and the tiny model: a folder of mixed aspect ratios trained with
 * --enable-bucket (plus masks from --mask-dir and caption tag shuffling), killed with SIGKILL twice and resumed,
 * must end bit-identical to an uninterrupted run; a resume with other bucket settings is refused naming them.
 */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import sharp from 'sharp';

import { CheckpointManager } from '../src/checkpoint/manager';
import { exportCheckpoint } from '../src/export/lora-export';
import { makeDemoData } from '../src/data/demo-data';
import { loadDataset } from '../src/data/dataset';
import { findMasks } from '../src/data/masks';
import { parseTrainConfig } from '../src/config';
import { planData } from '../src/data/plan';
import { bucketReport } from '../src/commands/test-setup';
import { tinyCliArgs, TINY_MODEL } from './helpers/tiny-run';

const model = TINY_MODEL;
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-buckets-'));
const data = path.join(tmp, 'data');
const masks = path.join(tmp, 'masks');
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

const STEPS = 8;
const BUCKET_FLAGS = ['--enable-bucket', '--bucket-reso-steps', '8', '--min-bucket-reso', '16', '--max-bucket-reso', '64'];
function args(out: string, resume: boolean, extra: string[] = BUCKET_FLAGS): string[] {
  const flags = {
    train_batch_size: 2, gradient_accumulation_steps: 2, max_train_steps: STEPS, learning_rate: 1e-3, lr_warmup_steps: 1,
    checkpointing_steps: 1, checkpoints_total_limit: 2, rank: 4, random_flip: true, seed: 5,
    masked_loss: true, mask_dir: masks, shuffle_caption: true, keep_tokens: 1, save_format: ['diffusers', 'kohya'],
  };
  return tinyCliArgs(out, data, flags, [...extra, ...(resume ? ['--resume-from-checkpoint', 'latest'] : [])]);
}

function runToEnd(out: string, resume: boolean, extra?: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, args(out, resume, extra), { encoding: 'utf8', timeout: 240000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function runAndKill(out: string, resume: boolean, line: RegExp): Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, args(out, resume), { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    child.stdout.on('data', (d: Buffer) => {
      stdout += d.toString();
      if (line.test(stdout)) child.kill('SIGKILL');
    });
    child.stderr.on('data', () => {});
    child.on('exit', (code, signal) => resolve({ code, signal, stdout }));
  });
}

let reference: Buffer;
let referenceLog: string;
beforeAll(async () => {
  // 7 images in 4 aspect ratios (1:1, 2:1, 1:2, 1:3), the 1:3 one alone in its bucket.
  const demo = await makeDemoData(data, { count: 7, size: 40, seed: 2, layout: 'txt' });
  const sizes = [[40, 40], [64, 32], [32, 64], [64, 32], [40, 40], [32, 64], [20, 60]];
  fs.mkdirSync(masks);
  await Promise.all(
    demo.items.map(async (it, i) => {
      const file = path.join(demo.root, it.file);
      const [w, h] = sizes[i];
      fs.writeFileSync(file, await sharp(file).resize(w, h, { fit: 'fill' }).png().toBuffer());
      fs.writeFileSync(file.replace(/\.png$/, '.txt'), `shape${i}, a ${it.color} ${it.shape}, on ${it.background}, tag a, tag b`);
      // Masks for some images: the left half weighs fully, the right half not at all.
      if (i % 2 === 0) {
        const raw = Buffer.alloc(w * h);
        for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) raw[y * w + x] = x < w / 2 ? 255 : 0;
        await sharp(raw, { raw: { width: w, height: h, channels: 1 } }).png().toFile(path.join(masks, it.file));
      }
    }),
  );
  const out = path.join(tmp, 'reference');
  const r = runToEnd(out, false);
  if (r.status !== 0) throw new Error(`reference run failed (${r.status}):\n${r.stderr}\n${r.stdout.slice(-3000)}`);
  reference = fs.readFileSync(path.join(out, 'pytorch_lora_weights.safetensors'));
  referenceLog = r.stdout;
}, 300000);

test('a mixed-aspect run logs its bucket table and its masks', () => {
  expect(referenceLog).toMatch(/--enable-bucket: 4 buckets/);
  expect(referenceLog).toMatch(/24x40 \(aspect 0\.60\): 2 images/);
  expect(referenceLog).toMatch(/32x32 \(aspect 1\.00\): 2 images/);
  expect(referenceLog).toMatch(/16x48 \(aspect 0\.33\): 1 image\b/);
  expect(referenceLog).toMatch(/40x24 \(aspect 1\.67\): 2 images/);
  expect(referenceLog).toMatch(/--masked-loss: 4 of 7 training images have a mask/);
  // The kohya file carries the table as sd-scripts writes it.
  const buf = fs.readFileSync(path.join(tmp, 'reference', 'lora_kohya.safetensors'));
  const meta = (JSON.parse(buf.subarray(8, 8 + Number(buf.readBigUInt64LE(0))).toString('utf8')) as { __metadata__: Record<string, string> }).__metadata__;
  expect(meta.ss_enable_bucket).toBe('True');
  expect(meta.ss_min_bucket_reso).toBe('16');
  expect(meta.ss_max_bucket_reso).toBe('64');
  expect(meta.ss_shuffle_caption).toBe('True');
  expect(meta.ss_keep_tokens).toBe('1');
  expect(meta.ss_resolution).toBe('(32, 32)');
  const info = JSON.parse(meta.ss_bucket_info) as { buckets: Record<string, { resolution: number[]; count: number }>; mean_img_ar_error: number };
  expect(Object.values(info.buckets)).toEqual([
    { resolution: [16, 48], count: 1 },
    { resolution: [24, 40], count: 2 },
    { resolution: [32, 32], count: 2 },
    { resolution: [40, 24], count: 2 },
  ]);
  expect(info.mean_img_ar_error).toBeGreaterThan(0);
});

test('`checkpoints export --format kohya` of a bucketed checkpoint writes the same ss_bucket_info as the run', async () => {
  const latest = await new CheckpointManager(path.join(tmp, 'reference')).latest();
  const out = path.join(tmp, 'reexport');
  const r = await exportCheckpoint(latest!.path, { formats: ['kohya'], out });
  const file = r.files.find((f) => f.endsWith('.safetensors'))!;
  const header = (f: string) => {
    const buf = fs.readFileSync(f);
    return (JSON.parse(buf.subarray(8, 8 + Number(buf.readBigUInt64LE(0))).toString('utf8')) as { __metadata__: Record<string, string> }).__metadata__;
  };
  const fromRun = header(path.join(tmp, 'reference', 'lora_kohya.safetensors'));
  expect(fromRun.ss_bucket_info).not.toBe('null');
  expect(header(file).ss_bucket_info).toBe(fromRun.ss_bucket_info);
});

test('SIGKILL twice in a bucketed, masked run and resumed: final weights bit-identical to an uninterrupted run', async () => {
  const out = path.join(tmp, 'killed');
  const a = await runAndKill(out, false, /"step":3,/);
  expect(a.signal).toBe('SIGKILL');
  const b = await runAndKill(out, true, /"step":6,/);
  expect(b.signal).toBe('SIGKILL');
  const resumedAt = (log: string): number => Number(/resumed from .* at step (\d+)/.exec(log)?.[1] ?? -1);
  expect(resumedAt(b.stdout)).toBeGreaterThanOrEqual(2);
  const mgr = new CheckpointManager(out);
  for (const e of await mgr.list('quick')) if (e.valid) expect((await mgr.verifyEntry(e.name)).valid).toBe(true);
  const last = runToEnd(out, true);
  expect(last.status).toBe(0);
  expect(resumedAt(last.stdout)).toBeGreaterThan(resumedAt(b.stdout));
  expect(resumedAt(last.stdout)).toBeLessThan(STEPS);
  expect(fs.readFileSync(path.join(out, 'pytorch_lora_weights.safetensors')).equals(reference)).toBe(true);

  // Resuming with other bucket settings, or without buckets, is refused naming what differs.
  const other = runToEnd(out, true, ['--enable-bucket', '--bucket-reso-steps', '4', '--min-bucket-reso', '16', '--max-bucket-reso', '64', '--max-train-steps', '10']);
  expect(other.status).not.toBe(0);
  expect(other.stdout + other.stderr).toMatch(/the aspect-ratio buckets differ \(--bucket-reso-steps was 8, now 4\)/);
  const none = runToEnd(out, true, ['--max-train-steps', '10']);
  expect(none.status).not.toBe(0);
  expect(none.stdout + none.stderr).toMatch(/--enable-bucket was true, now false/);
}, 600000);

test('--cache-latents with buckets: one encode per image at its bucket size, val_loss per bucket, kill -9 resume bit-exact', async () => {
  const flags = [...BUCKET_FLAGS, '--cache-latents', '--center-crop', '--validation-split', '0.3', '--validation-steps', '4'];
  const cached = (out: string, resume: boolean) => [...args(out, resume, flags)].filter((a) => a !== '--random-flip');
  const run = (out: string, resume: boolean) => spawnSync(process.execPath, cached(out, resume), { encoding: 'utf8', timeout: 240000 });
  const ref = run(path.join(tmp, 'cached-ref'), false);
  expect(ref.status).toBe(0);
  expect(ref.stdout).toMatch(/--cache-latents: encoded 5 images once/);
  expect(ref.stdout).toMatch(/val_loss: 2 held-out images encoded/);
  expect(ref.stdout).toMatch(/validation at step 4: val_loss \d/);
  const out = path.join(tmp, 'cached-killed');
  const killed = await new Promise<NodeJS.Signals | null>((resolve) => {
    const child = spawn(process.execPath, cached(out, false), { stdio: ['ignore', 'pipe', 'ignore'] });
    let s = '';
    child.stdout.on('data', (d: Buffer) => {
      s += d.toString();
      if (/"step":5,/.test(s)) child.kill('SIGKILL');
    });
    child.on('exit', (_c, sig) => resolve(sig));
  });
  expect(killed).toBe('SIGKILL');
  expect(run(out, true).status).toBe(0);
  const a = fs.readFileSync(path.join(tmp, 'cached-ref', 'pytorch_lora_weights.safetensors'));
  expect(fs.readFileSync(path.join(out, 'pytorch_lora_weights.safetensors')).equals(a)).toBe(true);
}, 600000);

describe('bad input names the file or flag', () => {
  const base = { pretrained_model_name_or_path: model, train_data_dir: data };

  test('flags that only work together', () => {
    const bad = (o: Record<string, unknown>) => () => parseTrainConfig({ ...base, ...o });
    expect(bad({ keep_tokens: 2 })).toThrow(/--keep-tokens: .*add --shuffle-caption/);
    expect(bad({ keep_tokens_separator: '|||' })).toThrow(/--keep-tokens-separator: .*add --shuffle-caption/);
    expect(bad({ min_bucket_reso: 128 })).toThrow(/--min-bucket-reso: only applies to aspect-ratio buckets: add --enable-bucket/);
    expect(bad({ enable_bucket: true, min_bucket_reso: 512, max_bucket_reso: 256 })).toThrow(/--min-bucket-reso: 512 is larger than --max-bucket-reso 256/);
    expect(bad({ masked_loss: true })).toThrow(/--masked-loss: needs masks: add --alpha-mask .* or --mask-dir/);
    expect(bad({ alpha_mask: true })).toThrow(/--alpha-mask: only weights the loss with --masked-loss/);
    expect(bad({ masked_loss: true, alpha_mask: true, mask_dir: masks })).toThrow(/use --alpha-mask or --mask-dir, not both/);
  });

  test('a bucket step the model cannot take; images too small for the smallest bucket', async () => {
    const ds = await loadDataset(data);
    const quiet = { info: () => undefined, warn: () => undefined };
    const cfg = (o: Record<string, unknown>) => parseTrainConfig({ ...base, resolution: 32, enable_bucket: true, min_bucket_reso: 16, max_bucket_reso: 64, ...o });
    await expect(planData(cfg({ bucket_reso_steps: 6 }), quiet, model, { dataset: ds })).rejects.toThrow(/--bucket-reso-steps 6 is not a multiple of 4, the pixel stride this model's VAE and UNet need/);
    // No upscaling (larger images are scaled down to the area 32², then rounded down to the step) and a minimum side
    // of 32: all but the two square images are too small.
    const small = cfg({ bucket_reso_steps: 8, bucket_no_upscale: true, min_bucket_reso: 32 });
    await expect(planData(small, quiet, model, { dataset: ds })).rejects.toThrow(
      /5 training image\(s\) are too small for the smallest bucket:\n {2}001_\w+\.png: 64x32 would need a 32x16 bucket, under --min-bucket-reso 32 \(--bucket-no-upscale never enlarges it\)[\s\S]*--skip-bad-images/,
    );
    const warned: string[] = [];
    const d = { dataset: ds };
    const plan = await planData(parseTrainConfig({ ...base, resolution: 32, enable_bucket: true, bucket_reso_steps: 8, bucket_no_upscale: true, min_bucket_reso: 24, max_bucket_reso: 64, skip_bad_images: true }), { info: () => undefined, warn: (m) => warned.push(m) }, model, d);
    expect(warned.length).toBe(5);
    expect(warned.join('\n')).toMatch(/--skip-bad-images: left out 006_\w+\.png: 20x60 would need a \d+x\d+ bucket, under --min-bucket-reso 24/);
    expect(d.dataset.items.map((i) => [i.width, i.height])).toEqual([[40, 40], [40, 40]]);
    expect(plan.table!.buckets).toEqual([{ width: 32, height: 32, items: [0, 1] }]);
  });

  test('masks: one without an image, one of another size', async () => {
    const ds = await loadDataset(data);
    const dir = path.join(tmp, 'bad-masks');
    fs.cpSync(masks, dir, { recursive: true });
    fs.writeFileSync(path.join(dir, 'nobody.png'), fs.readFileSync(path.join(masks, fs.readdirSync(masks)[0])));
    await expect(findMasks(dir, ds)).rejects.toThrow(/holds 1 mask\(s\) with no training image of the same name: nobody.png/);
    fs.rmSync(path.join(dir, 'nobody.png'));
    const first = fs.readdirSync(dir)[0];
    await sharp({ create: { width: 9, height: 9, channels: 3, background: { r: 0, g: 0, b: 0 } } }).png().toFile(path.join(dir, first));
    await expect(findMasks(dir, ds)).rejects.toThrow(new RegExp(`${first}: is 9x9 but its image ${first} is 40x40\nFix: make each mask the size of its image`));
  });

  test('test-setup: the bucket table and images upscaled more than 2x', async () => {
    const ds = await loadDataset(data);
    const cfg = parseTrainConfig({ ...base, resolution: 96, enable_bucket: true, bucket_reso_steps: 8, min_bucket_reso: 16, max_bucket_reso: 192 });
    const r = await bucketReport(cfg, ds);
    expect(r.result.ok).toBe(true);
    expect(r.result.detail).toMatch(/buckets \(bucket size: images\)/);
    expect(r.result.detail).toMatch(/upscaled more than 2x to cover their bucket/);
    expect(r.result.detail).toMatch(/000_\w+\.png: 40x40 -> 96x96 for 96x96 \(2\.4x\)/);
  });

  test('--caption-extension reads kohya-style .caption files', async () => {
    const dir = path.join(tmp, 'caption-ext');
    fs.mkdirSync(dir);
    await sharp({ create: { width: 40, height: 40, channels: 3, background: { r: 1, g: 2, b: 3 } } }).png().toFile(path.join(dir, 'a.png'));
    fs.writeFileSync(path.join(dir, 'a.caption'), 'sks, thing');
    const ds = await loadDataset(dir, { captionExtension: '.caption' });
    expect(ds.items.map((i) => i.captions)).toEqual([['sks, thing']]);
    await expect(loadDataset(dir)).rejects.toThrow(/no caption/);
  });
});

test('data parallel: 2 processes x batch 2 match 1 process x batch 4 on buckets (each rank takes its rows of the global batch)', async () => {
  // Buckets of 4 images each (the 6 images of 3 aspect ratios, twice), so no global batch is short (a short one is
  // padded on several processes only).
  const even = path.join(tmp, 'even');
  fs.mkdirSync(even);
  for (const f of fs.readdirSync(data).filter((n) => !n.startsWith('006_'))) {
    fs.copyFileSync(path.join(data, f), path.join(even, f));
    fs.copyFileSync(path.join(data, f), path.join(even, `copy_${f}`));
  }
  const common = (out: string, batch: number, procs: number) =>
    tinyCliArgs(out, even, {
      train_batch_size: batch, gradient_accumulation_steps: 1, num_processes: procs, max_train_steps: 6, learning_rate: 1e-3,
      lr_warmup_steps: 1, checkpointing_steps: 3, rank: 4, random_flip: true, seed: 5, dist_timeout: 60,
    }, BUCKET_FLAGS);
  const env = { ...process.env, TRAIN_LORA_KILL_GRACE_MS: '5000' };
  const two = spawnSync(process.execPath, common(path.join(tmp, 'dp2'), 2, 2), { encoding: 'utf8', timeout: 240000, env });
  expect(two.status).toBe(0);
  const one = spawnSync(process.execPath, common(path.join(tmp, 'dp1'), 4, 1), { encoding: 'utf8', timeout: 240000, env });
  expect(one.status).toBe(0);
  const metrics = (out: string) =>
    fs.readFileSync(path.join(tmp, out, 'logs', 'metrics.jsonl'), 'utf8').split('\n').filter(Boolean).map((l) => JSON.parse(l) as { step: number; loss: number; grad_norm: number });
  const a = metrics('dp2');
  const b = metrics('dp1');
  expect(a.map((m) => m.step)).toEqual([1, 2, 3, 4, 5, 6]);
  expect(a.map((m) => m.step)).toEqual(b.map((m) => m.step));
  for (let i = 0; i < a.length; i++) {
    expect(Math.abs(a[i].loss - b[i].loss) / Math.abs(b[i].loss)).toBeLessThan(1e-4);
    expect(Math.abs(a[i].grad_norm - b[i].grad_norm) / Math.abs(b[i].grad_norm)).toBeLessThan(1e-4);
  }
}, 600000);
