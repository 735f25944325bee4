#!/usr/bin/env python3
"""Reference outputs of diffusers / transformers / peft for `train-lora forward`, on any device and dtype.

    reference_forward.py make-inputs --model DIR --out DIR [--latent-size 32] [--image-size 64] [--seed 0]
    reference_forward.py run --jobs JOBS.json

make-inputs: for a model folder without golden files (e.g. `train-lora make-tiny-model --preset sd15`), writes
  DIR/inputs.safetensors (input_ids, latents, timesteps, encoder_hidden_states, image, vae_latents, target: the
  golden inputs' names, seeded) and DIR/lora_peft.safetensors (a UNet LoRA with peft keys and diffusers'
  lora_adapter_metadata, r=4, alpha=8, B != 0), made as scripts/golden/make_goldens.py makes the fixtures'.

run: JOBS.json is a list of {"model", "inputs", "lora" (optional), "device", "dtype": "fp64"|"fp32"|"bf16", "out"}.
  Without "lora": text_embeddings, noise_pred, vae_mean, vae_std, vae_decoded of the base model.
  With "lora" (peft keys, as above): the UNet with that LoRA: noise_pred, loss (MSE against `target`) and
  grad.<key of the LoRA file> of every LoRA parameter.
  These are the names `train-lora forward` writes. Outputs are stored as float32. Weights are cast to the dtype
  (fp64: exact copies of the stored fp32 values), inputs too; TF32 is off for fp32 on CUDA. Models are loaded
  once per folder and device. Prints one JSON line: {"ok": true, "seconds": S, versions...} or {"error": "..."}.

Set DIFFUSERS_SRC to a diffusers repository or its `src` folder when diffusers is not installed.
"""
import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if os.environ.get("DIFFUSERS_SRC"):  # a diffusers repository or its src folder
    _src = os.environ["DIFFUSERS_SRC"]
    sys.path.insert(0, os.path.join(_src, "src") if os.path.isdir(os.path.join(_src, "src", "diffusers")) else _src)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "golden"))


def fail(msg):
    print(json.dumps({"error": msg}), flush=True)
    sys.exit(2)


try:
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel

    # the fixtures' generator: the same forward/backward, LoRA initialisation and metadata as the golden files
    from make_goldens import (
        TIMESTEPS,
        UNET_LORA,
        adapter_metadata,
        base_forward,
        lora_params,
        set_lora_weights,
        unet_lora_forward_backward,
        versions,
    )
except Exception as e:  # ImportError, or e.g. a torchvision built for another torch
    hint = " (set DIFFUSERS_SRC to a diffusers repository or its src folder)" if getattr(e, "name", None) == "diffusers" else ""
    fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}{hint}")

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16}


def ieee_fp32():
    """TF32 off for fp32 matmuls and convolutions (the API of torch >= 2.9, else the older flags)."""
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    except AttributeError:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def load_models(model: str):
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").eval().requires_grad_(False)
    te = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=torch.float32).eval().requires_grad_(False)
    return unet, vae, te


def make_inputs(a):
    torch.manual_seed(a.seed)
    unet, vae, te = load_models(a.model)
    g = torch.Generator().manual_seed(a.seed + 1)
    tc = te.config
    # ordinary tokens lie below the special ones (tiny: bos 998, eos 999), or above them where the config keeps
    # CLIP's original small ids (SD 1.5: bos 0, eos 2; its tokenizer's own are 49406, 49407)
    low = min(tc.bos_token_id, tc.eos_token_id)
    lo, hi = (2, low) if low > 2 else (3, tc.vocab_size - 2)
    ids = torch.full((2, tc.max_position_embeddings), tc.eos_token_id, dtype=torch.int64)
    for row, n in enumerate((6, 19)):
        ids[row, 0] = tc.bos_token_id
        ids[row, 1 : 1 + n] = torch.randint(lo, hi, (n,), generator=g)
        ids[row, 1 + n] = tc.eos_token_id
    lc, s = unet.config.in_channels, a.latent_size
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    x = {
        "input_ids": ids,
        "latents": torch.randn(2, lc, s, s, generator=g),
        "timesteps": torch.tensor(TIMESTEPS, dtype=torch.int64),
        "encoder_hidden_states": torch.randn(2, tc.max_position_embeddings, unet.config.cross_attention_dim, generator=g),
        "image": torch.rand(1, 3, a.image_size, a.image_size, generator=g) * 2 - 1,
        "vae_latents": torch.randn(1, vae.config.latent_channels, a.image_size // f, a.image_size // f, generator=g),
        "target": torch.randn(2, unet.config.out_channels, s, s, generator=g),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in x.items()}, str(out / "inputs.safetensors"), metadata={"format": "pt"})
    unet.add_adapter(LoraConfig(**UNET_LORA))
    set_lora_weights(unet, torch.Generator().manual_seed(a.seed + 200), UNET_LORA["r"], 0.05)
    sd = {k: v.detach().float().contiguous() for k, v in lora_params(unet).items()}  # save_lora_weights adds "unet."
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(out),
        unet_lora_layers=sd,
        unet_lora_adapter_metadata=adapter_metadata(unet),
        weight_name="lora_peft.safetensors",
        safe_serialization=True,
    )
    print(json.dumps({"ok": True, "inputs": str(out / "inputs.safetensors"), "lora": str(out / "lora_peft.safetensors")}), flush=True)


def add_lora(unet, file: str):
    """Adds the peft-keyed UNet LoRA of `file` to `unet` (rank, alpha and targets from its metadata); returns it."""
    with safe_open(file, "pt") as fh:
        meta = json.loads(fh.metadata()["lora_adapter_metadata"])
    cfg = {k[len("unet.") :]: v for k, v in meta.items() if k.startswith("unet.")}
    unet.add_adapter(LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"]))
    params = lora_params(unet)
    sd = load_file(file)
    assert set(sd) == {"unet." + k for k in params}, f"{file}: keys differ from the adapter's parameters"
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(sd["unet." + k])
            p.requires_grad_(True)
    return unet


def outputs(job, models, device):
    """One job's outputs (on the device), from copies of the loaded fp32 models cast to the job's dtype."""
    dtype = DTYPES[job["dtype"]]
    x = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in load_file(job["inputs"]).items()}
    base_unet, base_vae, base_te = models
    if job.get("lora"):
        pred, loss, grads = unet_lora_forward_backward(add_lora(copy.deepcopy(base_unet).to(dtype), job["lora"]), x)
        return {"noise_pred": pred, "loss": loss, **{"grad.unet." + k: g for k, g in grads.items()}}
    return base_forward(*(copy.deepcopy(m).to(dtype) for m in models), x)


def run(a):
    jobs = json.loads(Path(a.jobs).read_text())
    t0 = time.perf_counter()
    loaded = {}
    for job in jobs:
        device = torch.device(job["device"])
        if device.type == "cuda":
            ieee_fp32()
        key = (job["model"], job["device"])
        if key not in loaded:
            loaded.clear()  # one model on the device at a time
            loaded[key] = [m.to(device) for m in load_models(job["model"])]
        out = outputs(job, loaded[key], device)
        tmp = job["out"] + ".tmp"  # renamed into place: a job stopped half-way leaves no file
        save_file({k: v.detach().float().cpu().contiguous() for k, v in out.items()}, tmp, metadata={"format": "pt", **job_meta(job)})
        os.replace(tmp, job["out"])
        del out
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps({"ok": True, "jobs": len(jobs), "seconds": time.perf_counter() - t0, **versions()}), flush=True)


def job_meta(job):
    return {"producer": "scripts/bench/reference_forward.py", "device": job["device"], "dtype": job["dtype"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-inputs")
    m.add_argument("--model", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--latent-size", type=int, default=32)
    m.add_argument("--image-size", type=int, default=64)
    m.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("--jobs", required=True)
    a = p.parse_args()
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    try:
        make_inputs(a) if a.cmd == "make-inputs" else run(a)
    except Exception as e:  # one JSON line for the caller, the traceback on stderr
        import traceback

        traceback.print_exc()
        fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


if __name__ == "__main__":
    main()
