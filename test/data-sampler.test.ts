import { derive } from '../src/data/prng';
import { SAMPLER_KEY, type SampleBatch, SampleOrder, type SampleOrderState } from '../src/data/sampler';

const range = (n: number): number[] => Array.from({ length: n }, (_, i) => i);
const take = (o: SampleOrder, batches: number, bs: number): SampleBatch[] => range(batches).map(() => o.nextBatch(bs));

describe('SampleOrder permutations', () => {
  test('epoch e is derive(seed, SAMPLER_KEY, e).shuffle([0..N))', () => {
    const o = new SampleOrder(25, { seed: 3 });
    for (const e of [0, 1, 7]) {
      expect(Array.from(o.permutation(e))).toEqual(derive(3, SAMPLER_KEY, e).shuffle(range(25)));
    }
  });

  test('each epoch is a permutation, epochs differ, seeds differ', () => {
    const o = new SampleOrder(40, { seed: 1 });
    const p0 = Array.from(o.permutation(0));
    const p1 = Array.from(o.permutation(1));
    expect([...p0].sort((a, b) => a - b)).toEqual(range(40));
    expect([...p1].sort((a, b) => a - b)).toEqual(range(40));
    expect(p1).not.toEqual(p0);
    expect(Array.from(new SampleOrder(40, { seed: 2 }).permutation(0))).not.toEqual(p0);
    // permutation() hands out copies.
    o.permutation(0)[0] = 999;
    expect(Array.from(o.permutation(0))).toEqual(p0);
  });
});

describe('SampleOrder batching (DataLoader drop_last=False)', () => {
  test('batches follow the permutation; the last batch of an epoch holds the remainder', () => {
    const o = new SampleOrder(10, { seed: 5 });
    const b = take(o, 7, 4);
    expect(b.map((x) => x.indices.length)).toEqual([4, 4, 2, 4, 4, 2, 4]);
    expect(b.map((x) => x.epoch)).toEqual([0, 0, 0, 1, 1, 1, 2]);
    expect(b.map((x) => x.position)).toEqual([0, 4, 8, 0, 4, 8, 0]);
    expect(b.map((x) => x.positionAfter)).toEqual([4, 8, 10, 4, 8, 10, 4]);
    expect(b.map((x) => x.lastInEpoch)).toEqual([false, false, true, false, false, true, false]);
    expect(b.slice(0, 3).flatMap((x) => x.indices)).toEqual(Array.from(o.permutation(0)));
    expect(b.slice(3, 6).flatMap((x) => x.indices)).toEqual(Array.from(o.permutation(1)));
    expect(o.batchesPerEpoch(4)).toBe(3);
    expect(o.batchesPerEpoch(5)).toBe(2);
    expect(o.batchesPerEpoch(64)).toBe(1);
  });

  test('a batch never spans two epochs, even when the batch size changes', () => {
    const o = new SampleOrder(7, { seed: 0 });
    expect(o.nextBatch(5).indices).toHaveLength(5);
    const tail = o.nextBatch(5);
    expect(tail.indices).toHaveLength(2);
    expect(tail.lastInEpoch).toBe(true);
    expect(o.nextBatch(3)).toMatchObject({ epoch: 1, position: 0, positionAfter: 3 });
  });

  test('batch size larger than the dataset gives one batch per epoch', () => {
    const o = new SampleOrder(3, { seed: 9 });
    const b = take(o, 2, 8);
    expect(b.map((x) => x.indices.length)).toEqual([3, 3]);
    expect(b.map((x) => x.epoch)).toEqual([0, 1]);
  });

  test('rejects bad arguments', () => {
    expect(() => new SampleOrder(0, { seed: 0 })).toThrow(RangeError);
    expect(() => new SampleOrder(5, { seed: 0.5 })).toThrow(RangeError);
    expect(() => new SampleOrder(5, { seed: 0, cursor: { epoch: 0, position: 6 } })).toThrow(/past the end/);
    expect(() => new SampleOrder(5, { seed: 0, rank: 2, worldSize: 2 })).toThrow(/rank/);
    expect(() => new SampleOrder(5, { seed: 0 }).nextBatch(0)).toThrow(RangeError);
  });
});

describe('SampleOrder resume', () => {
  const N = 13;
  const BS = 4;

  test('restoring state() at every cursor over 3 epochs gives the identical continuation', () => {
    const reference = new SampleOrder(N, { seed: 77 });
    const all = take(reference, 20, BS);
    const walker = new SampleOrder(N, { seed: 77 });
    for (let k = 0; k < 12; k++) {
      const saved = JSON.parse(JSON.stringify(walker.state())) as SampleOrderState;
      const resumed = SampleOrder.fromState(saved, { numSamples: N, seed: 77 });
      expect(take(resumed, 8, BS)).toEqual(all.slice(k, k + 8));
      walker.nextBatch(BS);
    }
  });

  test('a cursor given as {epoch, position} mid-epoch continues from there', () => {
    const o = new SampleOrder(N, { seed: 4, cursor: { epoch: 2, position: 6 } });
    const b = o.nextBatch(BS);
    expect(b).toMatchObject({ epoch: 2, position: 6, positionAfter: 10 });
    expect(b.indices).toEqual(Array.from(o.permutation(2).subarray(6, 10)));
  });

  test('"epoch complete" and "next epoch start" cursors continue identically', () => {
    const a = new SampleOrder(N, { seed: 4, cursor: { epoch: 1, position: N } });
    const b = new SampleOrder(N, { seed: 4, cursor: { epoch: 2, position: 0 } });
    expect(take(a, 5, BS)).toEqual(take(b, 5, BS));
  });

  test('skip(n) lands where n nextBatch() calls land, from any start', () => {
    for (const start of [0, 1, 3, 4]) {
      for (const n of [0, 1, 2, 3, 4, 5, 7, 8, 12, 25]) {
        const a = new SampleOrder(N, { seed: 8 });
        const b = new SampleOrder(N, { seed: 8 });
        take(a, start, BS);
        take(b, start, BS);
        take(a, n, BS);
        b.skip(n, BS);
        expect(b.state()).toEqual(a.state());
        expect(b.nextBatch(BS)).toEqual(a.nextBatch(BS));
      }
    }
  });

  test('skip works with sharding too', () => {
    const a = new SampleOrder(11, { seed: 8, worldSize: 3, rank: 1 });
    const b = new SampleOrder(11, { seed: 8, worldSize: 3, rank: 1 });
    take(a, 9, 2);
    b.skip(9, 2);
    expect(b.state()).toEqual(a.state());
  });

  test('fromState refuses a different dataset size or seed', () => {
    const s = new SampleOrder(N, { seed: 1 }).state();
    expect(() => SampleOrder.fromState(s, { numSamples: N + 1 })).toThrow(/saved for 13 samples/);
    expect(() => SampleOrder.fromState(s, { seed: 2 })).toThrow(/seed/);
    expect(() => SampleOrder.fromState({ ...s, version: 2 } as unknown as SampleOrderState)).toThrow(/unsupported/);
  });
});

describe('SampleOrder sharding', () => {
  /** Batches of every rank for `steps` steps. */
  function shards(n: number, bs: number, world: number, steps: number, seed = 21): SampleBatch[][] {
    return range(world).map((rank) => take(new SampleOrder(n, { seed, rank, worldSize: world }), steps, bs));
  }

  test('ranks take disjoint consecutive slices of each global batch', () => {
    const n = 24;
    const bs = 2;
    const world = 3;
    const per = shards(n, bs, world, 8);
    const perm0 = Array.from(new SampleOrder(n, { seed: 21 }).permutation(0));
    const perm1 = Array.from(new SampleOrder(n, { seed: 21 }).permutation(1));
    for (let step = 0; step < 8; step++) {
      const global = per.flatMap((r) => r[step].indices);
      expect(new Set(global).size).toBe(bs * world);
      const perm = step < 4 ? perm0 : perm1;
      const start = (step % 4) * bs * world;
      expect(global).toEqual(perm.slice(start, start + bs * world));
      // Every rank reports the same global cursor.
      expect(new Set(per.map((r) => r[step].positionAfter)).size).toBe(1);
    }
    expect(new SampleOrder(n, { seed: 21, worldSize: world }).batchesPerEpoch(bs)).toBe(4);
  });

  test('a short last global batch is padded from the epoch start so every rank gets a full batch', () => {
    const n = 10;
    const bs = 2;
    const world = 3; // global batch 6: one full, then 4 left + 2 padding
    const per = shards(n, bs, world, 2);
    const perm = Array.from(new SampleOrder(n, { seed: 21 }).permutation(0));
    for (const r of per) for (const b of r) expect(b.indices).toHaveLength(bs);
    const last = per.flatMap((r) => r[1].indices);
    expect(last).toEqual([...perm.slice(6, 10), perm[0], perm[1]]);
    expect(per[0][1].lastInEpoch).toBe(true);
    // Over the epoch every sample is seen, ranks agree on the number of steps.
    const seen = new Set(per.flatMap((r) => r.flatMap((b) => b.indices)));
    expect(seen.size).toBe(n);
    // Then the next epoch starts on every rank.
    const next = range(world).map((rank) => {
      const o = new SampleOrder(n, { seed: 21, rank, worldSize: world });
      take(o, 2, bs);
      return o.nextBatch(bs);
    });
    expect(next.every((b) => b.epoch === 1 && b.position === 0)).toBe(true);
  });

  test('degenerate case: fewer samples than one global batch cycles the permutation', () => {
    const per = shards(3, 2, 4, 1);
    const perm = Array.from(new SampleOrder(3, { seed: 21 }).permutation(0));
    expect(per.flatMap((r) => r[0].indices)).toEqual([0, 1, 2, 3, 4, 5, 6, 7].map((k) => perm[k % 3]));
  });

  test('worldSize 1 is the unsharded order', () => {
    const a = take(new SampleOrder(10, { seed: 3 }), 5, 3);
    const b = take(new SampleOrder(10, { seed: 3, rank: 0, worldSize: 1 }), 5, 3);
    expect(b).toEqual(a);
  });
});
