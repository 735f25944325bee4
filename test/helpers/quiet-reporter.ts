import type { StepMetrics, TrainReporter } from '../../src/train/train';
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
