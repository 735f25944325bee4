/**
 * The training reporter for the CLI: pino log lines (pretty on a terminal, JSON lines when piped, always a JSON log
 * file in OUT/logs/train.log), a progress bar with loss, lr, it/s and ETA on a terminal, OUT/logs/metrics.jsonl and
 * TensorBoard event files in OUT/logs/text2image-fine-tune (`tensorboard --logdir OUT/logs`).
 */
import { createLogger, logPaths, MetricsWriter, ProgressBar, TensorBoardWriter, type LoggerHandle } from '../logging';
import type { StepMetrics, TrainReporter } from './train';
import type { ValidationResult } from './validation';

export class CliReporter implements TrainReporter {
  private handle: LoggerHandle;
  private bar?: ProgressBar;
  private metrics?: MetricsWriter;
  private tb?: TensorBoardWriter;
  private rate = 0;

  constructor(private readonly level: 'trace' | 'debug' | 'info' | 'warn' | 'error' = 'info') {
    this.handle = createLogger({ level });
  }

  /** Starts the files in OUT/logs once the output folder is known. */
  attach(outputDir: string): void {
    const p = logPaths(outputDir);
    this.handle = createLogger({ level: this.level, file: p.logFile });
    this.metrics = new MetricsWriter(p.metrics);
    this.tb = new TensorBoardWriter(p.tensorboard);
  }

  info(msg: string, data?: Record<string, unknown>): void {
    this.handle.logger.info(data ?? {}, msg);
  }
  warn(msg: string, data?: Record<string, unknown>): void {
    this.handle.logger.warn(data ?? {}, msg);
  }
  error(msg: string, data?: Record<string, unknown>): void {
    this.handle.logger.error(data ?? {}, msg);
  }

  start(total: number, initial: number): void {
    this.bar = new ProgressBar({ total, initial, label: 'Steps', stream: process.stderr });
  }

  step(m: StepMetrics): void {
    const itPerSec = m.stepTime > 0 ? 1 / m.stepTime : 0;
    this.rate = this.rate === 0 ? itPerSec : 0.7 * this.rate + 0.3 * itPerSec;
    this.metrics?.append({ step: m.step, epoch: m.epoch, loss: m.loss, lr: m.lr, grad_norm: m.gradNorm, it_per_sec: this.rate, skipped: m.skipped, loss_scale: m.lossScale, samples_seen: m.samplesSeen });
    this.tb?.addScalars({ 'train/loss': m.loss, 'train/lr': m.lr, 'train/grad_norm': Number.isFinite(m.gradNorm) ? m.gradNorm : 0, 'train/it_per_sec': this.rate }, m.step);
    this.bar?.update(m.step, { loss: m.loss, lr: m.lr });
    // On a terminal the bar shows this; piped, every step is a JSON line (debug level in the file either way).
    if (this.bar?.enabled) this.handle.logger.debug({ ...m }, 'step');
    else this.handle.logger.info({ ...m }, 'step');
  }

  validation(r: ValidationResult): void {
    if (r.valLoss !== undefined) {
      this.metrics?.append({ step: r.step, val_loss: r.valLoss });
      this.tb?.addScalar('val/loss', r.valLoss, r.step);
    }
    for (const im of r.pngs) this.tb?.addImage(im.tag, im.png, r.step, { width: im.width, height: im.height });
    this.tb?.flush();
  }

  finish(): void {
    this.bar?.finish();
  }

  close(): void {
    this.metrics?.close();
    this.tb?.close();
    this.handle.close();
    this.metrics = undefined;
    this.tb = undefined;
  }
}
