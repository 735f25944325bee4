#!/usr/bin/env python3
"""One LoRA training step of diffusers' examples/text_to_image/train_text_to_image_lora.py, timed.

    diffusers_step.py --model DIR --resolution R --batch B [--gradient-checkpointing] [--cached-latents]
                      [--count-flops] [--device cpu] [--dtype fp32|bf16] --steps N --warmup 2 [--min-seconds S]
                      [--threads T]
    diffusers_step.py --check

Prints one JSON line: {"steps_per_sec", "steps", "seconds", "peak_rss_mb", and on CUDA "peak_cuda_mb"; with
--count-flops "flops_per_step"} (--check: {"ok": true, versions...}; on a failed import:
{"error": "..."} and exit status 2).

The step is the script's (accumulation 1, --mixed_precision no|bf16, --max_grad_norm 1): VAE encode +
sample * scaling_factor, randn noise, randint timesteps, DDPMScheduler.add_noise, text_encoder(input_ids)[0],
unet(...).sample, mse_loss, backward, clip_grad_norm_, AdamW over the peft LoRA parameters, zero_grad; loss.item()
as the script's logging does. Inputs are random pixels in [-1, 1] and random token ids. --cached-latents: the step
starts from a cached VAE posterior (random mean, std 0.1; latents = (mean + std * randn) * scaling_factor, as
DiagonalGaussianDistribution.sample) instead of encoding pixels.
--count-flops: before the warm-up (and before checkpointing is enabled), one step runs under
torch.utils.flop_counter.FlopCounterMode: flops_per_step is every FLOP it counts (matmuls, convolutions and
attention, forward and backward; the frozen weights get no weight gradients, so LoRA's backward is about one forward).
Set DIFFUSERS_SRC to a diffusers repository or its `src` folder when diffusers is not installed.
"""
import argparse
import json
import os
import resource
import sys
import time

# Spin-waiting OpenMP threads make torch crawl on a busy machine; must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if os.environ.get("DIFFUSERS_SRC"):  # a diffusers repository or its src folder
    _src = os.environ["DIFFUSERS_SRC"]
    sys.path.insert(0, os.path.join(_src, "src") if os.path.isdir(os.path.join(_src, "src", "diffusers")) else _src)


def fail(msg):
    print(json.dumps({"error": msg}), flush=True)
    sys.exit(2)


try:
    import torch
    import torch.nn.functional as F
    import transformers
    import peft
    from peft import LoraConfig
    import diffusers
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel
except Exception as e:  # ImportError, or e.g. a torchvision built for another torch
    hint = " (set DIFFUSERS_SRC to a diffusers repository or its src folder)" if getattr(e, "name", None) == "diffusers" else ""
    fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{hint}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--check", action="store_true")
    p.add_argument("--model")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--cached-latents", action="store_true")
    p.add_argument("--count-flops", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--steps", type=int, default=5, help="timed steps (at least)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-seconds", type=float, default=0.0, help="keep stepping until this much time has passed")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--rank", type=int, default=4)
    a = p.parse_args()

    if a.check:
        versions = {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
                    "peft": peft.__version__, "transformers": transformers.__version__}
        print(json.dumps({"ok": True, **versions, "threads": torch.get_num_threads()}), flush=True)
        return
    if not a.model:
        p.error("--model is required")

    if a.threads > 0:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    weight_dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    torch.manual_seed(0)

    # --- as the script loads and prepares the models
    noise_scheduler = DDPMScheduler.from_pretrained(a.model, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(a.model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(a.model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(a.model, subfolder="unet")
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet_lora_config = LoraConfig(r=a.rank, lora_alpha=a.rank, init_lora_weights="gaussian",
                                  target_modules=["to_k", "to_q", "to_v", "to_out.0"])
    unet.to(device, dtype=weight_dtype)
    vae.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    unet.add_adapter(unet_lora_config)
    # (the script casts the LoRA parameters to fp32 only for fp16 mixed precision)
    lora_layers = [q for q in unet.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    unet.train()

    vocab = text_encoder.config.vocab_size
    seq = text_encoder.config.max_position_embeddings  # tokenizer.model_max_length (77)

    if a.cached_latents:
        s = a.resolution // 2 ** (len(vae.config.block_out_channels) - 1)
        cached_mean = torch.randn(a.batch, vae.config.latent_channels, s, s, device=device, dtype=weight_dtype)
        cached_std = torch.full_like(cached_mean, 0.1)

    def step():
        input_ids = torch.randint(0, vocab, (a.batch, seq), device=device)
        if a.cached_latents:
            latents = cached_mean + cached_std * torch.randn_like(cached_mean)
        else:
            pixel_values = torch.rand(a.batch, 3, a.resolution, a.resolution, device=device) * 2 - 1
            latents = vae.encode(pixel_values.to(dtype=weight_dtype)).latent_dist.sample()
        latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,), device=latents.device).long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
        target = noise  # epsilon prediction
        # accelerate runs the prepared unet under autocast for --mixed_precision bf16
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_layers, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    flops = {}
    if a.count_flops:
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        flops = {"flops_per_step": counter.get_total_flops()}
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
    if a.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    for _ in range(a.warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    n = 0
    while n < a.steps or time.perf_counter() - t0 < a.min_seconds:
        step()
        n += 1
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0

    out = {"steps_per_sec": n / seconds, "steps": n, "seconds": seconds,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
           "threads": torch.get_num_threads(), **flops}
    if cuda:
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
