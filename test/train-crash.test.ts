/**
 * Crash safety of the real CLI as a child process: kill -9 at random moments (including during checkpoint
 * writes) and resume, many times; SIGINT and SIGTERM save and exit with the signal's code losing no completed
 * step. The final LoRA must equal an uninterrupted run bit for bit.
 */
import { spawn, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';

import { CheckpointManager } from '../src/checkpoint/manager';
import { makeDemoData } from '../src/data/demo-data';
import { tinyCliArgs } from './helpers/tiny-run';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'tl-crash-'));
const data = path.join(tmp, 'data');
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

const STEPS = 12;
function args(out: string, resume: boolean): string[] {
  return tinyCliArgs(out, data, {
    train_batch_size: 2, gradient_accumulation_steps: 2, max_train_steps: STEPS, learning_rate: 1e-3, lr_warmup_steps: 2,
    checkpointing_steps: 1, checkpoints_total_limit: 2, rank: 4, random_flip: true, seed: 11,
    resume_from_checkpoint: resume ? 'latest' : undefined,
  });
}

function runToEnd(out: string, resume: boolean): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, args(out, resume), { encoding: 'utf8', timeout: 240000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Starts a run and signals it once `when(stdoutSoFar)` is true or after `ms`. Resolves with the exit. */
function runAndSignal(out: string, resume: boolean, sig: NodeJS.Signals, trigger: { ms?: number; line?: RegExp; delayMs?: number }): Promise<{ code: number | null; signal: NodeJS.Signals | null; stdout: string }> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, args(out, resume), { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let sent = false;
    const send = () => {
      if (!sent) {
        sent = true;
        child.kill(sig);
      }
    };
    child.stdout.on('data', (d: Buffer) => {
      stdout += d.toString();
      if (trigger.line && trigger.line.test(stdout)) setTimeout(send, trigger.delayMs ?? 0);
    });
    child.stderr.on('data', () => {});
    if (trigger.ms !== undefined) setTimeout(send, trigger.ms);
    child.on('exit', (code, signal) => resolve({ code, signal, stdout }));
  });
}

let reference: Buffer;
beforeAll(async () => {
  await makeDemoData(data, { count: 6, size: 40, seed: 3 });
  const out = path.join(tmp, 'reference');
  const r = runToEnd(out, false);
  if (r.status !== 0) throw new Error(`reference run failed (${r.status}):\n${r.stderr}\n${r.stdout.slice(-2000)}`);
  reference = fs.readFileSync(path.join(out, 'pytorch_lora_weights.safetensors'));
});

test('kill -9 at random moments, resumed each time: never a corrupt checkpoint, final weights bit-identical', async () => {
  const out = path.join(tmp, 'torture');
  // Kills tied to progress, not to the clock (so they happen on a fast or a slow machine): after step 2, 4, ..., 10
  // is logged, plus a seeded delay of 0-60 ms that lands mid-step or during the checkpoint write of that step.
  let s = 12345;
  const rand = () => ((s = (s * 1103515245 + 12345) >>> 0) / 2 ** 32);
  let kills = 0;
  for (let round = 0; round < 5; round++) {
    const target = 2 + 2 * round;
    const r = await runAndSignal(out, round > 0, 'SIGKILL', { line: new RegExp(`"step":${target},`), delayMs: Math.floor(rand() * 60), ms: 200000 });
    if (r.code === 0) break; // finished before the kill
    expect(r.signal).toBe('SIGKILL');
    kills++;
    // Whatever happened, every checkpoint that `latest` can pick verifies fully.
    const mgr = new CheckpointManager(out);
    for (const e of await mgr.list('quick')) if (e.valid) expect((await mgr.verifyEntry(e.name)).valid).toBe(true);
  }
  expect(kills).toBeGreaterThanOrEqual(3);
  const last = runToEnd(out, true);
  expect(last.status).toBe(0);
  expect(fs.readFileSync(path.join(out, 'pytorch_lora_weights.safetensors')).equals(reference)).toBe(true);
  // No stale temporary folder survives a successful run.
  expect(fs.readdirSync(path.join(out, 'checkpoints')).filter((n) => n.startsWith('.tmp-'))).toEqual([]);
}, 900000);

test.each([
  ['SIGINT', 130],
  ['SIGTERM', 143],
] as const)('%s finishes the step, saves, exits %d, and the resume loses no step', async (sig, code) => {
  const out = path.join(tmp, `signal-${sig}`);
  // Signal right after step 3 is logged.
  const r = await runAndSignal(out, false, sig, { line: /"step":3,[^\n]*"msg":"step"/ });
  expect(r.code).toBe(code);
  const stepsDone = [...r.stdout.matchAll(/"step":(\d+),[^\n]*"msg":"step"/g)].map((m) => Number(m[1]));
  const lastDone = Math.max(...stepsDone);
  const latest = await new CheckpointManager(out).latest();
  expect(latest?.step).toBe(lastDone);
  expect(latest?.manifest?.reason).toBe('signal');
  expect(r.stdout).toMatch(/resume with: npx train-lora .*--resume-from-checkpoint latest/);
  const rest = runToEnd(out, true);
  expect(rest.status).toBe(0);
  const resumedSteps = [...rest.stdout.matchAll(/"step":(\d+),[^\n]*"msg":"step"/g)].map((m) => Number(m[1]));
  expect(resumedSteps[0]).toBe(lastDone + 1);
  expect(fs.readFileSync(path.join(out, 'pytorch_lora_weights.safetensors')).equals(reference)).toBe(true);
}, 600000);
