/**
 * Validation during training: held-out loss (see validation-loss.ts) and rendered images of the validation prompts.
 * It decides when to run (every --validation-steps, every --validation-epochs, before training, at the end) and what
 * to write (OUT/validation/step<NNNNNN>_prompt<P>_img<I>.png, a labelled grid per run, TensorBoard images, val_loss).
 * Rendering uses its own generator seeded with --validation-seed, in eval mode without gradients, so the training
 * trajectory is the same with or without validation.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import type { TrainConfig } from '../config';
import type { TrainerHandle } from '../native';
import type { ValidationLoss } from './validation-loss';

/** What one validation produced (passed to the reporter). */
export interface ValidationResult {
  step: number;
  valLoss?: number;
  /** PNG files written, in prompt-major order. */
  images: string[];
  grid?: string;
  /** For TensorBoard: the grid (or single images) as PNG bytes. */
  pngs: Array<{ tag: string; png: Uint8Array; width: number; height: number }>;
  ms: number;
}

/** Renders the prompts' images and returns files + PNG bytes (implemented with the text-to-image pipeline). */
export type ImageRenderer = (step: number) => Promise<Pick<ValidationResult, 'images' | 'grid' | 'pngs'>>;

/** The validation prompts: --validation-prompt (repeatable) then --validation-prompts-file (one per line, # comments). */
export function validationPrompts(cfg: Pick<TrainConfig, 'validation_prompt' | 'validation_prompts_file'>): string[] {
  const out = [...cfg.validation_prompt].filter((p) => p.trim() !== '');
  if (cfg.validation_prompts_file) {
    let text: string;
    try {
      text = fs.readFileSync(cfg.validation_prompts_file, 'utf8');
    } catch (e) {
      throw new Error(`--validation-prompts-file ${cfg.validation_prompts_file}: cannot read (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
    }
    for (const line of text.split(/\r?\n/)) {
      const t = line.trim();
      if (t && !t.startsWith('#')) out.push(t);
    }
  }
  return out;
}

export const validationImageName = (step: number, prompt: number, img: number): string =>
  `step${String(step).padStart(6, '0')}_prompt${prompt}_img${img}.png`;
export const validationGridName = (step: number): string => `step${String(step).padStart(6, '0')}_grid.png`;

export class Validator {
  private lastStep = -1;
  constructor(
    private readonly cfg: TrainConfig,
    private readonly loss: ValidationLoss | undefined,
    private readonly render: ImageRenderer | undefined,
  ) {}

  get enabled(): boolean {
    return this.loss !== undefined || this.render !== undefined;
  }

  /** Whether a validation is due after optimizer step `step` (epoch `epoch` ended when `endOfEpoch`). */
  due(step: number, epoch: number, endOfEpoch: boolean): boolean {
    if (!this.enabled || step === this.lastStep) return false;
    if (step % this.cfg.validation_steps === 0) return true;
    return this.cfg.validation_epochs !== undefined && endOfEpoch && (epoch + 1) % this.cfg.validation_epochs === 0;
  }

  /** Whether `step` has been validated already (so the end of training does not repeat it). */
  done(step: number): boolean {
    return step === this.lastStep;
  }

  /** Held-out loss only (for the best checkpoint when --monitor val_loss and no validation ran at this step). */
  async valLoss(trainer: TrainerHandle): Promise<number | undefined> {
    return this.loss ? this.loss.evaluate(trainer) : undefined;
  }

  async run(step: number, trainer: TrainerHandle): Promise<ValidationResult> {
    const t = Date.now();
    this.lastStep = step;
    const valLoss = this.loss ? await this.loss.evaluate(trainer) : undefined;
    const rendered = this.render ? await this.render(step) : { images: [], pngs: [] };
    return { step, valLoss, ...rendered, ms: Date.now() - t };
  }
}

/** OUT/validation */
export const validationDir = (outputDir: string): string => path.join(outputDir, 'validation');
