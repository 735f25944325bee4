/** --validation-split: which images a run holds out (for val_loss) and which it trains on. */
import type { Dataset } from './dataset';
import { derive } from './prng';

/** The PRNG stream key of the split (derive(seed, key)). */
const SPLIT_KEY = 0x5917;

/**
 * Holds out round(fraction × N) items (at least 1, at most N − 1), chosen by a seeded shuffle; the rest train.
 * The choice depends only on the seed and the sorted item list, so a resumed run holds out the same images.
 */
export function splitDataset(ds: Dataset, fraction: number, seed: number): { train: Dataset; val: Dataset } {
  const n = ds.items.length;
  if (n < 2) throw new Error(`--validation-split needs at least 2 images; ${ds.root} has ${n}`);
  const k = Math.min(n - 1, Math.max(1, Math.round(fraction * n)));
  const order = derive(seed, SPLIT_KEY).shuffle(Array.from({ length: n }, (_, i) => i));
  const held = new Set(order.slice(0, k));
  const pick = (heldOut: boolean): Dataset => {
    const items = ds.items.filter((_, i) => held.has(i) === heldOut);
    return { ...ds, items, counts: { ...ds.counts, images: items.length } };
  };
  return { train: pick(false), val: pick(true) };
}
