/** `train-lora checkpoints list|verify|keep|export` and `train-lora list-runs`. */
import * as fs from 'node:fs';
import * as path from 'node:path';

import type { Argv } from 'yargs';

import { CheckpointManager, inspectLock, markKeep, verifyCheckpoint, type CheckpointEntry } from '../checkpoint/manager';
import { formatBytes } from '../checkpoint/fsutil';
import { MODEL_FILE, TRAINER_STATE_FILE } from '../checkpoint/state';
import { exportCheckpoint, type CheckpointExportOptions } from '../export/lora-export';
import { type LoraFileFormat, native } from '../native';
import type { TrainerStateFile } from '../train/train';

function readState(dir: string): TrainerStateFile | undefined {
  try {
    return JSON.parse(fs.readFileSync(path.join(dir, TRAINER_STATE_FILE), 'utf8')) as TrainerStateFile;
  } catch {
    return undefined;
  }
}

/**
 * A table of the run's checkpoints: step, epoch, time, size, loss, latest / best, valid or not. Without `full` each one
 * gets the quick check (its files exist with the manifest's sizes: "size ok (quick check; --full hashes)"), except the
 * one marked latest and any newer ones, which are verified in full as `--resume-from-checkpoint latest` verifies them
 * (so "latest" is the checkpoint a resume would take). With `full` every one is hashed and its content checked.
 */
export async function listCheckpoints(runDir: string, full = false): Promise<string> {
  const mgr = new CheckpointManager(runDir);
  let entries = await mgr.list(full ? 'full' : 'quick');
  if (!entries.length) return `${mgr.dir}: no checkpoints`;
  const best = mgr.readBest();
  const verified = new Set<number>(full ? entries.map((e) => e.step) : []);
  if (!full) {
    const checked = new Map<number, CheckpointEntry>();
    const latest = await mgr.latest((e) => checked.set(e.step, e));
    if (latest) checked.set(latest.step, latest);
    for (const s of checked.keys()) verified.add(s);
    entries = entries.map((e) => checked.get(e.step) ?? e);
  }
  const latest = entries.find((e) => e.valid && verified.has(e.step));
  const rows = [['checkpoint', 'step', 'epoch', 'saved', 'size', 'train_loss', 'flags', 'status']];
  for (const e of entries) {
    const st = readState(e.path);
    const flags = [e === latest ? 'latest' : '', best?.step === e.step ? 'best' : '', e.kept ? 'kept' : '', e.manifest?.reason ?? ''].filter(Boolean).join(',');
    rows.push([
      e.name,
      String(e.step),
      st ? String(st.epoch) : '-',
      e.manifest?.created.replace('T', ' ').slice(0, 19) ?? '-',
      formatBytes(e.size),
      st?.train_loss != null ? st.train_loss.toFixed(4) : '-',
      flags || '-',
      !e.valid ? `INVALID: ${e.problem}` : verified.has(e.step) ? 'ok (sha256 and content verified)' : 'size ok (quick check; --full hashes)',
    ]);
  }
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]))).join('  ')).join('\n');
}

export async function verifyCommand(p: string): Promise<{ ok: boolean; text: string }> {
  const e: CheckpointEntry = await verifyCheckpoint(path.resolve(p));
  if (!e.valid) return { ok: false, text: `${e.path}: INVALID — ${e.problem}` };
  // Shapes match the run's configuration: every LoRA pair has the recorded rank.
  const st = readState(e.path);
  const h = await native().safetensorsHeader(path.join(e.path, MODEL_FILE));
  if (st && st.config.train_mode === 'lora') {
    // 3x3 conv adapters (lora_A [r, in, k, k] with k > 1) have --conv-rank, the others --rank.
    const convRank = (st.config as { conv_rank?: number }).conv_rank;
    const aShape = new Map(h.tensors.filter((t) => t.name.endsWith('lora_A.weight')).map((t) => [t.name.slice(0, -'lora_A.weight'.length), t.shape]));
    for (const t of h.tensors) {
      const isA = t.name.endsWith('lora_A.weight');
      if (!isA && !t.name.endsWith('lora_B.weight')) continue;
      const r = isA ? t.shape[0] : t.shape[1];
      const a = aShape.get(t.name.slice(0, -'lora_X.weight'.length));
      const conv3 = a !== undefined && a.length === 4 && (a[2] > 1 || a[3] > 1);
      const want = conv3 ? convRank : st.config.rank;
      const flag = conv3 ? 'conv_rank' : 'rank';
      if (r !== want) return { ok: false, text: `${e.path}: INVALID — ${t.name} has rank ${r}, ${TRAINER_STATE_FILE} says ${flag} ${want}` };
    }
  }
  return { ok: true, text: `${e.path}: ok (step ${e.step}, ${Object.keys(e.manifest!.files).length} files verified by sha256 and their content checked, ${h.tensors.length} tensors)` };
}

export function keepCommand(p: string): string {
  markKeep(path.resolve(p));
  return `${p}: kept (retention will never delete it)`;
}

/**
 * `train-lora checkpoints export PATH --format diffusers|peft|kohya [--merge] [--out DIR|FILE.safetensors] [--model DIR]`:
 * the checkpoint's LoRA in the requested formats (see src/export/lora-export.ts). Returns the report line.
 */
export async function exportCommand(p: string, opts: CheckpointExportOptions): Promise<string> {
  let line = '';
  await exportCheckpoint(p, opts, (m) => (line = m));
  return line;
}

/** Every run under a folder: base model, steps done/total, last and best checkpoint, status, size. */
export async function listRuns(root = 'outputs'): Promise<string> {
  if (!fs.existsSync(root)) return `${root}: no runs`;
  const rows = [['run', 'base model', 'steps', 'last checkpoint', 'best', 'status', 'size']];
  for (const name of fs.readdirSync(root).sort()) {
    const dir = path.join(root, name);
    if (!fs.existsSync(path.join(dir, 'checkpoints'))) continue;
    const mgr = new CheckpointManager(dir);
    const entries = await mgr.list('quick');
    const last = entries.find((e) => e.valid);
    const st = last ? readState(last.path) : undefined;
    const best = mgr.readBest();
    let status = 'interrupted';
    if (st && st.global_step >= st.max_train_steps) status = 'finished';
    // Running only while the lock's process is the one that took it (a stale lock's pid may belong to another program now).
    const lock = inspectLock(path.join(dir, 'train-lora.lock'));
    if (lock.status === 'live') status = 'running';
    else if (lock.status === 'unknown' && lock.holder?.host) status = `locked (host ${lock.holder.host})`;
    let size = 0;
    for (const e of entries) size += e.size;
    rows.push([
      name,
      st ? path.basename(st.base_model.path) : '-',
      st ? `${st.global_step}/${st.max_train_steps}` : '-',
      last?.name ?? '-',
      best ? `checkpoint-${best.step} (${best.metric} ${best.value.toFixed(4)})` : '-',
      status,
      formatBytes(size),
    ]);
  }
  if (rows.length === 1) return `${root}: no runs`;
  const widths = rows[0].map((_, i) => Math.max(...rows.map((r) => r[i].length)));
  return rows.map((r) => r.map((c, i) => c.padEnd(widths[i])).join('  ')).join('\n');
}

/** `checkpoints list|verify|keep|export`. */
export function checkpointsCommand<T>(cli: Argv<T>): Argv<T> {
  return cli.command('checkpoints', 'Inspect, verify, keep and export checkpoints', (y) =>
    y
      .command('list <run>', 'List a run\'s checkpoints (step, epoch, time, size, loss, latest/best, valid)', (c) =>
        c.positional('run', { type: 'string', demandOption: true }).option('full', { type: 'boolean', default: false, describe: 'verify sha256 of every file' }),
        async (a) => console.log(await listCheckpoints(a.run, a.full)))
      .command('verify <path>', 'Verify a checkpoint: manifest hashes, every file parses, shapes match (exit 0/1)', (c) => c.positional('path', { type: 'string', demandOption: true }),
        async (a) => {
          const r = await verifyCommand(a.path);
          console.log(r.text);
          if (!r.ok) process.exitCode = 1;
        })
      .command('keep <path>', 'Never delete this checkpoint in retention', (c) => c.positional('path', { type: 'string', demandOption: true }),
        (a) => console.log(keepCommand(a.path)))
      .command('export <path>', 'Write the LoRA of a checkpoint for inference (diffusers, peft, kohya), optionally a merged pipeline', (c) =>
        c.positional('path', { type: 'string', demandOption: true, describe: 'a checkpoint-<step> folder' })
          .option('format', { type: 'string', array: true, choices: ['diffusers', 'peft', 'kohya'], default: ['diffusers'], describe: 'one or more formats' })
          .option('merge', { type: 'boolean', default: false, describe: 'also write OUT/final_pipeline/: the base pipeline with the LoRA merged into the UNet' })
          .option('out', { type: 'string', describe: 'output folder [default: <run>/exports/<checkpoint>], or a .safetensors file for one format' })
          .option('model', { type: 'string', describe: 'the base model folder, if it moved since training (for --merge)' }),
        async (a) => console.log(await exportCommand(a.path, { formats: a.format as LoraFileFormat[], merge: a.merge, out: a.out, model: a.model })))
      .demandCommand(1, 'name a checkpoints subcommand: list, verify, keep or export'),
  );
}

/** `list-runs [root]`. */
export function listRunsCommand<T>(cli: Argv<T>): Argv<T> {
  return cli.command('list-runs [root]', 'List the runs under a folder (default outputs/)', (y) => y.positional('root', { type: 'string', default: 'outputs' }),
    async (a) => console.log(await listRuns(a.root)));
}
