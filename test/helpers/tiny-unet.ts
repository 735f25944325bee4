import * as path from 'node:path';

import { native, type HostTensor } from '../../src/native';
import { TINY_MODEL } from './tiny-run';

/** The UNet output (noise_pred bytes) of the tiny model on the tiny golden's inputs, with `lora` applied by `forward`. */
export async function tinyUnetOut(lora: string): Promise<Buffer> {
  const inputs = (await native().safetensorsRead(path.join(__dirname, '..', 'fixtures', 'golden', 'tiny', 'inputs.safetensors'))).tensors.filter((t: HostTensor) =>
    ['latents', 'timesteps', 'encoder_hidden_states'].includes(t.name),
  );
  const p = await native().loadPipeline(TINY_MODEL, { components: ['unet'] });
  const out = Buffer.from((await native().forward(p, inputs, { lora }))[0].data);
  native().dispose(p);
  return out;
}
