import type { StepMetrics, TrainReporter } from '../../src/train/train';

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
  step(m: StepMetrics): void {
    this.steps.push(m);
  }
}
