import { Prng, type PrngState, derive, splitmix64 } from '../src/data/prng';

describe('reference vectors', () => {
  test('splitmix64 from seed 1234567 (the published test vector)', () => {
    expect(splitmix64(1234567, 5)).toEqual([
      6457827717110365317n,
      3203168211198807973n,
      9817491932198370423n,
      4593380528125082431n,
      16408922859458223821n,
    ]);
  });

  test('xoshiro128** from state [1, 2, 3, 4] (values from the reference C code)', () => {
    const p = Prng.fromState({ algorithm: 'xoshiro128**', s: [1, 2, 3, 4] });
    expect(Array.from({ length: 6 }, () => p.nextU32())).toEqual([11520, 0, 5927040, 70819200, 2031721883, 1637235492]);
  });

  test('fromSeed seeds the four words from two splitmix64 outputs, low word first', () => {
    const [a, b] = splitmix64(42, 2);
    const words = [a & 0xffffffffn, a >> 32n, b & 0xffffffffn, b >> 32n].map(Number);
    expect(Prng.fromSeed(42).state().s).toEqual(words);
    expect(Prng.fromSeed(42n).state()).toEqual(Prng.fromSeed(42).state());
  });
});

describe('Prng', () => {
  test('same seed, same stream; different seeds, different streams', () => {
    const draw = (p: Prng): number[] => Array.from({ length: 20 }, () => p.nextU32());
    expect(draw(Prng.fromSeed(7))).toEqual(draw(Prng.fromSeed(7)));
    expect(draw(Prng.fromSeed(7))).not.toEqual(draw(Prng.fromSeed(8)));
    // Negative seeds are valid (two's complement) and distinct.
    expect(draw(Prng.fromSeed(-1))).not.toEqual(draw(Prng.fromSeed(1)));
  });

  test('state survives JSON and restoring mid-stream continues identically', () => {
    const p = Prng.fromSeed(123);
    for (let i = 0; i < 37; i++) p.nextU32();
    p.nextFloat();
    p.int(10);
    const saved = JSON.parse(JSON.stringify(p.state())) as PrngState;
    const q = Prng.fromState(saved);
    const a = [p.nextU32(), p.nextFloat(), p.int(1000), p.shuffle([1, 2, 3, 4, 5, 6])];
    const b = [q.nextU32(), q.nextFloat(), q.int(1000), q.shuffle([1, 2, 3, 4, 5, 6])];
    expect(b).toEqual(a);
    // clone() is independent of the original.
    const c = p.clone();
    expect(c.nextU32()).toBe(p.nextU32());
  });

  test('fromState rejects malformed states', () => {
    expect(() => Prng.fromState({ algorithm: 'xoshiro128**', s: [0, 0, 0, 0] })).toThrow(/all zero/);
    expect(() => Prng.fromState({ algorithm: 'xoshiro128**', s: [1, 2, 3] } as unknown as PrngState)).toThrow();
    expect(() => Prng.fromState({ algorithm: 'xoshiro128**', s: [1, 2, 3, 2 ** 32] })).toThrow(/state word/);
    expect(() => Prng.fromState({ algorithm: 'mt19937', s: [1, 2, 3, 4] } as unknown as PrngState)).toThrow();
    expect(() => Prng.fromSeed(1.5)).toThrow(/safe integer/);
  });

  test('nextFloat is in [0, 1) and roughly uniform', () => {
    const p = Prng.fromSeed(1);
    const bins = new Array<number>(10).fill(0);
    for (let i = 0; i < 50000; i++) {
      const x = p.nextFloat();
      expect(x >= 0 && x < 1).toBe(true);
      bins[Math.floor(x * 10)]++;
    }
    for (const b of bins) expect(Math.abs(b - 5000)).toBeLessThan(300);
  });

  test('int(n) covers [0, n) uniformly (chi-square) and rejects bad n', () => {
    for (const n of [1, 3, 7, 10]) {
      const p = Prng.fromSeed(n);
      const counts = new Array<number>(n).fill(0);
      const draws = 7000 * n;
      for (let i = 0; i < draws; i++) counts[p.int(n)]++;
      const expected = draws / n;
      const chi2 = counts.reduce((s, c) => s + (c - expected) ** 2 / expected, 0);
      // 99.9th percentile of chi-square with <= 9 degrees of freedom is 27.9.
      expect(chi2).toBeLessThan(28);
    }
    const p = Prng.fromSeed(5);
    for (let i = 0; i < 100; i++) expect(p.int(2 ** 32)).toBeLessThan(2 ** 32);
    expect(() => p.int(0)).toThrow(RangeError);
    expect(() => p.int(2.5)).toThrow(RangeError);
    expect(() => p.int(2 ** 32 + 1)).toThrow(RangeError);
  });

  test('int(n) is unbiased where plain modulo is not', () => {
    // With n = 3 * 2^30, x % n maps [0, 2^30) twice: modulo would give P(< 2^30) = 1/2, not 1/3.
    const p = Prng.fromSeed(9);
    const n = 3 * 2 ** 30;
    let low = 0;
    const draws = 30000;
    for (let i = 0; i < draws; i++) if (p.int(n) < 2 ** 30) low++;
    expect(Math.abs(low / draws - 1 / 3)).toBeLessThan(0.02);
  });

  test('shuffle is a deterministic permutation with all orders equally likely', () => {
    const a = Prng.fromSeed(3).shuffle(Array.from({ length: 50 }, (_, i) => i));
    expect([...a].sort((x, y) => x - y)).toEqual(Array.from({ length: 50 }, (_, i) => i));
    expect(Prng.fromSeed(3).shuffle(Array.from({ length: 50 }, (_, i) => i))).toEqual(a);
    expect(a).not.toEqual(Array.from({ length: 50 }, (_, i) => i));
    // Typed arrays work too.
    const t = Prng.fromSeed(3).shuffle(Uint32Array.from({ length: 50 }, (_, i) => i));
    expect(Array.from(t)).toEqual(a);

    const p = Prng.fromSeed(11);
    const counts = new Map<string, number>();
    for (let i = 0; i < 60000; i++) {
      const k = p.shuffle(['a', 'b', 'c']).join('');
      counts.set(k, (counts.get(k) ?? 0) + 1);
    }
    expect(counts.size).toBe(6);
    for (const c of counts.values()) expect(Math.abs(c - 10000)).toBeLessThan(500);
  });

  test('choice picks every element', () => {
    const p = Prng.fromSeed(2);
    const seen = new Set<string>();
    for (let i = 0; i < 200; i++) seen.add(p.choice(['x', 'y', 'z']));
    expect(seen).toEqual(new Set(['x', 'y', 'z']));
    expect(() => p.choice([])).toThrow(RangeError);
  });
});

describe('derive', () => {
  const first = (p: Prng): number[] => [p.nextU32(), p.nextU32(), p.nextU32()];

  test('is a pure function of (seed, keys)', () => {
    expect(first(derive(5, 1, 2))).toEqual(first(derive(5, 1, 2)));
    expect(first(derive(5n, 1, 2))).toEqual(first(derive(5, 1, 2)));
  });

  test('distinct seeds, keys, key orders and key counts give distinct streams', () => {
    const streams = [derive(5), derive(6), derive(5, 0), derive(5, 1), derive(5, 1, 2), derive(5, 2, 1), derive(5, 1, 2, 0), derive(5, 1, 3), derive(5, -1)];
    const firsts = streams.map((p) => first(p).join(','));
    expect(new Set(firsts).size).toBe(streams.length);
    // And none equals the plain seeded generator.
    expect(firsts).not.toContain(first(Prng.fromSeed(5)).join(','));
  });

  test('neighbouring keys are decorrelated (first draws spread over the range)', () => {
    let high = 0;
    for (let i = 0; i < 2000; i++) if (derive(0, 7, i).nextFloat() >= 0.5) high++;
    expect(Math.abs(high - 1000)).toBeLessThan(120);
  });

  test('rejects non-integer keys', () => {
    expect(() => derive(1, 0.5)).toThrow(/safe integer/);
    expect(() => derive(1, Number.MAX_SAFE_INTEGER + 1)).toThrow(/safe integer/);
  });
});
