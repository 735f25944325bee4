/**
 * Caption tag shuffling (`--shuffle-caption`, `--keep-tokens N`, `--keep-tokens-separator S`), after kohya's
 * sd-scripts BaseDataset.process_caption:
 *
 * - The caption is split at commas into tags (each trimmed). With a keep-tokens separator present in the caption,
 *   the part before it is kept in place, the part between it and a second separator is shuffled, and the part after
 *   the second one stays at the end (empty tags dropped, as kohya); otherwise the first N tags stay in place and
 *   the rest is shuffled. The tags are joined again with ", ".
 * - The shuffle is keyed, not streamed: derive(seed, SHUFFLE_KEY, epoch, index), so the caption of dataset item
 *   `index` in `epoch` is a pure function of them and a resumed run sees the same captions.
 * - Caption dropout (--caption-dropout-rate) comes first, as in kohya: a dropped caption is "" and is not shuffled.
 *
 * Differs from kohya on purpose: --keep-tokens and --keep-tokens-separator without --shuffle-caption are refused
 * (kohya then leaves the caption as it is, separator included, so the flags would do nothing).
 */
import { pickCaption } from './dataset';
import { derive } from './prng';

/** derive() key of the tag shuffle. */
export const SHUFFLE_KEY = 0x5cf;

export interface CaptionOptions {
  /** Probability of the empty caption (pickCaption). */
  dropoutRate?: number;
  shuffle?: boolean;
  /** Leading tags kept in place (without a separator in the caption). */
  keepTokens?: number;
  /** Tags before it stay in place; after a second one they stay at the end. */
  keepTokensSeparator?: string;
}

const tags = (s: string): string[] =>
  s
    .split(',')
    .map((t) => t.trim())
    .filter((t) => t !== '');

/** The tags of one caption shuffled for (seed, epoch, index) as the module comment says. */
export function shuffleTags(caption: string, seed: number, epoch: number, index: number, o: Pick<CaptionOptions, 'keepTokens' | 'keepTokensSeparator'>): string {
  let fixed: string[] = [];
  let flex: string[];
  let suffix: string[] = [];
  const sep = o.keepTokensSeparator;
  if (sep && caption.includes(sep)) {
    const at = caption.indexOf(sep);
    const fixedPart = caption.slice(0, at);
    let flexPart = caption.slice(at + sep.length);
    const at2 = flexPart.indexOf(sep);
    if (at2 >= 0) {
      suffix = tags(flexPart.slice(at2 + sep.length));
      flexPart = flexPart.slice(0, at2);
    }
    fixed = tags(fixedPart);
    flex = tags(flexPart);
  } else {
    const all = caption
      .trim()
      .split(',')
      .map((t) => t.trim());
    const k = o.keepTokens ?? 0;
    fixed = k > 0 ? all.slice(0, k) : [];
    flex = k > 0 ? all.slice(k) : all;
  }
  flex = derive(seed, SHUFFLE_KEY, epoch, index).shuffle(flex);
  return [...fixed, ...flex, ...suffix].join(', ');
}

/** The training caption of item `index` in `epoch`: pickCaption (variant, dropout), then the tag shuffle. */
export function trainingCaption(captions: readonly string[], seed: number, epoch: number, index: number, o: CaptionOptions = {}): string {
  const c = pickCaption(captions, seed, epoch, index, o.dropoutRate ?? 0);
  if (!o.shuffle || c === '') return c;
  return shuffleTags(c, seed, epoch, index, o);
}
