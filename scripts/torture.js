#!/usr/bin/env node
// Crash torture of the real CLI (the long form of test/train-crash.test.ts), for release checks and closing notes:
//
//   node scripts/torture.js [--kills 60] [--signals 20] [--seed 1] [--work DIR]
//
// 1. kill -9 at seeded random moments (after a random step is logged, plus 0-80 ms: mid-step or inside the
//    checkpoint write of that step), resuming with --resume-from-checkpoint latest after each kill, until --kills
//    kills happened; every resume must start, every checkpoint that `latest` can pick must verify in full, and the
//    final LoRA of each completed run must equal an uninterrupted run's bit for bit.
// 2. SIGINT / SIGTERM (alternating) after a random step: exit 130 / 143, a checkpoint of the last completed step with
//    reason "signal", and a resume that finishes bit-identical.
// Prints one JSON summary line; exit 1 when any count that must be 0 is not.
'use strict';
const { spawn, spawnSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

const root = path.resolve(__dirname, '..');
const cli = path.join(root, 'dist', 'cli.js');
const model = path.join(root, 'test', 'fixtures', 'models', 'tiny');
const arg = (name, def) => {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : def;
};
const KILLS = Number(arg('--kills', 60));
const SIGNALS = Number(arg('--signals', 20));
let seed = Number(arg('--seed', 1)) >>> 0 || 1;
const rand = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
const work = arg('--work', fs.mkdtempSync(path.join(os.tmpdir(), 'tl-torture-')));
const STEPS = 12;
const { CheckpointManager } = require(path.join(root, 'dist', 'checkpoint', 'manager.js'));
const { makeDemoData } = require(path.join(root, 'dist', 'data', 'demo-data.js'));

function args(out, resume) {
  return [cli, '--pretrained-model-name-or-path', model, '--train-data-dir', path.join(work, 'data'), '--output-dir', out,
    '--device', 'cpu', '--resolution', '32', '--train-batch-size', '2', '--gradient-accumulation-steps', '2',
    '--max-train-steps', String(STEPS), '--learning-rate', '1e-3', '--lr-warmup-steps', '2', '--checkpointing-steps', '1',
    '--checkpoints-total-limit', '2', '--rank', '4', '--random-flip', '--seed', '11',
    ...(resume ? ['--resume-from-checkpoint', 'latest'] : [])];
}

function runAndSignal(out, resume, sig, step, delayMs) {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, args(out, resume), { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let sent = false;
    const re = new RegExp(`"step":${step},[^\\n]*"msg":"step"`);
    child.stdout.on('data', (d) => {
      stdout += d.toString();
      if (!sent && re.test(stdout)) {
        sent = true;
        setTimeout(() => child.kill(sig), delayMs);
      }
    });
    child.stderr.on('data', () => {});
    child.on('exit', (code, signal) => resolve({ code, signal, stdout }));
  });
}

async function validCheckpointsVerify(out) {
  const mgr = new CheckpointManager(out);
  let bad = 0;
  for (const e of await mgr.list('quick')) if (e.valid && !(await mgr.verifyEntry(e.name)).valid) bad++;
  return bad;
}

async function main() {
  await makeDemoData(path.join(work, 'data'), { count: 6, size: 40, seed: 3 });
  const ref = spawnSync(process.execPath, args(path.join(work, 'reference'), false), { encoding: 'utf8' });
  if (ref.status !== 0) throw new Error(`reference run failed: ${ref.stderr}`);
  const reference = fs.readFileSync(path.join(work, 'reference', 'pytorch_lora_weights.safetensors'));
  const s = { kills: 0, killsDuringSave: 0, failedResumes: 0, invalidCheckpointsOffered: 0, runs: 0, finalIdentical: 0, finalDifferent: 0, signals: 0, signalWrongExit: 0, signalLostStep: 0, signalFinalDifferent: 0 };
  let run = 0;
  while (s.kills < KILLS) {
    const out = path.join(work, `kill-${run++}`);
    let resume = false;
    let done = 0; // last step this run logged: the next kill comes after a later one
    for (;;) {
      if (done >= STEPS - 1) break;
      const step = done + 1 + Math.floor(rand() * Math.min(3, STEPS - 1 - done));
      const r = await runAndSignal(out, resume, 'SIGKILL', step, Math.floor(rand() * 80));
      if (r.code === 0) break;
      if (r.signal !== 'SIGKILL') {
        s.failedResumes++;
        break;
      }
      s.kills++;
      done = Math.max(done, ...[...r.stdout.matchAll(/"step":(\d+),[^\n]*"msg":"step"/g)].map((m) => Number(m[1])));
      // Every step starts a background save of its checkpoint: a kill before "saved .../checkpoint-<step>" is logged
      // landed while that checkpoint was being written.
      if (!new RegExp(`saved [^"]*checkpoint-${step} `).test(r.stdout)) s.killsDuringSave++;
      s.invalidCheckpointsOffered += await validCheckpointsVerify(out);
      resume = true;
      if (s.kills >= KILLS) break;
    }
    const fin = spawnSync(process.execPath, args(out, true), { encoding: 'utf8' });
    if (fin.status !== 0) s.failedResumes++;
    else {
      s.runs++;
      if (fs.readFileSync(path.join(out, 'pytorch_lora_weights.safetensors')).equals(reference)) s.finalIdentical++;
      else s.finalDifferent++;
    }
  }
  for (let i = 0; i < SIGNALS; i++) {
    const sig = i % 2 ? 'SIGTERM' : 'SIGINT';
    const out = path.join(work, `signal-${i}`);
    const step = 1 + Math.floor(rand() * (STEPS - 2));
    const r = await runAndSignal(out, false, sig, step, Math.floor(rand() * 80));
    s.signals++;
    if (r.code !== (sig === 'SIGINT' ? 130 : 143)) {
      if (r.code !== 0) s.signalWrongExit++;
      continue;
    }
    const done = Math.max(...[...r.stdout.matchAll(/"step":(\d+),[^\n]*"msg":"step"/g)].map((m) => Number(m[1])));
    const latest = await new CheckpointManager(out).latest();
    if (latest?.step !== done) s.signalLostStep++;
    const fin = spawnSync(process.execPath, args(out, true), { encoding: 'utf8' });
    if (fin.status !== 0 || !fs.readFileSync(path.join(out, 'pytorch_lora_weights.safetensors')).equals(reference)) s.signalFinalDifferent++;
  }
  console.log(JSON.stringify({ work, ...s }));
  const bad = s.failedResumes + s.invalidCheckpointsOffered + s.finalDifferent + s.signalWrongExit + s.signalLostStep + s.signalFinalDifferent;
  process.exit(bad ? 1 : 0);
}

main().catch((e) => {
  console.error(e);
  process.exit(2);
});
