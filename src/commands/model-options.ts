/** The options `forward` and `generate` share: the model they run, the LoRA's alpha, the device and dtype. */
export const MODEL_FOLDER = { type: 'string', demandOption: true, describe: 'diffusers model folder' } as const;
export const LORA_ALPHA = { type: 'number', describe: 'alpha of a LoRA file that does not carry it (a bare PEFT-format file); the scale is alpha / rank' } as const;
export const RUN_DEVICE = { type: 'string', default: 'cpu' } as const;
export const RUN_DTYPE = { choices: ['fp32', 'fp16', 'bf16'] as const, default: 'fp32' as const };
