/**
 * `train-lora forward`: runs the native networks on tensors from a safetensors file and writes the results,
 * so anyone can compare train-lora with diffusers/transformers/peft on their own weights.
 */
import * as path from 'node:path';

import type { Argv } from 'yargs';

import { CLIPTokenizer } from '../tokenizer';
import { checkModel, modelTokenizerDir, type Component } from '../model-folders/model-folder';
import { native, type HostTensor, type Precision } from '../native';
import { fromInt64 } from '../tensors';
import { resolveDevice } from '../device';
import { LORA_ALPHA, MODEL_FOLDER, RUN_DEVICE, RUN_DTYPE } from './model-options';

export interface ForwardArgs {
  model: string;
  inputs?: string;
  output: string;
  lora?: string;
  loraScale?: number;
  /** --lora-alpha: the alpha of a LoRA file that does not carry it. */
  loraAlpha?: number;
  prompt?: string[];
  device?: string;
  dtype?: Precision;
  backward?: boolean;
  variant?: string;
}

export async function runForwardCommand(args: ForwardArgs): Promise<string[]> {
  const inputs: HostTensor[] = args.inputs ? (await native().safetensorsRead(args.inputs)).tensors : [];
  if (!args.inputs && !args.prompt?.length) throw new Error('forward: give --inputs FILE and/or --prompt TEXT');
  await checkModel(args.model, [], !!args.prompt?.length);
  const extra: HostTensor[] = [];
  if (args.prompt?.length) {
    const tok = CLIPTokenizer.fromFolder(modelTokenizerDir(args.model));
    const ids = tok.encodeBatch(args.prompt, { maxLength: tok.modelMaxLength, padding: 'max_length' });
    const ids64 = fromInt64('input_ids', [ids.length, ids[0].length], ids.flat());
    extra.push(ids64);
  }
  const all = [...inputs.filter((t) => !(extra.length && t.name === 'input_ids')), ...extra];
  const names = new Set(all.map((t) => t.name));
  const components: Component[] = [];
  if (names.has('input_ids')) components.push('text_encoder');
  if (names.has('latents') || names.has('encoder_hidden_states')) components.push('unet');
  if (names.has('image') || names.has('vae_latents')) components.push('vae');
  if (!components.length)
    throw new Error(`${args.inputs}: no known inputs (input_ids, latents + timesteps + encoder_hidden_states, image, vae_latents)`);
  await checkModel(args.model, components, components.includes('text_encoder') && !!args.prompt?.length);
  const device = await resolveDevice(args.device ?? 'cpu');
  // forward is the parity tool: fp32 means IEEE fp32 on CUDA too (TF32 off in cuBLAS and cuDNN).
  await native().setAllowTf32(false);
  const pipe = await native().loadPipeline(args.model, { device, dtype: args.dtype ?? 'fp32', variant: args.variant, components });
  try {
    const outputs = await native().forward(pipe, all, { lora: args.lora, loraScale: args.loraScale, loraAlpha: args.loraAlpha, backward: args.backward });
    const written = [...extra, ...outputs];
    await native().safetensorsWrite(args.output, written, {
      producer: 'train-lora forward',
      torch: native().version().torch,
      device,
      dtype: args.dtype ?? 'fp32',
    });
    return written.map((t) => t.name);
  } finally {
    native().dispose(pipe); // also when forward fails (a bad LoRA file, wrong input shapes)
  }
}

/** `forward`: the networks on tensors from a safetensors file. */
export function forwardCommand<T>(cli: Argv<T>): Argv<T> {
  return cli.command(
    'forward',
    'Run the networks on tensors from a safetensors file (parity checks against diffusers)',
    (y) =>
      y
        .option('model', MODEL_FOLDER)
        .option('inputs', { type: 'string', describe: 'safetensors with input_ids / latents+timesteps+encoder_hidden_states / image / vae_latents [/ target]' })
        .option('output', { type: 'string', demandOption: true, describe: 'where to write the outputs (safetensors)' })
        .option('lora', { type: 'string', describe: 'LoRA file (diffusers, peft or kohya keys), PEFT adapter folder or checkpoint folder, applied to the UNet' })
        .option('lora-scale', { type: 'number', default: 1 })
        .option('lora-alpha', LORA_ALPHA)
        .option('prompt', { type: 'string', array: true, describe: 'tokenize with the folder tokenizer; writes input_ids and text_embeddings' })
        .option('device', RUN_DEVICE)
        .option('dtype', RUN_DTYPE)
        .option('variant', { type: 'string', describe: 'weights variant, e.g. fp16 for *.fp16.safetensors' })
        .option('backward', { type: 'boolean', default: false, describe: 'with --lora and a `target` input: write loss and grad.<key> of every LoRA parameter' }),
    async (a) => {
      const names = await runForwardCommand({
        model: a.model,
        inputs: a.inputs,
        output: a.output,
        lora: a.lora,
        loraScale: a['lora-scale'],
        loraAlpha: a['lora-alpha'],
        prompt: a.prompt,
        device: a.device,
        dtype: a.dtype as Precision,
        variant: a.variant,
        backward: a.backward,
      });
      console.log(`wrote ${a.output}: ${names.join(', ')}`);
    },
  );
}
