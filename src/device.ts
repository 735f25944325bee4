/**
 * Where a run computes and in which precision, decided in one place and printed at start.
 *
 * Devices: `auto` takes CUDA, then MPS, then the CPU; a device that is asked for and missing is an error that says
 * why it is missing (from the addon's device probe) and what to do.
 *
 * Mixed precision: which one a run uses on which device.
 *
 * What each mode does (native/train/trainer.cpp): the UNet's forward runs under autocast in the chosen dtype, as
 * accelerate wraps the prepared model; trainable weights (LoRA adapters, or the whole UNet in full mode) stay fp32
 * master weights with fp32 gradients and AdamW state. In LoRA mode the frozen weights (UNet, VAE, text encoder) are
 * loaded in the low dtype, as diffusers' script casts them to weight_dtype; in full mode everything stays fp32.
 * fp16 adds dynamic loss scaling (torch.amp.GradScaler); bf16 has fp32's range and needs none.
 */
import { native, type DeviceInfo } from './native';

/** The device a run uses: `requested` (auto, cpu, cuda, cuda:N, mps) checked against what this build and machine have. */
export async function resolveDevice(requested: string, devices?: DeviceInfo[]): Promise<string> {
  const devs = devices ?? (await native().devices());
  if (requested === 'auto') {
    if (devs.some((d) => d.type === 'cuda' && d.available)) return 'cuda';
    if (devs.some((d) => d.type === 'mps' && d.available)) return 'mps';
    return 'cpu';
  }
  const m = /^(cpu|cuda|mps)(?::(\d+))?$/.exec(requested);
  if (!m || (m[1] !== 'cuda' && m[2] !== undefined && m[2] !== '0'))
    throw new Error(`--device ${requested}: not a device name; use auto, cpu, cuda, cuda:N or mps`);
  const type = m[1];
  if (type === 'cpu') return requested;
  const available = devs.filter((d) => d.type === type && d.available);
  if (!available.length) {
    const reason = devs.find((d) => d.type === type)?.reason ?? `no ${type} device was found`;
    const fix =
      type === 'cuda'
        ? 'use --device cpu, or rebuild the addon against a CUDA build of torch (see README "Devices and libtorch"); `train-lora devices` shows what the addon sees'
        : 'use --device cpu (or cuda on an NVIDIA machine); `train-lora devices` shows what the addon sees';
    throw new Error(`--device ${requested}: ${reason}. Fix: ${fix}`);
  }
  if (type === 'cuda' && m[2] !== undefined && !available.some((d) => d.index === Number(m[2])))
    throw new Error(`--device ${requested}: this machine has ${available.length} CUDA device(s) (cuda:0${available.length > 1 ? `..cuda:${available.length - 1}` : ''})`);
  return requested;
}

export type MixedPrecision = 'no' | 'fp16' | 'bf16';
export type RequestedPrecision = MixedPrecision | 'auto';

export interface PrecisionPlan {
  mixed: MixedPrecision;
  /** dtype the pipeline (frozen weights) is loaded in. */
  weightDtype: 'fp32' | 'fp16' | 'bf16';
  /** One line for the log: what runs in which dtype, and why this mode. */
  description: string;
  warnings: string[];
}

function deviceInfo(device: string, devices: DeviceInfo[]): DeviceInfo | undefined {
  const [type, idx] = device.split(':');
  return devices.find((d) => d.type === type && d.available && (idx === undefined || d.index === Number(idx)));
}

/**
 * Defaults by device: CUDA bf16 where the GPU supports it (compute capability 8.0+), else fp16; MPS fp32 (fp16
 * training on MPS is known to produce NaN); CPU fp32.
 */
export function planPrecision(requested: RequestedPrecision, device: string, devices: DeviceInfo[], trainMode: 'lora' | 'full'): PrecisionPlan {
  const type = device.split(':')[0];
  const info = deviceInfo(device, devices);
  const warnings: string[] = [];
  let mixed: MixedPrecision;
  let why: string;
  if (requested !== 'auto') {
    mixed = requested;
    why = `--mixed-precision ${requested}`;
  } else if (type === 'cuda') {
    const gpu = `${info?.name ?? device}${info?.computeCapability ? `, compute capability ${info.computeCapability}` : ''}`;
    mixed = info?.bf16 ? 'bf16' : 'fp16';
    why = info?.bf16 ? `default on a CUDA GPU with bf16 (${gpu})` : `default on a CUDA GPU without bf16 (${gpu})`;
  } else if (type === 'mps') {
    mixed = 'no';
    why = 'default on MPS: fp16 training on MPS is known to produce NaN';
  } else {
    mixed = 'no';
    why = `default on ${type}`;
  }
  if (requested === 'fp16' && type === 'mps')
    warnings.push('--mixed-precision fp16 on MPS: fp16 training on Apple GPUs is known to produce NaN losses; use --mixed-precision no (the default there) if it does');
  if (requested === 'fp16' && type === 'cpu')
    warnings.push('--mixed-precision fp16 on the CPU: fp16 kernels are slow on most CPUs; bf16 is the CPU\'s mixed precision');
  if (requested === 'bf16' && type === 'cuda' && info && info.bf16 === false)
    warnings.push(`--mixed-precision bf16 on ${info.name ?? device}${info.computeCapability ? ` (compute capability ${info.computeCapability})` : ''}: this GPU has no bf16 tensor cores, so bf16 is emulated and slow; fp16 is the fast choice there`);
  const weightDtype = trainMode === 'full' || mixed === 'no' ? 'fp32' : mixed;
  const compute = mixed === 'no' ? 'fp32' : `${mixed} autocast`;
  const trainable = trainMode === 'full' ? 'UNet weights fp32 (master weights)' : 'LoRA weights fp32';
  const scaling = mixed === 'fp16' ? ', dynamic loss scaling' : '';
  return {
    mixed,
    weightDtype,
    description: `precision: ${compute}, frozen weights ${weightDtype}, ${trainable}${scaling} (${why})`,
    warnings,
  };
}
