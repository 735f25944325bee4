/**
 * `train-lora --num-processes N`: starts N local worker processes (the same command line, with torchrun's
 * environment contract set) and supervises them. SIGINT/SIGTERM are forwarded once to every worker (they finish
 * the step, save together and exit 130/143). When a worker dies abnormally, the others get SIGTERM and, after a
 * grace period, SIGKILL; the exit code is the failed worker's (128 + signal number when a signal killed it) and the
 * message names its rank, pid and cause. Workers run in their own process group, so a terminal's Ctrl+C reaches
 * them only through the supervisor; an IPC channel tells them when the supervisor itself is gone.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as os from 'node:os';

import { freePort } from './env';

export interface SuperviseOptions {
  /** Local workers. */
  nprocs: number;
  nnodes: number;
  nodeRank: number;
  masterAddr: string;
  /** Default: a free port (single node). */
  masterPort?: number;
  /** The worker's arguments after the node executable (script path first). */
  args: string[];
  info(msg: string): void;
  error(msg: string): void;
  /** SIGTERM -> SIGKILL grace period (default 30 s, or TRAIN_LORA_KILL_GRACE_MS). */
  graceMs?: number;
}

interface Worker {
  rank: number;
  child: ChildProcess;
  exited: boolean;
}

function describeExit(code: number | null, signal: NodeJS.Signals | null): string {
  return signal ? `was killed by ${signal}` : `exited with code ${code}`;
}

export async function superviseWorkers(o: SuperviseOptions): Promise<number> {
  const worldSize = o.nprocs * o.nnodes;
  const port = o.masterPort ?? (await freePort(o.masterAddr === 'localhost' ? '127.0.0.1' : o.masterAddr));
  const graceMs = o.graceMs ?? Number(process.env.TRAIN_LORA_KILL_GRACE_MS ?? 30000);
  o.info(`starting ${o.nprocs} worker process(es): ranks ${o.nodeRank * o.nprocs}..${(o.nodeRank + 1) * o.nprocs - 1} of ${worldSize}, rendezvous at ${o.masterAddr}:${port}`);
  const workers: Worker[] = [];
  let forwarded: NodeJS.Signals | undefined;
  let failure: { rank: number; pid: number; code: number | null; signal: NodeJS.Signals | null } | undefined;
  let killTimer: NodeJS.Timeout | undefined;

  const live = () => workers.filter((w) => !w.exited);
  const signalAll = (sig: NodeJS.Signals) => {
    for (const w of live()) {
      try {
        w.child.kill(sig);
      } catch {
        // already gone
      }
    }
  };
  const onSignal = (sig: NodeJS.Signals) => {
    if (forwarded) o.error(`second ${sig}: the workers abort without saving`);
    else o.info(`${sig}: asking every worker to finish its step, save and stop`);
    forwarded = sig;
    signalAll(sig);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  const done = new Promise<void>((resolve) => {
    let left = o.nprocs;
    for (let i = 0; i < o.nprocs; i++) {
      const rank = o.nodeRank * o.nprocs + i;
      const env = {
        ...process.env,
        RANK: String(rank),
        LOCAL_RANK: String(i),
        WORLD_SIZE: String(worldSize),
        LOCAL_WORLD_SIZE: String(o.nprocs),
        GROUP_RANK: String(o.nodeRank),
        MASTER_ADDR: o.masterAddr,
        MASTER_PORT: String(port),
        TRAIN_LORA_SUPERVISED: '1',
      };
      const child = spawn(process.execPath, o.args, { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], env, detached: true });
      const w: Worker = { rank, child, exited: false };
      workers.push(w);
      o.info(`started rank ${rank} (pid ${child.pid})`);
      child.on('error', (e) => o.error(`rank ${rank}: ${e.message}`));
      child.on('exit', (code, signal) => {
        w.exited = true;
        const expected = code === 0 || (forwarded !== undefined && (code === 130 || code === 143));
        if (!expected && !failure) {
          failure = { rank, pid: child.pid ?? -1, code, signal };
          const others = live();
          o.error(`rank ${rank} (pid ${child.pid}) ${describeExit(code, signal)}${others.length ? `: stopping the other ${others.length} worker(s)` : ''}`);
          signalAll('SIGTERM');
          if (others.length) {
            killTimer = setTimeout(() => {
              const stuck = live();
              if (stuck.length) o.error(`rank(s) ${stuck.map((s) => s.rank).join(', ')} did not stop within ${graceMs} ms of SIGTERM: SIGKILL`);
              signalAll('SIGKILL');
            }, graceMs);
            killTimer.unref();
          }
        }
        if (--left === 0) resolve();
      });
    }
  });
  try {
    await done;
  } finally {
    if (killTimer) clearTimeout(killTimer);
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
  if (failure) {
    const f = failure;
    const code = f.signal ? 128 + (os.constants.signals[f.signal] ?? 0) : (f.code ?? 1);
    o.error(`distributed training failed: rank ${f.rank} (pid ${f.pid}) ${describeExit(f.code, f.signal)}; exit code ${code}. The last sealed checkpoint is intact: resume with --resume-from-checkpoint latest (any --num-processes).`);
    return code;
  }
  if (forwarded) return forwarded === 'SIGINT' ? 130 : 143;
  return 0;
}
