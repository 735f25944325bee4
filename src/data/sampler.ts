/**
 * The order in which training samples are visited: a fresh seeded permutation every epoch,
 * consumed in batches, with a resumable cursor.
 *
 * Epoch e's permutation is `derive(seed, SAMPLER_KEY, e).shuffle([0..N))`, so the whole order is
 * a pure function of (seed, N) and a cursor {epoch, position} is a complete resume point.
 *
 * Batching mirrors diffusers' `DataLoader(shuffle=True, drop_last=False)`: batches never span an
 * epoch boundary and the last batch of an epoch holds the remainder (it may be smaller).
 *
 * Data-parallel sharding (worldSize > 1): a *global* batch is the next `batchSize * worldSize`
 * entries of the permutation and rank r takes the slice [r*batchSize, (r+1)*batchSize). This is
 * exactly what accelerate's BatchSamplerShard gives (round-robin batches). When the epoch's
 * remainder is short of a full global batch, it is padded from the start of the epoch's
 * permutation (accelerate's `even_batches=True`), so every rank gets a full batch and all ranks
 * step in lockstep; the padded samples are seen twice in that epoch. With worldSize = 1 there is
 * no padding, as with a plain DataLoader. The cursor counts global samples, so it is the same on
 * every rank and a run can resume with a different world size.
 */
import { derive } from './prng';

/** derive() key that separates the sampler's streams from other users of the same seed. */
export const SAMPLER_KEY = 0x5a3e;

export interface SampleCursor {
  epoch: number;
  /** Samples of this epoch's permutation already consumed (globally, over all ranks), 0..N. */
  position: number;
}

/** JSON-serializable resume point. `position === numSamples` means epoch `epoch` is complete. */
export interface SampleOrderState extends SampleCursor {
  version: 1;
  seed: number;
  numSamples: number;
}

export interface ShardOptions {
  /** This process's rank, 0 <= rank < worldSize (default 0). */
  rank?: number;
  /** Number of data-parallel processes (default 1). */
  worldSize?: number;
}

export interface SampleOrderOptions extends ShardOptions {
  seed: number;
  /** Where to start (default epoch 0, position 0). */
  cursor?: SampleCursor;
}

export interface SampleBatch {
  /** Dataset indices for this rank, in order. */
  indices: number[];
  epoch: number;
  /** Cursor position before / after this (global) batch. */
  position: number;
  positionAfter: number;
  /** True when this batch finishes its epoch. */
  lastInEpoch: boolean;
}

function checkInt(v: number, what: string, min: number): void {
  if (!Number.isSafeInteger(v) || v < min) throw new RangeError(`${what} must be an integer >= ${min}, got ${v}`);
}

export class SampleOrder {
  readonly numSamples: number;
  readonly seed: number;
  readonly rank: number;
  readonly worldSize: number;
  private epochValue: number;
  private positionValue: number;
  private cachedEpoch = -1;
  private cachedPerm: Uint32Array = new Uint32Array(0);

  constructor(numSamples: number, options: SampleOrderOptions) {
    checkInt(numSamples, 'numSamples', 1);
    if (numSamples > 0x100000000) throw new RangeError(`numSamples ${numSamples} is over 2^32`);
    checkInt(options.seed, 'seed', Number.MIN_SAFE_INTEGER);
    const worldSize = options.worldSize ?? 1;
    const rank = options.rank ?? 0;
    checkInt(worldSize, 'worldSize', 1);
    checkInt(rank, 'rank', 0);
    if (rank >= worldSize) throw new RangeError(`rank ${rank} must be < worldSize ${worldSize}`);
    const cursor = options.cursor ?? { epoch: 0, position: 0 };
    checkInt(cursor.epoch, 'cursor.epoch', 0);
    checkInt(cursor.position, 'cursor.position', 0);
    if (cursor.position > numSamples) {
      throw new RangeError(`cursor.position ${cursor.position} is past the end of an epoch of ${numSamples} samples`);
    }
    this.numSamples = numSamples;
    this.seed = options.seed;
    this.rank = rank;
    this.worldSize = worldSize;
    this.epochValue = cursor.epoch;
    this.positionValue = cursor.position;
  }

  /** Restores a saved cursor; throws if it was saved for a different sample count or seed. */
  static fromState(state: SampleOrderState, shard: ShardOptions & { numSamples?: number; seed?: number } = {}): SampleOrder {
    if (!state || state.version !== 1) throw new TypeError(`unsupported sampler state: ${JSON.stringify(state)}`);
    if (shard.numSamples !== undefined && shard.numSamples !== state.numSamples) {
      throw new Error(
        `sampler state was saved for ${state.numSamples} samples but the dataset has ${shard.numSamples}; ` +
          'resume with the same dataset (or start a fresh run)',
      );
    }
    if (shard.seed !== undefined && shard.seed !== state.seed) {
      throw new Error(`sampler state was saved with seed ${state.seed}, not ${shard.seed}`);
    }
    return new SampleOrder(state.numSamples, {
      seed: state.seed,
      rank: shard.rank,
      worldSize: shard.worldSize,
      cursor: { epoch: state.epoch, position: state.position },
    });
  }

  get epoch(): number {
    return this.epochValue;
  }

  get position(): number {
    return this.positionValue;
  }

  state(): SampleOrderState {
    return { version: 1, seed: this.seed, numSamples: this.numSamples, epoch: this.epochValue, position: this.positionValue };
  }

  /** Epoch e's permutation of [0, N) (a copy). */
  permutation(epoch: number): Uint32Array {
    return this.perm(epoch).slice();
  }

  private perm(epoch: number): Uint32Array {
    if (epoch !== this.cachedEpoch) {
      const p = new Uint32Array(this.numSamples);
      for (let i = 0; i < p.length; i++) p[i] = i;
      this.cachedPerm = derive(this.seed, SAMPLER_KEY, epoch).shuffle(p);
      this.cachedEpoch = epoch;
    }
    return this.cachedPerm;
  }

  /** Optimizer steps per epoch for this per-rank batch size: ceil(N / (batchSize * worldSize)). */
  batchesPerEpoch(batchSize: number): number {
    checkInt(batchSize, 'batchSize', 1);
    return Math.ceil(this.numSamples / (batchSize * this.worldSize));
  }

  /** Moves a finished epoch's cursor to the start of the next one. */
  private rollOver(): void {
    if (this.positionValue >= this.numSamples) {
      this.epochValue += 1;
      this.positionValue = 0;
    }
  }

  /** This rank's next batch of `batchSize` indices (smaller only at an epoch's end with worldSize 1). */
  nextBatch(batchSize: number): SampleBatch {
    checkInt(batchSize, 'batchSize', 1);
    this.rollOver();
    const n = this.numSamples;
    const perm = this.perm(this.epochValue);
    const start = this.positionValue;
    const globalSize = batchSize * this.worldSize;
    const take = Math.min(globalSize, n - start);
    let indices: number[];
    if (this.worldSize === 1) {
      indices = Array.from(perm.subarray(start, start + take));
    } else {
      // Slice [lo, hi) of the global batch; positions past the epoch's end wrap to its start.
      const lo = this.rank * batchSize;
      indices = [];
      for (let k = lo; k < lo + batchSize; k++) {
        indices.push(k < take ? perm[start + k] : perm[(k - take) % n]);
      }
    }
    this.positionValue = start + take;
    return {
      indices,
      epoch: this.epochValue,
      position: start,
      positionAfter: this.positionValue,
      lastInEpoch: this.positionValue === n,
    };
  }

  /** Advances past `nBatches` batches without producing them (no permutation is built). */
  skip(nBatches: number, batchSize: number): void {
    checkInt(nBatches, 'nBatches', 0);
    checkInt(batchSize, 'batchSize', 1);
    const globalSize = batchSize * this.worldSize;
    const perEpoch = Math.ceil(this.numSamples / globalSize);
    for (let left = nBatches; left > 0; ) {
      this.rollOver();
      // Whole epochs at once when we are at an epoch start.
      if (this.positionValue === 0 && left >= perEpoch) {
        const epochs = Math.floor(left / perEpoch);
        this.epochValue += epochs;
        left -= epochs * perEpoch;
        if (left === 0) {
          // Land on "previous epoch complete", exactly where nextBatch() would have left us.
          this.epochValue -= 1;
          this.positionValue = this.numSamples;
        }
        continue;
      }
      this.positionValue = Math.min(this.numSamples, this.positionValue + globalSize);
      left -= 1;
    }
  }
}
