/**
 * The process layout of a data-parallel run: torchrun's environment contract (WORLD_SIZE, RANK, LOCAL_RANK,
 * LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), which `train-lora --num-processes N` also sets for the workers it
 * starts, and the launch plan that the flags --num-processes/--nnodes/--node-rank/--master-addr/--master-port give.
 */
import * as net from 'node:net';

import type { TrainConfig } from '../config';

export interface DistEnv {
  rank: number;
  worldSize: number;
  localRank: number;
  localWorldSize: number;
  masterAddr: string;
  masterPort: number;
}

export const DEFAULT_MASTER_PORT = 29500;

function intVar(env: NodeJS.ProcessEnv, name: string, min: number, def?: number): number {
  const raw = env[name];
  if (raw === undefined || raw === '') {
    if (def !== undefined) return def;
    throw new Error(`${name} is not set: a distributed worker needs WORLD_SIZE, RANK and MASTER_ADDR/MASTER_PORT (torchrun sets them; so does train-lora --num-processes N)`);
  }
  const v = Number(raw);
  if (!Number.isSafeInteger(v) || v < min) throw new Error(`${name}=${raw} must be an integer >= ${min}`);
  return v;
}

/** The worker's place in the group from the environment, or undefined when WORLD_SIZE is not set. */
export function distEnvFromProcess(env: NodeJS.ProcessEnv = process.env): DistEnv | undefined {
  if (env.WORLD_SIZE === undefined || env.WORLD_SIZE === '') return undefined;
  const worldSize = intVar(env, 'WORLD_SIZE', 1);
  const rank = intVar(env, 'RANK', 0);
  if (rank >= worldSize) throw new Error(`RANK=${rank} must be < WORLD_SIZE=${worldSize}`);
  const localRank = intVar(env, 'LOCAL_RANK', 0, rank);
  const localWorldSize = intVar(env, 'LOCAL_WORLD_SIZE', 1, worldSize);
  const masterPort = intVar(env, 'MASTER_PORT', 1, DEFAULT_MASTER_PORT);
  if (masterPort > 65535) throw new Error(`MASTER_PORT=${masterPort} must be <= 65535`);
  return { rank, worldSize, localRank, localWorldSize, masterAddr: env.MASTER_ADDR || '127.0.0.1', masterPort };
}

export type LaunchPlan =
  | { kind: 'single' }
  | { kind: 'worker'; env: DistEnv }
  | { kind: 'supervise'; nprocs: number; nnodes: number; nodeRank: number; masterAddr: string; masterPort?: number };

/** What this process does: train alone, be one worker of a group, or start and supervise the local workers. */
export function launchPlan(cfg: Pick<TrainConfig, 'num_processes' | 'nnodes' | 'node_rank' | 'master_addr' | 'master_port'>, env: NodeJS.ProcessEnv = process.env): LaunchPlan {
  const denv = distEnvFromProcess(env);
  if (denv) return denv.worldSize > 1 ? { kind: 'worker', env: denv } : { kind: 'single' };
  if (cfg.node_rank >= cfg.nnodes) throw new Error(`--node-rank ${cfg.node_rank} must be < --nnodes ${cfg.nnodes}`);
  if (cfg.num_processes * cfg.nnodes === 1) return { kind: 'single' };
  if (cfg.nnodes > 1 && !cfg.master_addr)
    throw new Error(`--nnodes ${cfg.nnodes} needs --master-addr (the address of node 0, reachable from every node) and the same --master-port on every node`);
  return {
    kind: 'supervise',
    nprocs: cfg.num_processes,
    nnodes: cfg.nnodes,
    nodeRank: cfg.node_rank,
    masterAddr: cfg.master_addr ?? '127.0.0.1',
    masterPort: cfg.master_port ?? (cfg.nnodes > 1 ? DEFAULT_MASTER_PORT : undefined),
  };
}

/** A TCP port that was free a moment ago on this host (for the single-node rendezvous). */
export function freePort(host = '127.0.0.1'): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, host, () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}
