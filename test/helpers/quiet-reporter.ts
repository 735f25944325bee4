import type { TrainConfig } from '../../src/config';
import type { StepMetrics, TrainOptions, TrainReporter, TrainResult } from '../../src/train/train';
import type { ValidationResult } from '../../src/train/validation';

/** A TrainReporter that records steps and messages instead of printing them. */
export class Quiet implements TrainReporter {
  steps: StepMetrics[] = [];
  messages: string[] = [];
  info(m: string): void {
    this.messages.push(m);
  }
  warn(m: string): void {
    this.messages.push(`warn: ${m}`);
  }
  error(m: string): void {
    this.messages.push(`error: ${m}`);
  }
  validations: ValidationResult[] = [];
  step(m: StepMetrics): void {
    this.steps.push(m);
  }
  validation(r: ValidationResult): void {
    this.validations.push(r);
  }
}

/** train(cfg) reporting to a new Quiet, without signal handlers: what it returns and what it reported. */
export async function quietTrain(cfg: TrainConfig, opts: TrainOptions = {}): Promise<{ result: TrainResult; rep: Quiet }> {
  const { train } = await import('../../src/train/train');
  const rep = new Quiet();
  return { result: await train(cfg, rep, { installSignalHandlers: false, ...opts }), rep };
}
