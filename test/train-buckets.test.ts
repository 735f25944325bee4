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
import { makeDemoData } from '../src/data/demo-data';

const root = path.resolve(__dirname, '..');
const cli = path.join(root, 'dist', 'cli.js');
const model = path.join(__dirname, 'fixtures', 'models', 'tiny');
const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-buckets-'));
const data = path.join(tmp, 'data');
const masks = path.join(tmp, 'masks');
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

const STEPS = 8;
const BUCKET_FLAGS = ['--enable-bucket', '--bucket-reso-steps', '8', '--min-bucket-reso', '16', '--max-bucket-reso', '64'];
function args(out: string, resume: boolean, extra: string[] = BUCKET_FLAGS): string[] {
  return [
    cli,
    '--pretrained-model-name-or-path', model,
    '--train-data-dir', data,
    '--output-dir', out,
    '--device', 'cpu',
    '--resolution', '32',
    '--train-batch-size', '2',
    '--gradient-accumulation-steps', '2',
    '--max-train-steps', String(STEPS),
    '--learning-rate', '1e-3',
    '--lr-warmup-steps', '1',
    '--checkpointing-steps', '1',
    '--checkpoints-total-limit', '2',
    '--rank', '4',
    '--random-flip',
    '--seed', '5',
    '--masked-loss', '--mask-dir', masks,
    '--shuffle-caption', '--keep-tokens', '1',
    ...extra,
    ...(resume ? ['--resume-from-checkpoint', 'latest'] : []),
  ];
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
