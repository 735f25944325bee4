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

/**
 * One validation prompt with its own settings: kohya's prompt-file options on a --validation-prompts-file line
 * (`a cat --w 512 --h 768 --d 42 --s 30 --l 7.5 --n blurry`: width, height, seed, steps, guidance scale, negative
 * prompt); what a line does not set comes from the --validation-* flags.
 */
export interface ValidationPrompt {
  prompt: string;
  width?: number;
  height?: number;
  seed?: number;
  steps?: number;
  guidance?: number;
  negative?: string;
}

/**
 * A prompts-file line in kohya's format (library/train_util.py line_to_prompt_dict): split at " --", the first part
 * is the prompt, each other part one option. Differs on purpose: an option train-lora does not read (kohya ignores
 * them, e.g. --ss, --g, --cn) or a malformed value is an error naming the line, and --s is not clamped to
 * 1..1000 but refused outside it; --w / --h must be multiples of 8.
 */
export function parsePromptLine(line: string, where: string): ValidationPrompt {
  const parts = line.split(' --');
  const out: ValidationPrompt = { prompt: parts[0].trim() };
  const bad = (m: string): never => {
    throw new Error(`${where}: ${m} (a line is "PROMPT --w WIDTH --h HEIGHT --d SEED --s STEPS --l GUIDANCE --n NEGATIVE", every option optional)`);
  };
  for (const raw of parts.slice(1)) {
    const m = /^(\S+)(?:\s+([\s\S]*))?$/.exec(raw.trim());
    if (!m) bad(`empty option "--${raw}"`);
    const key = m![1].toLowerCase();
    const value = (m![2] ?? '').trim();
    const int = (what: string, min: number, max: number): number => {
      if (!/^\d+$/.test(value)) bad(`--${key} needs a whole number (${what}), got "${value}"`);
      const v = Number(value);
      if (v < min || v > max) bad(`--${key} ${v} is outside ${min}..${max} (${what})`);
      return v;
    };
    switch (key) {
      case 'w':
      case 'h': {
        const v = int(key === 'w' ? 'width' : 'height', 8, 8192);
        if (v % 8 !== 0) bad(`--${key} ${v} is not a multiple of 8 (the VAE's image size step)`);
        if (key === 'w') out.width = v;
        else out.height = v;
        break;
      }
      case 'd':
        out.seed = int('seed', 0, Number.MAX_SAFE_INTEGER);
        break;
      case 's':
        out.steps = int('sampling steps', 1, 1000);
        break;
      case 'l': {
        if (!/^\d+(\.\d*)?$|^\.\d+$/.test(value)) bad(`--l needs a number (guidance scale), got "${value}"`);
        out.guidance = Number(value);
        break;
      }
      case 'n':
        out.negative = value;
        break;
      default:
        bad(`unknown option --${key}: train-lora reads --w, --h, --d, --s, --l and --n`);
    }
  }
  if (!out.prompt) bad('no prompt before the options');
  return out;
}

/** The validation prompts: --validation-prompt (repeatable) then --validation-prompts-file (one per line, # comments, kohya's options). */
export function validationPromptSpecs(cfg: Pick<TrainConfig, 'validation_prompt' | 'validation_prompts_file'>): ValidationPrompt[] {
  const out: ValidationPrompt[] = [...cfg.validation_prompt].filter((p) => p.trim() !== '').map((prompt) => ({ prompt }));
  if (cfg.validation_prompts_file) {
    let text: string;
    try {
      text = fs.readFileSync(cfg.validation_prompts_file, 'utf8');
    } catch (e) {
      throw new Error(`--validation-prompts-file ${cfg.validation_prompts_file}: cannot read (${(e as NodeJS.ErrnoException).code ?? (e as Error).message})`);
    }
    text.split(/\r?\n/).forEach((line, i) => {
      const t = line.trim();
      if (t && !t.startsWith('#')) out.push(parsePromptLine(t, `--validation-prompts-file ${cfg.validation_prompts_file} line ${i + 1}`));
    });
  }
  return out;
}

/** The validation prompts' texts (see validationPromptSpecs). */
export function validationPrompts(cfg: Pick<TrainConfig, 'validation_prompt' | 'validation_prompts_file'>): string[] {
  return validationPromptSpecs(cfg).map((p) => p.prompt);
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
