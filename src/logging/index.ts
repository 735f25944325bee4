import * as path from 'node:path';

export { createLogger, defaultLogFile } from './logger';
export type { ConsoleMode, Logger, LoggerHandle, LoggerOptions, LogLevel } from './logger';
export { MetricsWriter, readMetrics } from './metrics';
export type { StepMetrics } from './metrics';
export { defaultTerminal, formatDuration, ProgressBar, Terminal } from './progress';
export type { ProgressMetrics, ProgressOptions, TermStream } from './progress';
export { crc32c, maskedCrc32c, pngInfo, TensorBoardWriter } from './tensorboard';

export interface LogPaths {
  dir: string;
  /** JSON log lines (pino). */
  logFile: string;
  /** One JSON object per optimizer step. */
  metrics: string;
  /** TensorBoard run directory; same place as diffusers' accelerate tracker ("text2image-fine-tune"). */
  tensorboard: string;
}

/** Where a training run's logs go: OUT/logs/... (`tensorboard --logdir OUT/logs` shows the run). */
export function logPaths(outDir: string): LogPaths {
  const dir = path.join(outDir, 'logs');
  return {
    dir,
    logFile: path.join(dir, 'train.log'),
    metrics: path.join(dir, 'metrics.jsonl'),
    tensorboard: path.join(dir, 'text2image-fine-tune'),
  };
}
