/**
 * The training reporter for the CLI: log lines (pretty on a terminal, JSON lines when piped, always a JSON log
 * file in OUT/logs/), a progress bar on a terminal, metrics.jsonl.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import { defaultTerminal, ProgressBar } from '../logging/progress';
import type { StepMetrics, TrainReporter } from './train';

type Level = 'info' | 'warn' | 'error';

export class CliReporter implements TrainReporter {
  private bar?: ProgressBar;
  private logFile?: number;
  private metricsFile?: number;
  private readonly tty: boolean;

  constructor(private readonly opts: { quiet?: boolean; json?: boolean } = {}) {
    this.tty = !!process.stderr.isTTY && !opts.json;
  }

  /** Starts the files in OUT/logs once the output folder is known. */
  attach(outputDir: string): void {
    const logs = path.join(outputDir, 'logs');
    fs.mkdirSync(logs, { recursive: true });
    this.logFile = fs.openSync(path.join(logs, 'train.log'), 'a');
    this.metricsFile = fs.openSync(path.join(outputDir, 'metrics.jsonl'), 'a');
  }

  private emit(level: Level, msg: string, data?: Record<string, unknown>): void {
    const rec = { level, time: new Date().toISOString(), msg, ...data };
    if (this.logFile !== undefined) fs.writeSync(this.logFile, JSON.stringify(rec) + '\n');
    if (this.opts.quiet && level === 'info') return;
    if (this.tty) {
      const tag = level === 'info' ? '\x1b[36minfo\x1b[0m' : level === 'warn' ? '\x1b[33mwarn\x1b[0m' : '\x1b[31merror\x1b[0m';
      defaultTerminal().write(process.stderr, `${tag} ${msg}\n`);
    } else {
      process.stdout.write(JSON.stringify(rec) + '\n');
    }
  }

  info(msg: string, data?: Record<string, unknown>): void {
    this.emit('info', msg, data);
  }
  warn(msg: string, data?: Record<string, unknown>): void {
    this.emit('warn', msg, data);
  }
  error(msg: string, data?: Record<string, unknown>): void {
    this.emit('error', msg, data);
  }

  start(total: number, initial: number): void {
    this.bar = new ProgressBar({ total, initial, label: 'Steps', stream: process.stderr, enabled: this.tty });
  }

  step(m: StepMetrics): void {
    const rec = { step: m.step, epoch: m.epoch, loss: m.loss, lr: m.lr, grad_norm: m.gradNorm, skipped: m.skipped, loss_scale: m.lossScale, step_time: m.stepTime, samples_seen: m.samplesSeen, time: new Date().toISOString() };
    if (this.metricsFile !== undefined) fs.writeSync(this.metricsFile, JSON.stringify(rec) + '\n');
    if (this.bar) this.bar.update(m.step, { loss: m.loss, lr: m.lr });
    if (!this.tty && !this.opts.quiet) process.stdout.write(JSON.stringify({ level: 'info', msg: 'step', ...rec }) + '\n');
  }

  finish(): void {
    this.bar?.finish();
  }

  close(): void {
    for (const fd of [this.logFile, this.metricsFile]) if (fd !== undefined) fs.closeSync(fd);
    this.logFile = this.metricsFile = undefined;
  }
}
