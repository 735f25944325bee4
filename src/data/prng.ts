/**
 * Seeded, serializable pseudo-random numbers for everything random in the data pipeline.
 *
 * Generator: xoshiro128** (Blackman & Vigna), 128-bit state in four uint32 words, all 32-bit math.
 * Seeding: the 64-bit seed goes through splitmix64 (two outputs = the four state words), the
 * generator's recommended seeding procedure.
 *
 * `derive(seed, ...keys)` is the counter-based entry point: it hashes (seed, keys) into a fresh
 * generator, so a random decision keyed by e.g. (epoch, sampleIndex) is a pure function of those
 * numbers. Resuming a run then needs only a cursor, never a replay of a stream.
 */

const MASK64 = (1n << 64n) - 1n;
const GOLDEN64 = 0x9e3779b97f4a7c15n;

/** splitmix64's output function: a bijective 64-bit mixer. */
function mix64(z: bigint): bigint {
  z = ((z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
  z = ((z ^ (z >> 27n)) * 0x94d049bb133111ebn) & MASK64;
  return z ^ (z >> 31n);
}

/** A seed or key as an unsigned 64-bit value (negative integers wrap, two's complement). */
function toU64(v: number | bigint, what: string): bigint {
  if (typeof v === 'number') {
    if (!Number.isSafeInteger(v)) throw new RangeError(`${what} must be a safe integer, got ${v}`);
    v = BigInt(v);
  }
  return BigInt.asUintN(64, v);
}

/** The first `n` outputs of splitmix64 started at `seed` (exported for tests against the reference). */
export function splitmix64(seed: number | bigint, n: number): bigint[] {
  let x = toU64(seed, 'seed');
  const out: bigint[] = [];
  for (let i = 0; i < n; i++) {
    x = (x + GOLDEN64) & MASK64;
    out.push(mix64(x));
  }
  return out;
}

/** JSON-serializable generator state. */
export interface PrngState {
  algorithm: 'xoshiro128**';
  /** Four uint32 words, not all zero. */
  s: [number, number, number, number];
}

/** The four xoshiro state words for a 64-bit seed: two splitmix64 outputs, low word first. */
function seedWords(seed: bigint): number[] {
  const [a, b] = splitmix64(seed, 2);
  const words = [a & 0xffffffffn, a >> 32n, b & 0xffffffffn, b >> 32n].map(Number);
  // Two zero outputs in a row cannot happen in practice; still never hand xoshiro an all-zero state.
  if (!words.some((w) => w !== 0)) words[0] = 1;
  return words;
}

const rotl = (x: number, k: number): number => (x << k) | (x >>> (32 - k));

export class Prng {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;

  private constructor(s: readonly number[]) {
    [this.s0, this.s1, this.s2, this.s3] = s.map((w) => w >>> 0);
    if ((this.s0 | this.s1 | this.s2 | this.s3) === 0) throw new RangeError('xoshiro128** state must not be all zero');
  }

  /** A generator seeded from a 64-bit seed (a safe integer or a bigint) via splitmix64. */
  static fromSeed(seed: number | bigint): Prng {
    return new Prng(seedWords(toU64(seed, 'seed')));
  }

  static fromState(state: PrngState): Prng {
    if (!state || state.algorithm !== 'xoshiro128**' || !Array.isArray(state.s) || state.s.length !== 4) {
      throw new TypeError(`not a xoshiro128** PRNG state: ${JSON.stringify(state)}`);
    }
    for (const w of state.s) {
      if (!Number.isInteger(w) || w < 0 || w > 0xffffffff) throw new TypeError(`bad PRNG state word ${w}`);
    }
    return new Prng(state.s);
  }

  state(): PrngState {
    return { algorithm: 'xoshiro128**', s: [this.s0 >>> 0, this.s1 >>> 0, this.s2 >>> 0, this.s3 >>> 0] };
  }

  clone(): Prng {
    return Prng.fromState(this.state());
  }

  /** Uniform uint32. */
  nextU32(): number {
    const result = Math.imul(rotl(Math.imul(this.s1, 5), 7), 9) >>> 0;
    const t = this.s1 << 9;
    this.s2 ^= this.s0;
    this.s3 ^= this.s1;
    this.s1 ^= this.s2;
    this.s0 ^= this.s3;
    this.s2 ^= t;
    this.s3 = rotl(this.s3, 11);
    return result;
  }

  /** Uniform double in [0, 1) with 53 random bits (uses two draws). */
  nextFloat(): number {
    const hi = this.nextU32() >>> 5; // 27 bits
    const lo = this.nextU32() >>> 6; // 26 bits
    return (hi * 67108864 + lo) / 9007199254740992;
  }

  /** Uniform integer in [0, n), unbiased (rejection sampling), for 1 <= n <= 2^32. */
  int(n: number): number {
    if (!Number.isInteger(n) || n < 1 || n > 0x100000000) throw new RangeError(`int(n) needs 1 <= n <= 2^32, got ${n}`);
    if (n === 1) return 0;
    // Accept x < limit, the largest multiple of n that fits in 2^32, so x % n is uniform.
    const limit = 0x100000000 - (0x100000000 % n);
    for (;;) {
      const x = this.nextU32();
      if (x < limit) return x % n;
    }
  }

  /** Fisher-Yates shuffle in place; returns `arr`. */
  shuffle<T, A extends { length: number; [i: number]: T }>(arr: A): A {
    for (let i = arr.length - 1; i > 0; i--) {
      const j = this.int(i + 1);
      const t = arr[i];
      arr[i] = arr[j];
      arr[j] = t;
    }
    return arr;
  }

  /** A uniformly chosen element of a non-empty array. */
  choice<T>(arr: readonly T[]): T {
    if (arr.length === 0) throw new RangeError('choice() of an empty array');
    return arr[this.int(arr.length)];
  }
}

/**
 * A fresh generator that is a pure function of (seed, ...keys): the keys (safe integers) are
 * folded into the seed with splitmix64's mixer, one round per key, so derive(s, 1, 2),
 * derive(s, 2, 1), derive(s, 1) and derive(s, 1, 2, 0) are all unrelated streams.
 */
export function derive(seed: number | bigint, ...keys: number[]): Prng {
  let h = mix64(toU64(seed, 'seed'));
  keys.forEach((key, i) => {
    const k = toU64(key, 'derive() key');
    h = mix64(h ^ mix64((k + BigInt(i + 1) * GOLDEN64) & MASK64));
  });
  const [a, b, c, d] = seedWords(h);
  return Prng.fromState({ algorithm: 'xoshiro128**', s: [a, b, c, d] });
}
