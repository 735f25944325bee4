/**
 * Masks for --masked-loss from --mask-dir: the mask of `<data>/sub/cat.jpg` is `<mask-dir>/sub/cat.<any image
 * extension>` (kohya has no mask folder for LoRA; its conditioning images use the red channel, as we use the first
 * channel). An image without a mask counts fully (weight 1 everywhere). Refused, naming the file: a mask that
 * matches no training image, two masks for one image, a mask whose size differs from its image's.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import { DatasetError, type Dataset, IMAGE_EXTENSIONS } from './dataset';
import { readImageHeader } from './images';
import { mapLimit } from './limit';

const stem = (rel: string): string => rel.slice(0, rel.length - path.extname(rel).length);

/** Each item's mask file (absolute) or undefined, in item order. `all`: every dataset, so masks of held-out images are no orphans. */
export async function findMasks(maskDir: string, ds: Dataset, all: readonly Dataset[] = [ds]): Promise<Array<string | undefined>> {
  const dir = path.resolve(maskDir);
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory())
    throw new DatasetError(dir, '(--mask-dir) is not a folder', 'pass the folder that holds the masks, named as the training images');
  const masks = new Map<string, string>();
  const walk = (rel: string): void => {
    for (const ent of fs.readdirSync(path.join(dir, rel), { withFileTypes: true })) {
      if (ent.name.startsWith('.')) continue;
      const child = rel ? `${rel}/${ent.name}` : ent.name;
      if (ent.isDirectory()) walk(child);
      else if (IMAGE_EXTENSIONS.includes(path.extname(ent.name).toLowerCase())) {
        const prev = masks.get(stem(child));
        if (prev) throw new DatasetError(path.join(dir, child), `and ${prev} are both masks of the image ${stem(child)}.*`, 'keep one mask per image');
        masks.set(stem(child), child);
      }
    }
  };
  walk('');
  // Item paths relative to the dataset root; the mask folder mirrors the images' folder (captions.json: images/).
  const key = (d: Dataset, file: string): string => stem(d.layout === 'captions.json' && file.startsWith('images/') ? file.slice('images/'.length) : file);
  const known = new Set(all.flatMap((d) => d.items.map((it) => key(d, it.file))));
  const orphans = [...masks.entries()].filter(([k]) => !known.has(k)).map(([, f]) => f);
  if (orphans.length)
    throw new DatasetError(dir, `holds ${orphans.length} mask(s) with no training image of the same name: ${orphans.slice(0, 10).join(', ')}${orphans.length > 10 ? ', ...' : ''}`, 'name each mask as its image (same relative path, any image extension), or remove it');
  const out = ds.items.map((it) => {
    const m = masks.get(key(ds, it.file));
    return m === undefined ? undefined : path.join(dir, m);
  });
  await mapLimit(
    out.map((m, i) => [m, i] as const).filter(([m]) => m !== undefined),
    8,
    async ([m, i]) => {
      const it = ds.items[i];
      let h;
      try {
        h = await readImageHeader(m!);
      } catch (e) {
        throw new DatasetError(m!, `is not a readable image (${(e as Error).message})`, 'replace the mask with a PNG (white = full weight, black = ignored)');
      }
      if (it.width > 0 && (h.width !== it.width || h.height !== it.height))
        throw new DatasetError(m!, `is ${h.width}x${h.height} but its image ${it.file} is ${it.width}x${it.height}`, 'make each mask the size of its image');
    },
  );
  return out;
}
