import * as fs from 'node:fs';
import * as path from 'node:path';

import { native, type HostTensor, type TrainerHandle } from '../../src/native';
import { byName, relativeError, toNumbers } from '../../src/tensors';

/** `a - b`, as float32 with a's name and shape. */
export function sub(a: HostTensor, b: HostTensor): HostTensor {
  const x = toNumbers(a);
  const y = toNumbers(b);
  return { name: a.name, dtype: 'F32', shape: a.shape, data: new Uint8Array(Float32Array.from(x, (v, i) => v - y[i]).buffer) };
}

/** Starts the trainer from `adapters`: written as `dir`/model.safetensors, then loaded as a state. */
export async function loadAdapters(trainer: TrainerHandle, dir: string, adapters: HostTensor[]): Promise<void> {
  fs.mkdirSync(dir, { recursive: true });
  await native().safetensorsWrite(path.join(dir, 'model.safetensors'), adapters);
  await native().trainerLoadState(trainer, dir);
}

/** Saves the trainer's state into `dir` and reads its adapters back (model.safetensors), by name. */
export async function savedAdapters(trainer: TrainerHandle, dir: string): Promise<Map<string, HostTensor>> {
  fs.mkdirSync(dir, { recursive: true });
  await native().trainerSaveState(trainer, dir);
  return byName((await native().safetensorsRead(path.join(dir, 'model.safetensors'))).tensors);
}

/**
 * Every trained adapter in `got` equals the reference's `lora.<key>` in `expected` to relative error `tol`. lora_A
 * barely moves relative to its size, so for it the update from `init` is compared, to 10 x `tol`. Returns the keys.
 */
export function expectAdaptersMatch(got: Map<string, HostTensor>, expected: Map<string, HostTensor>, init: Map<string, HostTensor>, tol: number): string[] {
  for (const [key, t] of got) {
    const want = expected.get(`lora.${key}`);
    expect([key, want !== undefined]).toEqual([key, true]);
    const ok = key.endsWith('lora_A.weight') ? relativeError(sub(t, init.get(key)!), sub(want!, init.get(key)!)) < tol * 10 : relativeError(t, want!) < tol;
    expect({ key, ok }).toEqual({ key, ok: true });
  }
  return [...got.keys()];
}

/** The tensors named `prefix`X, renamed X (a reference's initial adapters stored beside its other tensors). */
export function renamedFrom(prefix: string, tensors: Map<string, HostTensor>): HostTensor[] {
  return [...tensors.values()].filter((t) => t.name.startsWith(prefix)).map((t) => ({ ...t, name: t.name.slice(prefix.length) }));
}
