/**
 * `train-lora forward`: runs the native networks on tensors from a safetensors file and writes the results,
 * so anyone can compare train-lora with diffusers/transformers/peft on their own weights.
 */
import * as path from 'node:path';

import { CLIPTokenizer } from '../tokenizer';
import { checkModel, modelTokenizerDir, type Component } from '../models/model-folder';
import { native, type HostTensor, type Precision } from '../native';
import { fromInt64 } from '../tensors';
import { resolveDevice } from '../device';

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
