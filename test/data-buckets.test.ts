/**
 * Aspect-ratio buckets (src/data/buckets.ts), caption tag shuffling (src/data/captions.ts) and masks
 * (src/data/images.ts maskToLatent, the mask path of processImage). Bucket assignment is checked against kohya's
 * sd-scripts run on a table of sizes (test/fixtures/buckets, scripts/golden/make_bucket_goldens.py).
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import sharp from 'sharp';

import { assignBuckets, bucketInfo, BucketOrder, type BucketSettings, bucketSettingsProblems, makeBucketResolutions, modelPixelStride, selectBucket } from '../src/data/buckets';
import { shuffleTags, trainingCaption } from '../src/data/captions';
import { maskToLatent, processImage } from '../src/data/images';
import { derive } from '../src/data/prng';
import { type KohyaTrainingInfo, kohyaMetadata } from '../src/export/kohya';
import { parsePromptLine, validationPromptSpecs } from '../src/train/validation';
import { padToSameSize } from '../src/train/validation-images';

interface KohyaCase {
  size: [number, number];
  bucket?: [number, number];
  resized?: [number, number];
  ar_error?: number;
  error?: boolean;
}
interface KohyaSet {
  settings: { resolution: number; min: number; max: number; step: number; no_upscale: boolean };
  resolutions: Array<[number, number]>;
  cases: KohyaCase[];
}
const golden = JSON.parse(fs.readFileSync(path.join(__dirname, 'fixtures', 'buckets', 'kohya_buckets.json'), 'utf8')) as KohyaSet[];
const settingsOf = (s: KohyaSet['settings']): BucketSettings => ({ resolution: s.resolution, minReso: s.min, maxReso: s.max, step: s.step, noUpscale: s.no_upscale });

describe('bucket assignment = kohya sd-scripts', () => {
  test.each(golden.map((g) => [JSON.stringify(g.settings), g] as const))('%s', (_name, g) => {
    const s = settingsOf(g.settings);
    const predefined = makeBucketResolutions(s.resolution, s.minReso, s.maxReso, s.step);
    if (!s.noUpscale) expect(predefined.map((r) => [r.width, r.height])).toEqual(g.resolutions);
    for (const c of g.cases) {
      const got = selectBucket(c.size[0], c.size[1], s, predefined);
      if (c.error) {
        expect(Math.min(got.width, got.height)).toBe(0); // kohya divides by zero there; we report the image as too small
        continue;
      }
      expect({ size: c.size, bucket: [got.width, got.height], resized: [got.resizedWidth, got.resizedHeight] }).toEqual({ size: c.size, bucket: c.bucket, resized: c.resized });
      expect(got.arError).toBeCloseTo(c.ar_error!, 12);
      // The resize covers the bucket, so the crop never runs out of pixels.
      expect(got.resizedWidth).toBeGreaterThanOrEqual(got.width);
      expect(got.resizedHeight).toBeGreaterThanOrEqual(got.height);
    }
  });

  test('SD 1.5 at 512: every bucket within the area and the sides, a multiple of 64', () => {
    const r = makeBucketResolutions(512, 256, 1024, 64);
    expect(r.length).toBeGreaterThan(10);
    for (const b of r) {
      expect(b.width * b.height).toBeLessThanOrEqual(512 * 512);
      expect(b.width % 64).toBe(0);
      expect(b.height % 64).toBe(0);
      expect(Math.min(b.width, b.height)).toBeGreaterThanOrEqual(256);
    }
    expect(r).toContainEqual({ width: 512, height: 512 });
  });

  test('too small images (no upscale, a side under the minimum) are listed, not bucketed', () => {
    const s: BucketSettings = { resolution: 512, minReso: 256, maxReso: 1024, step: 64, noUpscale: true };
    const { table, tooSmall } = assignBuckets([{ width: 600, height: 600 }, { width: 200, height: 900 }, { width: 40, height: 30 }], s);
    expect(tooSmall.map((t) => t.index)).toEqual([1, 2]);
    expect(tooSmall[0].reason).toMatch(/--min-bucket-reso 256/);
    expect(table.itemBucket).toEqual([0, -1, -1]);
    expect(table.buckets).toEqual([{ width: 512, height: 512, items: [0] }]);
  });

  test('settings problems name the flag', () => {
    const s: BucketSettings = { resolution: 512, minReso: 1024, maxReso: 512, step: 32, noUpscale: false };
    const p = bucketSettingsProblems(s, 64).join('\n');
    expect(p).toMatch(/--min-bucket-reso 1024 is larger than --max-bucket-reso 512/);
    expect(p).toMatch(/--bucket-reso-steps 32 is not a multiple of 64/);
    expect(bucketSettingsProblems({ ...s, minReso: 256, step: 64 }, 64)).toEqual([]);
  });

  test('the pixel stride comes from the VAE and UNet configs', () => {
    expect(modelPixelStride(path.join(__dirname, 'fixtures', 'models', 'tiny'))).toBe(4);
    // SD 1.5's configs: a VAE of 4 blocks (8x) and a UNet of 4 down blocks (8x in latent space).
    const sd = fs.mkdtempSync(path.join(os.tmpdir(), 'sd15-cfg-'));
    fs.mkdirSync(path.join(sd, 'vae'));
    fs.mkdirSync(path.join(sd, 'unet'));
    fs.writeFileSync(path.join(sd, 'vae', 'config.json'), JSON.stringify({ block_out_channels: [128, 256, 512, 512] }));
    fs.writeFileSync(path.join(sd, 'unet', 'config.json'), JSON.stringify({ down_block_types: ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'] }));
    expect(modelPixelStride(sd)).toBe(64);
    fs.rmSync(sd, { recursive: true });
  });

  test('ss_bucket_info has kohya\'s shape', () => {
    const s: BucketSettings = { resolution: 512, minReso: 256, maxReso: 1024, step: 64, noUpscale: false };
    const { table } = assignBuckets([{ width: 512, height: 512 }, { width: 640, height: 480 }, { width: 1000, height: 1000 }], s);
    const info = bucketInfo(table);
    expect(Object.keys(info.buckets)).toEqual(['0', '1']);
    expect(info.buckets['1']).toEqual({ resolution: [576, 448], count: 1 });
    expect(info.buckets['0']).toEqual({ resolution: [512, 512], count: 2 });
  });
});

describe('BucketOrder: batch composition and resume', () => {
  // 23 images in buckets of 9, 7, 5, 1, 1 (one image alone: never dropped).
  const sizes = [
    ...Array(9).fill({ width: 40, height: 40 }),
    ...Array(7).fill({ width: 64, height: 32 }),
    ...Array(5).fill({ width: 32, height: 64 }),
    { width: 60, height: 20 },
    { width: 20, height: 60 },
  ];
  const s: BucketSettings = { resolution: 32, minReso: 8, maxReso: 96, step: 4, noUpscale: false };
  const { table } = assignBuckets(sizes, s);

  test('every image once per epoch, each batch from one bucket, small buckets train as smaller batches', () => {
    expect(table.buckets.map((b) => b.items.length).sort((a, b) => a - b)).toEqual([1, 1, 5, 7, 9]);
    const order = new BucketOrder(table, { seed: 3, batchSize: 4 });
    for (let epoch = 0; epoch < 3; epoch++) {
      const seen: number[] = [];
      let last = false;
      let batches = 0;
      while (!last) {
        const b = order.nextBatch(4);
        expect(b.epoch).toBe(epoch);
        expect(new Set(b.indices.map((i) => table.itemBucket[i])).size).toBe(1);
        expect(b.indices.length).toBeLessThanOrEqual(4);
        expect(b.indices.length).toBeGreaterThan(0);
        seen.push(...b.indices);
        last = b.lastInEpoch;
        batches++;
      }
      expect(seen.sort((a, b) => a - b)).toEqual(sizes.map((_, i) => i));
      expect(batches).toBe(order.batchesPerEpoch(4)); // 3 + 2 + 2 + 1 + 1
      expect(batches).toBe(9);
    }
  });

  test('the order is seeded and differs between epochs and seeds', () => {
    const a = new BucketOrder(table, { seed: 3 }).plan(0, 4);
    expect(new BucketOrder(table, { seed: 3 }).plan(0, 4)).toEqual(a);
    expect(new BucketOrder(table, { seed: 3 }).plan(1, 4)).not.toEqual(a);
    expect(new BucketOrder(table, { seed: 4 }).plan(0, 4)).not.toEqual(a);
  });

  test('resuming from any saved cursor continues exactly', () => {
    const full = new BucketOrder(table, { seed: 9, batchSize: 3 });
    const ref = Array.from({ length: 25 }, () => full.nextBatch(3).indices);
    for (const cut of [1, 5, 9, 12, 20]) {
      const o = new BucketOrder(table, { seed: 9, batchSize: 3 });
      for (let i = 0; i < cut; i++) o.nextBatch(3);
      const saved = JSON.parse(JSON.stringify(o.state()));
      expect(saved.bucketKey).toMatch(/^[0-9a-f]{16}$/);
      expect(saved.globalBatch).toBe(3);
      expect(() => BucketOrder.checkResume(saved, table, 3)).not.toThrow();
      const r = new BucketOrder(table, { seed: 9, batchSize: 3, cursor: { epoch: saved.epoch, position: saved.position } });
      const rest = Array.from({ length: 25 - cut }, () => r.nextBatch(3).indices);
      expect(rest).toEqual(ref.slice(cut));
    }
  });

  test('several processes: each rank takes its rows of the same global batch; a short one is padded from its bucket', () => {
    const world = 3;
    const one = new BucketOrder(table, { seed: 5 });
    const ranks = Array.from({ length: world }, (_, r) => new BucketOrder(table, { seed: 5, rank: r, worldSize: world }));
    const plan = one.plan(0, 2 * world);
    for (const g of plan) {
      const rows = ranks.map((o) => o.nextBatch(2));
      const all = rows.flatMap((b) => b.indices);
      expect(all.length).toBe(2 * world);
      expect(all.slice(0, g.items.length)).toEqual(g.items);
      // padding repeats images of the same bucket only
      for (const i of all) expect(table.itemBucket[i]).toBe(g.bucket);
    }
    expect(ranks[0].nextBatch(2).epoch).toBe(1);
  });

  test('a resume that changes the table or the global batch mid-epoch is refused, naming what differs', () => {
    const o = new BucketOrder(table, { seed: 9, batchSize: 3 });
    o.nextBatch(3);
    const saved = o.state();
    expect(() => BucketOrder.checkResume(saved, table, 4)).toThrow(/global batches of 3; now 4/);
    const other = assignBuckets(sizes, { ...s, step: 8 }).table;
    expect(() => BucketOrder.checkResume(saved, other, 3)).toThrow(/bucket table differs/);
    expect(() => BucketOrder.checkResume({ ...saved, bucketKey: undefined }, table, 3)).toThrow(/without --enable-bucket/);
    // At an epoch boundary both may change.
    expect(() => BucketOrder.checkResume({ ...saved, position: saved.numSamples }, other, 4)).not.toThrow();
  });
});

describe('caption tag shuffling (kohya process_caption)', () => {
  const cap = 'sks dog, red collar, grass, sunny, park';
  test('the first N tags stay in place; the rest is a seeded permutation that changes with the epoch', () => {
    const a = shuffleTags(cap, 1, 0, 7, { keepTokens: 2 });
    const tags = a.split(', ');
    expect(tags.slice(0, 2)).toEqual(['sks dog', 'red collar']);
    expect([...tags].sort()).toEqual(cap.split(', ').sort());
    expect(shuffleTags(cap, 1, 0, 7, { keepTokens: 2 })).toBe(a);
    const variants = new Set(Array.from({ length: 12 }, (_, e) => shuffleTags(cap, 1, e, 7, { keepTokens: 2 })));
    expect(variants.size).toBeGreaterThan(2);
    for (const v of variants) expect(v.startsWith('sks dog, red collar, ')).toBe(true);
  });

  test('keep-tokens separator: the part before stays first, after a second separator stays last', () => {
    const c = 'sks, dog ||| a, b, c, d ||| masterpiece, best';
    for (let e = 0; e < 8; e++) {
      const t = shuffleTags(c, 2, e, 0, { keepTokensSeparator: '|||' }).split(', ');
      expect(t.slice(0, 2)).toEqual(['sks', 'dog']);
      expect(t.slice(-2)).toEqual(['masterpiece', 'best']);
      expect(t.slice(2, 6).sort()).toEqual(['a', 'b', 'c', 'd']);
    }
  });

  test('dropout first: a dropped caption is empty; otherwise variant choice then shuffle', () => {
    const o = { dropoutRate: 0.5, shuffle: true, keepTokens: 1 };
    let dropped = 0;
    for (let i = 0; i < 200; i++) {
      const c = trainingCaption([cap], 3, 0, i, o);
      if (c === '') dropped++;
      else expect(c.startsWith('sks dog, ')).toBe(true);
    }
    expect(dropped).toBeGreaterThan(60);
    expect(dropped).toBeLessThan(140);
    expect(trainingCaption([cap], 3, 0, 1, { shuffle: false })).toBe(cap);
  });
});

describe('masks', () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'masks-'));
  afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

  test('maskToLatent is the mean of each stride x stride block of value / 255 (hand computed)', () => {
    // 4x2 mask, stride 2 -> 2x1 latent
    const m = new Uint8Array([255, 0, 255, 255, 255, 0, 255, 255]);
    const l = maskToLatent(m, 4, 2, 2);
    expect(Array.from(l)).toEqual([Math.fround(0.5), 1]);
    expect(() => maskToLatent(m, 4, 2, 3)).toThrow(/multiple of the latent stride/);
  });

  test('the alpha mask follows the image\'s bucket resize, random crop and flip exactly', async () => {
    // RGB = alpha = a gradient pattern: after the same geometry, the mask must equal the red channel byte for byte.
    const w = 70;
    const h = 45;
    const raw = Buffer.alloc(w * h * 4);
    const rng = derive(1, 2);
    for (let i = 0; i < w * h; i++) {
      const v = (i * 37 + rng.int(40)) % 256;
      raw[4 * i] = raw[4 * i + 1] = raw[4 * i + 2] = raw[4 * i + 3] = v;
    }
    const file = path.join(tmp, 'a.png');
    await sharp(raw, { raw: { width: w, height: h, channels: 4 } }).png().toFile(file);
    for (const [seed, interpolation] of [[1, 'lanczos'], [2, 'bilinear'], [3, 'nearest'], [4, 'area']] as const) {
      for (const bucket of [{ width: 48, height: 32, resizedWidth: 50, resizedHeight: 32 }, { width: 64, height: 40, resizedWidth: 70, resizedHeight: 45 }, { width: 96, height: 60, resizedWidth: 96, resizedHeight: 62 }]) {
        const r = await processImage(file, { resolution: 32, bucket, randomFlip: true, interpolation, mask: 'alpha' }, derive(seed, 9));
        expect([r.width, r.height]).toEqual([bucket.width, bucket.height]);
        const red = Array.from(r.pixels.subarray(0, bucket.width * bucket.height), (v) => Math.round(((v / 2 + 0.5) * 255)));
        expect(Array.from(r.mask!)).toEqual(red);
      }
    }
  });

  test('an image without alpha has no mask (full weight); a mask file of another size is refused', async () => {
    const file = path.join(tmp, 'b.png');
    await sharp({ create: { width: 40, height: 40, channels: 3, background: { r: 9, g: 9, b: 9 } } }).png().toFile(file);
    const r = await processImage(file, { resolution: 32, centerCrop: true, mask: 'alpha' });
    expect(Array.from(new Set(r.mask!))).toEqual([255]);
    const mask = path.join(tmp, 'b-mask.png');
    await sharp({ create: { width: 30, height: 40, channels: 3, background: { r: 0, g: 0, b: 0 } } }).png().toFile(mask);
    await expect(processImage(file, { resolution: 32, centerCrop: true, mask })).rejects.toThrow(/b-mask.png is 30x40 but its image is 40x40/);
  });
});

describe('validation prompts file with kohya\'s per-line options', () => {
  test('--w --h --d --s --l --n are read; the rest falls back to the flags', () => {
    expect(parsePromptLine('a red shoe on a table --w 640 --h 384 --d 7 --s 20 --l 5.5 --n blurry, low quality', 'x')).toEqual({
      prompt: 'a red shoe on a table',
      width: 640,
      height: 384,
      seed: 7,
      steps: 20,
      guidance: 5.5,
      negative: 'blurry, low quality',
    });
    expect(parsePromptLine('just a prompt', 'x')).toEqual({ prompt: 'just a prompt' });
    expect(parsePromptLine('upper case --W 64 --H 96', 'x')).toEqual({ prompt: 'upper case', width: 64, height: 96 });
  });

  test('bad options are refused naming the line', () => {
    expect(() => parsePromptLine('a --w 500', 'prompts.txt line 3')).toThrow(/prompts.txt line 3: --w 500 is not a multiple of 8/);
    expect(() => parsePromptLine('a --ss euler', 'prompts.txt line 4')).toThrow(/line 4: unknown option --ss/);
    expect(() => parsePromptLine('a --s many', 'l')).toThrow(/--s needs a whole number/);
    expect(() => parsePromptLine('a --s 0', 'l')).toThrow(/--s 0 is outside 1..1000/);
    expect(() => parsePromptLine('a --l x', 'l')).toThrow(/--l needs a number/);
  });

  test('the file: comments and blank lines skipped, each line parsed with its number', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'prompts-'));
    const f = path.join(dir, 'p.txt');
    fs.writeFileSync(f, '# comment\n\na cat --w 64\na dog --h 32 --n ugly\n');
    expect(validationPromptSpecs({ validation_prompt: ['cli prompt'], validation_prompts_file: f })).toEqual([
      { prompt: 'cli prompt' },
      { prompt: 'a cat', width: 64 },
      { prompt: 'a dog', height: 32, negative: 'ugly' },
    ]);
    fs.writeFileSync(f, 'ok\nbad --q 1\n');
    expect(() => validationPromptSpecs({ validation_prompt: [], validation_prompts_file: f })).toThrow(/p.txt line 2: unknown option --q/);
    fs.rmSync(dir, { recursive: true });
  });

  test('grid cells of other sizes are centred on white', () => {
    const a = { data: new Uint8Array(2 * 1 * 3).fill(7), width: 2, height: 1 };
    const b = { data: new Uint8Array(1 * 3 * 3).fill(9), width: 1, height: 3 };
    const [pa, pb] = padToSameSize([a, b]);
    expect([pa.width, pa.height, pb.width, pb.height]).toEqual([2, 3, 2, 3]);
    expect(Array.from(pa.data)).toEqual([255, 255, 255, 255, 255, 255, 7, 7, 7, 7, 7, 7, 255, 255, 255, 255, 255, 255]);
    expect(Array.from(pb.data)).toEqual([9, 9, 9, 255, 255, 255, 9, 9, 9, 255, 255, 255, 9, 9, 9, 255, 255, 255]);
  });
});

describe('kohya metadata of a bucketed run', () => {
  const info: KohyaTrainingInfo = {
    rank: 4, alpha: 4, dropout: 0, steps: 10, epoch: 1, resolution: 512, numTrainImages: 7, learningRate: 1e-4, lrScheduler: 'constant',
    lrWarmupSteps: 0, maxTrainSteps: 10, seed: 1, mixedPrecision: 'no', trainBatchSize: 2, gradientAccumulationSteps: 1, gradientCheckpointing: false,
    cacheLatents: false, maxGradNorm: 1, noiseOffset: 0, adam: { beta1: 0.9, beta2: 0.999, weightDecay: 0.01, epsilon: 1e-8 }, trainingStartedAt: 1,
    trainingFinishedAt: 2, outputName: 'x', baseModel: '/m/sd15', textEncoderTrained: false, sessionId: 1,
  };
  test('bucket keys, the table, and batches per epoch counted per bucket', () => {
    const plain = kohyaMetadata(info);
    expect([plain.ss_enable_bucket, plain.ss_bucket_info, plain.ss_min_bucket_reso, plain.ss_num_batches_per_epoch]).toEqual(['False', 'null', 'None', '4']);
    const table = { buckets: { '0': { resolution: [384, 640] as [number, number], count: 3 }, '1': { resolution: [512, 512] as [number, number], count: 1 }, '2': { resolution: [640, 384] as [number, number], count: 3 } }, mean_img_ar_error: 0.125 };
    const m = kohyaMetadata({ ...info, buckets: { noUpscale: true, minReso: 256, maxReso: 1024, info: table }, shuffleCaption: true, keepTokens: 2 });
    expect(m.ss_enable_bucket).toBe('True');
    expect(m.ss_bucket_no_upscale).toBe('True');
    expect([m.ss_min_bucket_reso, m.ss_max_bucket_reso, m.ss_shuffle_caption, m.ss_keep_tokens]).toEqual(['256', '1024', 'True', '2']);
    expect(m.ss_bucket_info).toBe('{"buckets": {"0": {"resolution": [384, 640], "count": 3}, "1": {"resolution": [512, 512], "count": 1}, "2": {"resolution": [640, 384], "count": 3}}, "mean_img_ar_error": 0.125}');
    expect(m.ss_num_batches_per_epoch).toBe('5'); // 2 + 1 + 2, not ceil(7 / 2) = 4
    expect(m.ss_resolution).toBe('(512, 512)');
  });
});
