/**
 * The demo model's VAE: hand-set weights that make the tiny AutoencoderKL an (almost) exact autoencoder, so that
 * what the demo's LoRA learns in latent space shows up as pictures. A random VAE decoder turns any latent into
 * noise; no VAE can be trained here, and none can be downloaded.
 *
 * Construction (the architecture and parameter names are diffusers' AutoencoderKL, unchanged, so the folder loads
 * anywhere): every ResNet and attention residual branch is zero (identity blocks), downsampling averages 2x2,
 * upsampling is nearest + an identity conv, and RGB travel as latent channels 0-2 scaled by 1/scaling_factor (channel 3
 * is zero; the posterior's std is ~0). The only non-linear steps left are the GroupNorm + SiLU before each conv_out:
 * each colour channel shares its norm group with its own negation (so the group mean does not depend on the image) and
 * with a large "carrier" channel made by a zero-padded conv of a constant (its statistics depend only on the map size),
 * so the normalization is a fixed affine map; a +8 offset keeps SiLU in its linear range. Exact for the demo's
 * resolution (normalization constants are computed for it); other sizes still work, slightly off in brightness.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';

import { native, type HostTensor } from '../native';

const GROUPS = 8;
const CARRIER = 1000;
const OFFSET = 8;
const SILU_1 = 1 / (1 + Math.exp(-1));

interface VaeConfig {
  block_out_channels: number[];
  layers_per_block: number;
  latent_channels: number;
  scaling_factor: number;
  norm_num_groups: number;
}

/** Mean and E[x^2] of a 3x3 all-ones conv (zero padding 1) of a constant 1 over an n x n map. */
function carrierStats(n: number): { mean: number; sq: number } {
  let s = 0;
  let s2 = 0;
  for (let y = 0; y < n; y++)
    for (let x = 0; x < n; x++) {
      const v = (Math.min(y + 1, n - 1) - Math.max(y - 1, 0) + 1) * (Math.min(x + 1, n - 1) - Math.max(x - 1, 0) + 1);
      s += v;
      s2 += v * v;
    }
  return { mean: s / (n * n), sq: s2 / (n * n) };
}

/** gamma/beta of a GroupNorm whose groups hold {s, -s, carrier, 0...} so that silu(GN(s)) = s + OFFSET (nearly). */
function normAffine(groupSize: number, mapSize: number): { gamma: number; beta: number } {
  const c = carrierStats(mapSize);
  const a = CARRIER * SILU_1;
  const mu = (a * c.mean) / groupSize;
  const sigma = Math.sqrt((a * a * c.sq) / groupSize - mu * mu);
  return { gamma: sigma, beta: mu + OFFSET };
}

/** Rewrites `<vaeDir>` (config.json + diffusion_pytorch_model.safetensors) as the demo autoencoder for `resolution`. */
export async function craftDemoVae(vaeDir: string, resolution: number): Promise<void> {
  const cfgFile = path.join(vaeDir, 'config.json');
  const cfg = JSON.parse(fs.readFileSync(cfgFile, 'utf8')) as VaeConfig;
  cfg.norm_num_groups = GROUPS;
  fs.writeFileSync(cfgFile, `${JSON.stringify(cfg, null, 2)}\n`);
  const file = path.join(vaeDir, 'diffusion_pytorch_model.safetensors');
  const { tensors } = await native().safetensorsRead(file, { dtype: 'fp32' });
  const byName = new Map<string, { t: HostTensor; v: Float32Array }>();
  for (const t of tensors) {
    const v = new Float32Array(t.shape.reduce((a, b) => a * b, 1));
    if (/norm.*\.weight$/.test(t.name)) v.fill(1); // GroupNorm gammas 1, everything else 0 to start
    byName.set(t.name, { t, v });
  }
  const get = (name: string) => {
    const e = byName.get(name);
    if (!e) throw new Error(`craftDemoVae: ${file} has no tensor ${name}`);
    return e;
  };
  /** conv weight [out, in, kh, kw]: set w[o, i, y, x]. */
  const setConv = (name: string, o: number, i: number, y: number, x: number, val: number) => {
    const { t, v } = get(name);
    const [, cin, kh, kw] = t.shape;
    v[((o * cin + i) * kh + y) * kw + x] = val;
  };
  const set1 = (name: string, i: number, val: number) => (get(name).v[i] = val);

  const ch = cfg.block_out_channels;
  const top = ch[ch.length - 1];
  const down = 2 ** (ch.length - 1);
  const latentSize = resolution / down;
  const sf = cfg.scaling_factor;
  const rgb = [0, 1, 2];

  // ---- encoder: signal s of colour k at channel 8k (its negation at 8k+1, carrier at 8k+2), in every stage ----
  const encGroup = top / GROUPS;
  for (const k of rgb) {
    setConv('encoder.conv_in.weight', encGroup * k, k, 1, 1, 1);
    setConv('encoder.conv_in.weight', encGroup * k + 1, k, 1, 1, -1);
  }
  for (let b = 0; b < ch.length; b++) {
    if (b < ch.length - 1) for (let c = 0; c < ch[b]; c++) for (const [y, x] of [[0, 0], [0, 1], [1, 0], [1, 1]]) setConv(`encoder.down_blocks.${b}.downsamplers.0.conv.weight`, c, c, y, x, 0.25);
    const inCh = b === 0 ? ch[0] : ch[b - 1];
    if (inCh !== ch[b]) for (let c = 0; c < inCh; c++) setConv(`encoder.down_blocks.${b}.resnets.0.conv_shortcut.weight`, c, c, 0, 0, 1);
  }
  // The carrier: mid_block.resnets.1's residual branch = conv2 (zero padding) of silu(beta) = silu(1) on one channel.
  const carrierSrc = top - 1;
  set1('encoder.mid_block.resnets.1.norm2.bias', carrierSrc, 1);
  for (const k of rgb) for (let y = 0; y < 3; y++) for (let x = 0; x < 3; x++) setConv('encoder.mid_block.resnets.1.conv2.weight', encGroup * k + 2, carrierSrc, y, x, CARRIER);
  const enc = normAffine(encGroup, latentSize);
  for (const k of rgb) {
    set1('encoder.conv_norm_out.weight', encGroup * k, enc.gamma);
    set1('encoder.conv_norm_out.bias', encGroup * k, enc.beta);
    // mean channel k = (silu(...) - OFFSET) / scaling_factor; logvar channels: very negative (std ~ 0).
    setConv('encoder.conv_out.weight', k, encGroup * k, 1, 1, 1 / sf);
    set1('encoder.conv_out.bias', k, -OFFSET / sf);
  }
  for (let c = 0; c < cfg.latent_channels; c++) set1('encoder.conv_out.bias', cfg.latent_channels + c, -30);
  for (let c = 0; c < 2 * cfg.latent_channels; c++) setConv('quant_conv.weight', c, c, 0, 0, 1);

  // ---- decoder: colour k at channel 4k (negation 4k+1, carrier 4k+2) in the last stage's groups ----
  const bottom = ch[0];
  const decGroup = bottom / GROUPS;
  for (let c = 0; c < cfg.latent_channels; c++) setConv('post_quant_conv.weight', c, c, 0, 0, 1);
  for (const k of rgb) {
    setConv('decoder.conv_in.weight', decGroup * k, k, 1, 1, sf);
    setConv('decoder.conv_in.weight', decGroup * k + 1, k, 1, 1, -sf);
  }
  const rev = [...ch].reverse();
  for (let b = 0; b < rev.length; b++) {
    if (b < rev.length - 1) for (let c = 0; c < rev[b]; c++) setConv(`decoder.up_blocks.${b}.upsamplers.0.conv.weight`, c, c, 1, 1, 1);
    const inCh = b === 0 ? rev[0] : rev[b - 1];
    if (inCh !== rev[b]) for (let c = 0; c < rev[b]; c++) setConv(`decoder.up_blocks.${b}.resnets.0.conv_shortcut.weight`, c, c, 0, 0, 1);
  }
  const lastBlock = rev.length - 1;
  const lastRes = cfg.layers_per_block; // up blocks have layers_per_block + 1 resnets
  const decSrc = bottom - 1;
  set1(`decoder.up_blocks.${lastBlock}.resnets.${lastRes}.norm2.bias`, decSrc, 1);
  for (const k of rgb) for (let y = 0; y < 3; y++) for (let x = 0; x < 3; x++) setConv(`decoder.up_blocks.${lastBlock}.resnets.${lastRes}.conv2.weight`, decGroup * k + 2, decSrc, y, x, CARRIER);
  const dec = normAffine(decGroup, resolution);
  for (const k of rgb) {
    set1('decoder.conv_norm_out.weight', decGroup * k, dec.gamma);
    set1('decoder.conv_norm_out.bias', decGroup * k, dec.beta);
    setConv('decoder.conv_out.weight', k, decGroup * k, 1, 1, 1);
    set1('decoder.conv_out.bias', k, -OFFSET);
  }

  const out: HostTensor[] = tensors.map((t) => {
    const { v } = byName.get(t.name)!;
    return { name: t.name, dtype: 'F32', shape: t.shape, data: new Uint8Array(v.buffer, v.byteOffset, v.byteLength) };
  });
  await native().safetensorsWrite(file, out, { format: 'pt', 'train_lora.note': 'demo autoencoder: hand-set weights, see src/model-folders/demo-vae.ts' });
}
