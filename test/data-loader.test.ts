import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import sharp from 'sharp';

import { type Dataset, loadDataset, pickCaption } from '../src/data/dataset';
import { makeDemoData } from '../src/data/demo-data';
import { processImage } from '../src/data/images';
import { AUGMENT_KEY, type Batch, BatchLoader, type LoaderOptions } from '../src/data/loader';
import { derive } from '../src/data/prng';
import { SampleOrder } from '../src/data/sampler';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'data-loader-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

let ds: Dataset;
beforeAll(async () => {
  // 13 demo items (some with caption lists), stretched to assorted non-square sizes so that
  // random crops have room to vary.
  const demo = await makeDemoData(path.join(tmp, 'demo'), { count: 13, size: 40, seed: 5, layout: 'txt' });
  await Promise.all(
    demo.items.map(async (it, i) => {
      const file = path.join(demo.root, it.file);
      const stretched = await sharp(file).resize(40 + 9 * (i % 3), 36 + 7 * ((i + 1) % 2), { fit: 'fill' }).png().toBuffer();
      fs.writeFileSync(file, stretched);
    }),
  );
  ds = await loadDataset(demo.root);
});

const OPTS: LoaderOptions = { batchSize: 4, seed: 11, resolution: 32, randomFlip: true, prefetchBatches: 2, concurrency: 3 };

async function take(loader: BatchLoader, n: number): Promise<Batch[]> {
  const out: Batch[] = [];
  for (let i = 0; i < n; i++) out.push(await loader.next());
  return out;
}

describe('BatchLoader', () => {
  test('decoded images are kept with center crop and no flip (imageCacheMb): bit-identical batches, the second epoch decodes nothing', async () => {
    const opts = { ...OPTS, randomFlip: false, centerCrop: true };
    const plain = new BatchLoader(ds, opts);
    const cached = new BatchLoader(ds, { ...opts, imageCacheMb: 64 });
    const [a, b] = [await take(plain, 8), await take(cached, 8)]; // two epochs
    await Promise.all([plain.close(), cached.close()]);
    a.forEach((x, i) => {
      expect(b[i].indices).toEqual(x.indices);
      expect(Buffer.from(b[i].pixelValues.buffer).equals(Buffer.from(x.pixelValues.buffer))).toBe(true);
      expect(b[i].geometry).toEqual(x.geometry);
    });
    expect(cached.cacheStats.misses).toBeLessThanOrEqual(13 + 2 * 4); // first epoch (+ prefetch racing it)
    expect(cached.cacheStats.hits).toBeGreaterThanOrEqual(13 - 4);
    expect(cached.cachedBytes).toBe(13 * 3 * 32 * 32 * 4);
  });

  test('the image cache is off with random flips or crops, and stays within its limit', async () => {
    const flips = new BatchLoader(ds, { ...OPTS, imageCacheMb: 64 });
    await take(flips, 8);
    await flips.close();
    expect(flips.cacheStats).toEqual({ hits: 0, misses: 0 });
    const small = new BatchLoader(ds, { ...OPTS, randomFlip: false, centerCrop: true, imageCacheMb: (5 * 3 * 32 * 32 * 4) / (1024 * 1024) });
    await take(small, 8);
    await small.close();
    expect(small.cachedBytes).toBe(5 * 3 * 32 * 32 * 4);
  });

  test('yields batches in exactly the SampleOrder order, across epochs', async () => {
    const loader = new BatchLoader(ds, OPTS);
    const batches = await take(loader, 9); // 13 items, batch 4: 4,4,4,1 per epoch
    await loader.close();
    const order = new SampleOrder(13, { seed: 11 });
    for (const b of batches) {
      const s = order.nextBatch(4);
      expect({ indices: b.indices, epoch: b.epoch, position: b.position, positionAfter: b.positionAfter, lastInEpoch: b.lastInEpoch }).toEqual(s);
    }
    expect(batches.map((b) => b.indices.length)).toEqual([4, 4, 4, 1, 4, 4, 4, 1, 4]);
    expect(loader.batchesPerEpoch()).toBe(4);
  });

  test('--caption-dropout-rate: captions are the keyed pickCaption with dropout, some of them empty', async () => {
    const loader = new BatchLoader(ds, { ...OPTS, captionDropoutRate: 0.5 });
    const batches = await take(loader, 8);
    await loader.close();
    let empty = 0;
    for (const b of batches)
      b.indices.forEach((i, k) => {
        expect(b.captions[k]).toBe(pickCaption(ds.items[i].captions, 11, b.epoch, i, 0.5));
        if (b.captions[k] === '') empty++;
      });
    expect(empty).toBeGreaterThan(4);
    expect(empty).toBeLessThan(25);
  });

  test('pixels, captions and geometry are the per-sample keyed transforms', async () => {
    const loader = new BatchLoader(ds, OPTS);
    const [b] = await take(loader, 1);
    await loader.close();
    const per = 3 * 32 * 32;
    expect(b.pixelValues.length).toBe(b.indices.length * per);
    for (let k = 0; k < b.indices.length; k++) {
      const i = b.indices[k];
      const want = await processImage(ds.items[i].path, { resolution: 32, randomFlip: true }, derive(11, AUGMENT_KEY, 0, i));
      expect(b.pixelValues.subarray(k * per, (k + 1) * per)).toEqual(want.pixels);
      const { pixels: _p, ...geometry } = want;
      expect(b.geometry[k]).toEqual(geometry);
      expect(b.captions[k]).toBe(pickCaption(ds.items[i].captions, 11, 0, i));
    }
  });

  test('is deterministic, and augmentation differs between epochs', async () => {
    const run = async (): Promise<Batch[]> => {
      const loader = new BatchLoader(ds, { ...OPTS, concurrency: 1, prefetchBatches: 0 });
      const out = await take(loader, 8);
      await loader.close();
      return out;
    };
    const [a, b] = await Promise.all([run(), run()]);
    expect(b).toEqual(a);
    // Same item in epochs 0 and 1 gets independent crop/flip draws: over 13 items some differ.
    const geomOf = (batches: Batch[], epoch: number): Map<number, string> => {
      const m = new Map<number, string>();
      for (const x of batches.filter((y) => y.epoch === epoch)) x.indices.forEach((i, k) => m.set(i, JSON.stringify(x.geometry[k])));
      return m;
    };
    const e0 = geomOf(a, 0);
    const e1 = geomOf(a, 1);
    expect([...e0.keys()].some((i) => e0.get(i) !== e1.get(i))).toBe(true);
  });

  test('resuming from state() reproduces the remaining batches exactly', async () => {
    const full = new BatchLoader(ds, OPTS);
    const all = await take(full, 10);
    await full.close();
    for (const k of [1, 3, 4, 6]) {
      const first = new BatchLoader(ds, OPTS);
      await take(first, k);
      const saved = JSON.parse(JSON.stringify(first.state()));
      await first.close();
      expect(saved).toMatchObject({ epoch: all[k - 1].epoch, position: all[k - 1].positionAfter });
      const resumed = new BatchLoader(ds, { ...OPTS, cursor: saved });
      expect(await take(resumed, 10 - k)).toEqual(all.slice(k));
      await resumed.close();
    }
  });

  test('state() counts consumed batches, not prefetched ones', async () => {
    const loader = new BatchLoader(ds, { ...OPTS, prefetchBatches: 3 });
    expect(loader.state()).toMatchObject({ epoch: 0, position: 0 });
    await loader.next();
    await new Promise((r) => setTimeout(r, 50)); // let the prefetch run
    expect(loader.state()).toMatchObject({ epoch: 0, position: 4 });
    await loader.close();
  });

  test('shards: ranks get disjoint parts of each global batch', async () => {
    const ranks = [0, 1].map((rank) => new BatchLoader(ds, { ...OPTS, batchSize: 3, rank, worldSize: 2 }));
    const [r0, r1] = await Promise.all(ranks.map((l) => take(l, 2)));
    await Promise.all(ranks.map((l) => l.close()));
    const perm = Array.from(new SampleOrder(13, { seed: 11 }).permutation(0));
    expect([...r0[0].indices, ...r1[0].indices]).toEqual(perm.slice(0, 6));
    expect([...r0[1].indices, ...r1[1].indices]).toEqual(perm.slice(6, 12));
  });

  test('loadForCache is the center crop without flip', async () => {
    const loader = new BatchLoader(ds, OPTS);
    const got = await loader.loadForCache(2);
    await loader.close();
    const want = await processImage(ds.items[2].path, { resolution: 32, centerCrop: true });
    expect(got).toEqual(want);
    expect(got.flipped).toBe(false);
    await expect(loader.loadForCache(99)).rejects.toThrow(RangeError);
  });

  test('a broken image surfaces on next() with its path, without an unhandled rejection', async () => {
    const dir = path.join(tmp, 'broken');
    await makeDemoData(dir, { count: 4, size: 16, seed: 1 });
    const broken = await loadDataset(dir);
    fs.writeFileSync(broken.items[1].path, Buffer.from('corrupted after loading'));
    const unhandled: unknown[] = [];
    const onUnhandled = (e: unknown): void => {
      unhandled.push(e);
    };
    process.on('unhandledRejection', onUnhandled);
    try {
      const loader = new BatchLoader(broken, { ...OPTS, resolution: 16, batchSize: 4, prefetchBatches: 2 });
      await expect(loader.next()).rejects.toThrow(new RegExp(`failed to load training image .*${path.basename(broken.items[1].path)}`));
      await new Promise((r) => setTimeout(r, 100));
      await loader.close();
      expect(unhandled).toEqual([]);
    } finally {
      process.off('unhandledRejection', onUnhandled);
    }
  });

  test('close() stops the loader', async () => {
    const loader = new BatchLoader(ds, OPTS);
    await loader.next();
    await loader.close();
    await expect(loader.next()).rejects.toThrow(/closed/);
  });

  test('async iteration', async () => {
    const loader = new BatchLoader(ds, OPTS);
    const seen: number[][] = [];
    for await (const b of loader) {
      seen.push(b.indices);
      if (seen.length === 3) break;
    }
    await loader.close();
    const order = new SampleOrder(13, { seed: 11 });
    expect(seen).toEqual([0, 1, 2].map(() => order.nextBatch(4).indices));
  });
});
