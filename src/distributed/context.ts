/**
 * What the training loop needs to know about data parallelism: this process's rank, the world size, and a few
 * collectives (averaging numbers, a stop flag, barriers). One process alone gets a context whose collectives are
 * no-ops, so the loop has a single code path. Every rank must call the collectives in the same order.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import { writeJsonDurable } from '../checkpoint/fsutil';
import { randomStatesFile } from '../checkpoint/state';
import { native, type ProcessGroupHandle, type TrainerHandle } from '../native';
import type { DistEnv } from './env';

export interface DistContext {
  rank: number;
  worldSize: number;
  localRank: number;
  /** Rank 0: logs, progress, validation, checkpoints, final exports. */
  isMain: boolean;
  timeoutMs: number;
  /** Element-wise reduction of a few numbers over all ranks. */
  allReduce(values: number[], op?: 'sum' | 'max' | 'min'): Promise<number[]>;
  /** Waits for every rank (fails after `timeoutMs`, naming `what`). */
  barrier(what: string, timeoutMs?: number): Promise<void>;
  /** The trainer draws its rows of each global batch and averages gradients before clipping. */
  attach(trainer: TrainerHandle): Promise<void>;
  destroy(): Promise<void>;
}

export function singleProcess(): DistContext {
  return {
    rank: 0,
    worldSize: 1,
    localRank: 0,
    isMain: true,
    timeoutMs: 0,
    allReduce: async (values) => values,
    barrier: async () => undefined,
    attach: async () => undefined,
    destroy: async () => undefined,
  };
}

export interface DistInitOptions {
  backend: 'gloo' | 'nccl';
  timeoutMs: number;
  /** The training device (where nccl reduces). */
  device: string;
}

/** Joins the process group the environment describes (blocks until every rank is there, or times out). */
export async function initDistributed(env: DistEnv, o: DistInitOptions): Promise<DistContext> {
  let group: ProcessGroupHandle | undefined = await native().distInit({
    backend: o.backend,
    masterAddr: env.masterAddr,
    masterPort: env.masterPort,
    rank: env.rank,
    worldSize: env.worldSize,
    timeoutMs: o.timeoutMs,
    device: o.device,
  });
  const g = (): ProcessGroupHandle => {
    if (!group) throw new Error('the process group was destroyed');
    return group;
  };
  return {
    rank: env.rank,
    worldSize: env.worldSize,
    localRank: env.localRank,
    isMain: env.rank === 0,
    timeoutMs: o.timeoutMs,
    allReduce: (values, op = 'sum') => native().distAllReduce(g(), values, op),
    barrier: (what, timeoutMs = o.timeoutMs) => native().distBarrier(g(), timeoutMs, what),
    attach: (trainer) => native().distAttachTrainer(g(), trainer),
    destroy: async () => {
      if (!group) return;
      const h = group;
      group = undefined;
      await native().distDestroy(h);
    },
  };
}

/** The backend for a device: nccl for CUDA when this build has it, else gloo. */
export function pickBackend(requested: 'auto' | 'gloo' | 'nccl', device: string): 'gloo' | 'nccl' {
  const have = native().distBackends();
  if (requested !== 'auto') {
    if (!have.includes(requested)) throw new Error(`--dist-backend ${requested} is not available in this build (available: ${have.join(', ')})`);
    return requested;
  }
  return device.startsWith('cuda') && have.includes('nccl') ? 'nccl' : 'gloo';
}

// ---- per-rank checkpoint parts ----
//
// Every rank's RNG state goes into the checkpoint as random_states_<rank>.json. Ranks other than 0 write theirs
// into a staging folder `.tmp-rank<r>-checkpoint-<step>-<pid>` beside the checkpoints (the .tmp- prefix and pid
// let CheckpointManager.cleanStale remove it after a crash), then every rank meets at a barrier; rank 0 then
// moves the parts into the checkpoint before its manifest is written, and refuses to seal it if one is missing.

const PART_RE = (step: number) => new RegExp(`^\\.tmp-rank(\\d+)-checkpoint-${step}-\\d+$`);

export function writeRankPart(checkpointsDir: string, step: number, rank: number, content: unknown): void {
  fs.mkdirSync(checkpointsDir, { recursive: true });
  const dir = path.join(checkpointsDir, `.tmp-rank${rank}-checkpoint-${step}-${process.pid}`);
  fs.rmSync(dir, { recursive: true, force: true });
  fs.mkdirSync(dir);
  writeJsonDurable(path.join(dir, randomStatesFile(rank)), content);
}

/** Moves ranks 1..worldSize-1's parts of checkpoint `step` into `tmpDir`; throws naming the missing ranks. */
export function collectRankParts(checkpointsDir: string, step: number, worldSize: number, tmpDir: string): void {
  const found = new Map<number, string>();
  for (const n of fs.existsSync(checkpointsDir) ? fs.readdirSync(checkpointsDir) : []) {
    const m = PART_RE(step).exec(n);
    if (m) found.set(Number(m[1]), path.join(checkpointsDir, n));
  }
  const missing: number[] = [];
  for (let r = 1; r < worldSize; r++) {
    const f = found.has(r) ? path.join(found.get(r)!, randomStatesFile(r)) : undefined;
    if (!f || !fs.existsSync(f)) missing.push(r);
    else fs.copyFileSync(f, path.join(tmpDir, randomStatesFile(r)));
  }
  if (missing.length)
    throw new Error(`checkpoint-${step}: the random state of rank(s) ${missing.join(', ')} is missing (a rank failed during the save); the checkpoint is not sealed`);
}

/** Removes the staging folders of checkpoint `step` (after it was sealed or failed). */
export function removeRankParts(checkpointsDir: string, step: number): void {
  for (const n of fs.existsSync(checkpointsDir) ? fs.readdirSync(checkpointsDir) : [])
    if (PART_RE(step).test(n)) fs.rmSync(path.join(checkpointsDir, n), { recursive: true, force: true });
}
