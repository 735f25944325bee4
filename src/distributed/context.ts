/**
 * What the training loop needs to know about data parallelism: this process's rank, the world size, and a few
 * collectives (averaging numbers, a stop flag, barriers). One process alone gets a context whose collectives are
 * no-ops, so the loop has a single code path. Every rank must call the collectives in the same order.
 */
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
