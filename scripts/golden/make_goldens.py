#!/usr/bin/env python3
"""Generate the tiny model configs and the golden reference files for train-lora.

How to run (from the repository root; no network needed):

    PYTHONPATH=/path/to/diffusers/src python3 scripts/golden/make_goldens.py

Requirements: Python >= 3.10, torch, transformers (5.x), peft, safetensors, accelerate and the diffusers
*source tree* on PYTHONPATH (this script only imports diffusers; nothing of it is copied into this repo).
Runs on CPU in about a minute.  Everything is seeded, so re-running with the same library versions gives
the same tensors.

Options:
    --only-assets        write only assets/tiny-model/ (configs, no weights) and stop
    --models tiny,alt    which golden model configs to build (default: both)
    --skip-verify        skip the reload/round-trip checks at the end
    --tokenizer DIR      tokenizer folder copied into each fixture model (default: assets/tiny-clip-tokenizer)

What it writes (see test/fixtures/golden/README.md for the full contract):

  assets/tiny-model/                 model_index.json, {unet,vae,text_encoder}/config.json,
                                     scheduler/scheduler_config.json -- the `tiny` preset, configs only
  test/fixtures/models/<name>/       full diffusers pipeline layout with seeded random (non-trivial) fp32
                                     weights, saved with save_pretrained; tokenizer/ copied
  test/fixtures/golden/<name>/       inputs.safetensors, outputs.safetensors (float64 reference stored as
                                     float32), LoRA files in diffusers / peft / kohya formats, stats.json

The reference outputs are computed with every model cast to float64 (weights are the stored fp32 values,
which are exactly representable), inputs cast to float64; only diffusers' sinusoidal timestep embedding is
computed in float32 internally by diffusers itself (get_timestep_embedding uses float32 regardless of the
model dtype), exactly as the fp32 pipeline does.  The same outputs computed in float32 are compared with
the float64 ones and the relative errors (the "noise floor") are printed and saved in stats.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from common import FIXTURES, REPO, canonicalize_header, deterministic, rel_err, save_tensors, versions
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

ASSETS_TINY = REPO / "assets" / "tiny-model"
DEFAULT_TOKENIZER = REPO / "assets" / "tiny-clip-tokenizer"

# ----------------------------------------------------------------------------------------------------------
# Model configs
# ----------------------------------------------------------------------------------------------------------

# SD 1.5's scheduler/scheduler_config.json (the values of runwayml/stable-diffusion-v1-5, re-saved by current
# diffusers, which adds timestep_spacing="leading", PNDM's default).
SD15_SCHEDULER = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    num_train_timesteps=1000,
    prediction_type="epsilon",
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    timestep_spacing="leading",
    trained_betas=None,
)

# Everything not given here is the class default, which for UNet2DConditionModel / AutoencoderKL equals SD 1.5
# (flip_sin_to_cos=True, freq_shift=0, norm_eps=1e-5, act_fn=silu, downsample_padding=1, ...).  What every fixture
# model shares with SD 1.5 (latent and image channels, VAE scaling factor, the up blocks mirroring the down blocks,
# the CLIP context length and special tokens of the tiny 1000-token vocabulary) is filled in by these three.
UP_BLOCK = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


def unet_config(down_block_types: list, **kw) -> dict:
    up_block_types = [UP_BLOCK[t] for t in reversed(down_block_types)]
    return dict(sample_size=32, in_channels=4, out_channels=4, down_block_types=down_block_types, up_block_types=up_block_types, **kw)


def vae_config(block_out_channels: list, **kw) -> dict:
    n = len(block_out_channels)
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                block_out_channels=block_out_channels, latent_channels=4, scaling_factor=0.18215, **kw)


def text_encoder_config(hidden_size: int, **kw) -> dict:
    return dict(vocab_size=1000, hidden_size=hidden_size, projection_dim=hidden_size, max_position_embeddings=77,
                bos_token_id=998, eos_token_id=999, pad_token_id=1, **kw)


CONFIGS = {
    "tiny": dict(
        # attention_head_dim: SD-1.x naming, this is the number of heads (see README)
        unet=unet_config(["CrossAttnDownBlock2D", "DownBlock2D"], block_out_channels=[32, 64], layers_per_block=2,
                         cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32),
        vae=vae_config([32, 64], layers_per_block=1, norm_num_groups=32, sample_size=64),
        text_encoder=text_encoder_config(32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4, hidden_act="quick_gelu"),
    ),
    "alt": dict(
        # per-block number of heads (SD-1.x/2.x naming); down: 2, 4, (8); mid: 8; up reversed: (8), 4, 2
        unet=unet_config(["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"], block_out_channels=[32, 48, 64],
                         layers_per_block=1, cross_attention_dim=24, attention_head_dim=[2, 4, 8], use_linear_projection=True,
                         upcast_attention=True, norm_num_groups=16),
        vae=vae_config([16, 32, 32], layers_per_block=2, norm_num_groups=8, sample_size=32),
        text_encoder=text_encoder_config(24, intermediate_size=50, num_hidden_layers=3, num_attention_heads=2, hidden_act="gelu"),
    ),
}

# How the text-encoder weights are laid out in text_encoder/model.safetensors.  transformers 5.x's
# CLIPTextModel has no `text_model` submodule any more and save_pretrained (for a model not loaded from a
# prefixed checkpoint) writes bare names (`embeddings.token_embedding.weight`); every real SD 1.5 checkpoint
# (written by transformers 4.x) has `text_model.embeddings.token_embedding.weight`.  transformers 5 loads both.
# `tiny` uses the real-checkpoint layout, `alt` the transformers-5 layout, so loaders are tested on both.
TEXT_MODEL_PREFIX = {"tiny": True, "alt": False}

UNET_LORA = dict(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"])
TEXT_LORA = dict(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])

SEEDS = {"tiny": 1234, "alt": 5678}
TIMESTEPS = [10, 999]


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def build_models(cfg: dict):
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    te_cfg = CLIPTextConfig(**cfg["text_encoder"])
    te_cfg.architectures = ["CLIPTextModel"]
    text_encoder = CLIPTextModel(te_cfg)
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER)  # from_config keeps clip_sample like SD 1.5's file
    return unet, vae, text_encoder, scheduler


def save_model_index(unet, vae, text_encoder, scheduler, out_dir: Path):
    """model_index.json exactly as StableDiffusionPipeline.save_pretrained writes it (no safety checker)."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=None,  # the tokenizer is copied as files; register its class below
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.register_to_config(tokenizer=("transformers", "CLIPTokenizer"))
    pipe.save_config(out_dir)


def write_assets_tiny():
    """assets/tiny-model: the `tiny` preset as a diffusers layout WITHOUT weights."""
    unet, vae, text_encoder, scheduler = build_models(CONFIGS["tiny"])
    if ASSETS_TINY.exists():
        shutil.rmtree(ASSETS_TINY)
    ASSETS_TINY.mkdir(parents=True)
    unet.save_config(ASSETS_TINY / "unet")  # same config.json as save_pretrained writes
    vae.save_config(ASSETS_TINY / "vae")
    with tempfile.TemporaryDirectory() as tmp:  # config.json exactly as CLIPTextModel.save_pretrained writes it
        text_encoder.save_pretrained(tmp)
        (ASSETS_TINY / "text_encoder").mkdir()
        shutil.copyfile(Path(tmp) / "config.json", ASSETS_TINY / "text_encoder" / "config.json")
    scheduler.save_config(ASSETS_TINY / "scheduler")
    save_model_index(unet, vae, text_encoder, scheduler, ASSETS_TINY)
    print(f"wrote {ASSETS_TINY.relative_to(REPO)}")


@torch.no_grad()
def make_nontrivial(model: torch.nn.Module, gen: torch.Generator):
    """Perturb every parameter with seeded noise so no code path is hidden by zeros or ones.

    1-D `weight` (GroupNorm/LayerNorm scales): 1 + 0.25 N(0,1); 1-D biases: += 0.1 N(0,1); embedding tables:
    0.5 N(0,1); weight matrices / conv kernels: += 0.25 std(W) N(0,1), or N(0, 1/fan_in) where the default
    init is all zeros.  This keeps activations O(1) (see stats.json: activation RMS ranges).
    """
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        if p.ndim == 1:
            if name.endswith("weight"):
                p.copy_(1.0 + 0.25 * noise)
            else:
                p.add_(0.1 * noise)
        elif "embedding" in name and p.ndim == 2 and "embeddings" in name:
            p.copy_(0.5 * noise)
        else:
            std = float(p.std())
            if std == 0.0:
                fan_in = p[0].numel()
                p.copy_(noise / math.sqrt(fan_in))
            else:
                p.add_(0.25 * std * noise)


def rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def make_inputs(name: str, cfg: dict) -> dict:
    g = torch.Generator().manual_seed(SEEDS[name] + 1)
    te = cfg["text_encoder"]
    bos, eos, vocab = te["bos_token_id"], te["eos_token_id"], te["vocab_size"]
    ids = torch.full((2, 77), eos, dtype=torch.int64)  # SD's tokenizer pads with <|endoftext|> (= eos)
    for row, n in enumerate((6, 19)):
        ids[row, 0] = bos
        ids[row, 1 : 1 + n] = torch.randint(2, bos, (n,), generator=g)  # ordinary tokens, no specials
        ids[row, 1 + n] = eos
    latents = torch.randn(2, 4, 8, 8, generator=g)
    ehs = torch.randn(2, 77, cfg["unet"]["cross_attention_dim"], generator=g)
    image = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    f = 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)
    vae_latents = torch.randn(1, cfg["vae"]["latent_channels"], 32 // f, 32 // f, generator=g)
    target = torch.randn(2, 4, 8, 8, generator=g)
    return {
        "input_ids": ids,
        "latents": latents,
        "timesteps": torch.tensor(TIMESTEPS, dtype=torch.int64),
        "encoder_hidden_states": ehs,
        "image": image,
        "vae_latents": vae_latents,
        "target": target,
    }


def cast(inputs: dict, dtype) -> dict:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}


class ActivationMonitor:
    """Records min/max RMS of every leaf module's tensor output during a forward pass."""

    def __init__(self, model):
        self.stats = {}
        self.handles = [
            m.register_forward_hook(self._hook(n)) for n, m in model.named_modules() if len(list(m.children())) == 0
        ]

    def _hook(self, name):
        def fn(_m, _i, out):
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel() > 0:
                self.stats[name] = rms(out.detach())

        return fn

    def close(self):
        for h in self.handles:
            h.remove()
        lo = min(self.stats, key=self.stats.get)
        hi = max(self.stats, key=self.stats.get)
        return {"min_rms": [lo, self.stats[lo]], "max_rms": [hi, self.stats[hi]], "n_modules": len(self.stats)}


def base_forward(unet, vae, te, x: dict, monitor: dict | None = None):
    out = {}
    with torch.no_grad():
        mons = {}
        if monitor is not None:
            mons = {"text_encoder": ActivationMonitor(te), "unet": ActivationMonitor(unet), "vae": ActivationMonitor(vae)}
        out["text_embeddings"] = te(x["input_ids"]).last_hidden_state
        out["noise_pred"] = unet(x["latents"], x["timesteps"], x["encoder_hidden_states"]).sample
        dist = vae.encode(x["image"]).latent_dist
        out["vae_mean"] = dist.mean
        out["vae_std"] = dist.std
        out["vae_decoded"] = vae.decode(x["vae_latents"]).sample
        if monitor is not None:
            for k, m in mons.items():
                monitor[k] = m.close()
    return out


@torch.no_grad()
def input_sensitivity(unet, te, x: dict, ref: dict, seed: int) -> dict:
    """How much the outputs move when one conditioning path changes (shows no path is negligible)."""
    g = torch.Generator().manual_seed(seed + 400)
    ehs2 = torch.randn(x["encoder_hidden_states"].shape, generator=g).to(x["encoder_hidden_states"].dtype)
    ids2 = x["input_ids"].clone()
    ids2[0, 3] = (ids2[0, 3] + 1) % 998  # one ordinary token changed in sample 0
    return {
        "noise_pred: encoder_hidden_states -> other random": rel_err(
            unet(x["latents"], x["timesteps"], ehs2).sample, ref["noise_pred"]
        ),
        "noise_pred: timesteps [10, 999] -> [10, 998]": rel_err(
            unet(x["latents"], torch.tensor([10, 998]), x["encoder_hidden_states"]).sample, ref["noise_pred"]
        ),
        "text_embeddings[0]: input_ids[0,3] += 1": rel_err(te(ids2).last_hidden_state[0], ref["text_embeddings"][0]),
    }


def lora_params(model) -> dict:
    """{peft-state-dict key (adapter name stripped): parameter}."""
    return {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}


@torch.no_grad()
def set_lora_weights(model, gen: torch.Generator, r: int, b_std: float):
    """A ~ N(0, 1/r) (what peft's init_lora_weights="gaussian" draws) and B ~ N(0, b_std), both seeded here."""
    for n, p in sorted(lora_params(model).items()):
        if ".lora_A." in n:
            p.copy_(torch.randn(p.shape, generator=gen) / r)
        elif ".lora_B." in n:
            p.copy_(torch.randn(p.shape, generator=gen) * b_std)
        else:
            raise RuntimeError(n)


def unet_lora_forward_backward(unet, x: dict):
    for p in unet.parameters():
        p.grad = None
    pred = unet(x["latents"], x["timesteps"], x["encoder_hidden_states"]).sample
    loss = F.mse_loss(pred, x["target"].to(pred.dtype), reduction="mean")
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in lora_params(unet).items()}
    return pred.detach(), loss.detach(), grads


def adapter_metadata(model) -> dict:
    """peft config as diffusers' training scripts pass it (_collate_lora_metadata), sets made sorted lists."""
    md = model.peft_config["default"].to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in md.items()}


def to_kohya(peft_sd: dict, prefix: str, alpha: float) -> dict:
    """peft keys `<module>.lora_A.weight` -> kohya `<prefix>_<module with . -> _>.lora_down.weight` etc."""
    out = {}
    for k, v in peft_sd.items():
        module, kind = k.rsplit(".lora_", 1)
        name = prefix + "_" + module.replace(".", "_")
        if kind == "A.weight":
            out[name + ".lora_down.weight"] = v.contiguous()
            out[name + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        elif kind == "B.weight":
            out[name + ".lora_up.weight"] = v.contiguous()
        else:
            raise RuntimeError(k)
    return out


def save_diffusers_lora(path: Path, component: str, layers: dict, metadata: dict):
    """One component's LoRA ("unet" or "text_encoder") as StableDiffusionPipeline.save_lora_weights writes it."""
    StableDiffusionPipeline.save_lora_weights(
        save_directory=path.parent,
        weight_name=path.name,
        safe_serialization=True,
        **{f"{component}_lora_layers": layers, f"{component}_lora_adapter_metadata": metadata},
    )


def save_kohya_lora(path: Path, peft_sd: dict, prefix: str, lora: dict):
    """peft_sd in kohya's format (to_kohya) with a few of the ss_* metadata keys kohya-ss/sd-scripts writes (all values
    strings; informational only); lora: the LoraConfig arguments (r, lora_alpha)."""
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(lora["r"]),
        "ss_network_alpha": str(float(lora["lora_alpha"])),
        "ss_v2": "False",
        "ss_base_model_version": "sd_v1",
    }
    save_file(to_kohya(peft_sd, prefix, lora["lora_alpha"]), str(path), metadata=metadata)


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------------------------------------
# Main work per model config
# ----------------------------------------------------------------------------------------------------------


def save_text_encoder(te: CLIPTextModel, out_dir: Path, with_prefix: bool):
    te.save_pretrained(out_dir, safe_serialization=True)
    if with_prefix:
        f = out_dir / "model.safetensors"
        with safe_open(str(f), "pt") as fh:
            meta = fh.metadata()
        sd = load_file(str(f))
        save_file({("text_model." + k): v for k, v in sd.items()}, str(f), metadata=meta)


def make_one(name: str, tokenizer_dir: Path, b_std_unet: float, b_std_text: float) -> dict:
    cfg = CONFIGS[name]
    seed = SEEDS[name]
    model_dir = FIXTURES / "models" / name
    golden_dir = FIXTURES / "golden" / name
    for d in (model_dir, golden_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)

    # ---- models with non-trivial weights -------------------------------------------------------------
    torch.manual_seed(seed)
    unet, vae, te, scheduler = build_models(cfg)
    gen = torch.Generator().manual_seed(seed + 100)
    for m in (unet, vae, te):
        make_nontrivial(m, gen)
        m.eval()
        m.requires_grad_(False)

    unet.save_pretrained(model_dir / "unet", safe_serialization=True)
    vae.save_pretrained(model_dir / "vae", safe_serialization=True)
    save_text_encoder(te, model_dir / "text_encoder", TEXT_MODEL_PREFIX[name])
    scheduler.save_pretrained(model_dir / "scheduler")
    save_model_index(unet, vae, te, scheduler, model_dir)
    copy_tokenizer(tokenizer_dir, model_dir)

    # ---- inputs ----------------------------------------------------------------------------------------
    x32 = make_inputs(name, cfg)
    x64 = cast(x32, torch.float64)
    save_tensors(golden_dir / "inputs.safetensors", x32)

    # ---- base outputs: fp64 reference, fp32 for the noise floor -------------------------------------------
    unet64, vae64, te64 = (copy.deepcopy(m).double() for m in (unet, vae, te))
    act = {}
    ref = base_forward(unet64, vae64, te64, x64, monitor=act)
    f32 = base_forward(unet, vae, te, x32)
    sensitivity = input_sensitivity(unet64, te64, x64, ref, seed)

    # ---- UNet LoRA ------------------------------------------------------------------------------------
    unet.add_adapter(LoraConfig(**UNET_LORA))
    set_lora_weights(unet, torch.Generator().manual_seed(seed + 200), UNET_LORA["r"], b_std_unet)
    unet64 = copy.deepcopy(unet).double()
    for m in (unet, unet64):
        for p in lora_params(m).values():
            p.requires_grad_(True)
    pred64, loss64, grads64 = unet_lora_forward_backward(unet64, x64)
    pred32, loss32, grads32 = unet_lora_forward_backward(unet, x32)

    peft_sd = {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    assert set(peft_sd) == set(lora_params(unet)), "peft state dict keys != lora parameter names"
    diff_sd = convert_state_dict_to_diffusers(dict(peft_sd))
    peft_to_diff = {}
    for k in peft_sd:  # the conversion only renames keys; pair them up by tensor identity
        (dk,) = [d for d, v in diff_sd.items() if v is peft_sd[k]]
        peft_to_diff[k] = dk
    meta = adapter_metadata(unet)
    save_diffusers_lora(golden_dir / "pytorch_lora_weights.safetensors", "unet", diff_sd, dict(meta))
    save_diffusers_lora(golden_dir / "lora_peft.safetensors", "unet", peft_sd, dict(meta))
    save_kohya_lora(golden_dir / "lora_kohya.safetensors", peft_sd, "lora_unet", UNET_LORA)

    ref["noise_pred_lora"] = pred64
    ref["loss_lora"] = loss64
    f32["noise_pred_lora"] = pred32
    f32["loss_lora"] = loss32
    for k, g in grads64.items():
        ref["grad.unet." + peft_to_diff[k]] = g
        f32["grad.unet." + peft_to_diff[k]] = grads32[k]

    # ---- text-encoder LoRA (tiny only) -----------------------------------------------------------------
    if name == "tiny":
        te.add_adapter(LoraConfig(**TEXT_LORA))
        set_lora_weights(te, torch.Generator().manual_seed(seed + 300), TEXT_LORA["r"], b_std_text)
        te64 = copy.deepcopy(te).double()
        with torch.no_grad():
            ref["text_embeddings_lora"] = te64(x64["input_ids"]).last_hidden_state
            f32["text_embeddings_lora"] = te(x32["input_ids"]).last_hidden_state
        te_sd = {k: v.detach().float().contiguous() for k, v in get_peft_model_state_dict(te).items()}
        # transformers 5 has no `text_model.` level; write the real-checkpoint module paths
        # (text_model.encoder.layers.N.self_attn.q_proj) that every SD 1.5 text-encoder LoRA uses.
        te_sd = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in te_sd.items()}
        save_diffusers_lora(golden_dir / "text_lora_peft.safetensors", "text_encoder", te_sd, adapter_metadata(te))
        save_kohya_lora(golden_dir / "text_lora_kohya.safetensors", te_sd, "lora_te", TEXT_LORA)

    # ---- store outputs (fp64 reference as fp32) -----------------------------------------------------------
    outputs = {k: v.detach().to(torch.float32).contiguous() for k, v in ref.items()}
    vers = versions()
    save_tensors(
        golden_dir / "outputs.safetensors",
        outputs,
        {"generator": "scripts/golden/make_goldens.py", "reference_dtype": "float64", **vers},
    )

    # ---- stats ------------------------------------------------------------------------------------------
    stats = {"versions": vers, "outputs": {}, "activations_fp64": act, "sensitivity_fp64": sensitivity}
    print(f"\n== {name} ==")
    print(f"{'output':72s} {'shape':>16s} {'rms':>10s} {'fp32 vs fp64':>13s} {'fp32(ref) vs fp64':>17s}")
    for k in outputs:
        e = rel_err(f32[k], ref[k])
        e_store = rel_err(outputs[k], ref[k])  # rounding the reference to fp32
        stats["outputs"][k] = {
            "shape": list(outputs[k].shape),
            "rms": rms(ref[k]),
            "rel_err_fp32_vs_fp64": e,
            "rel_err_stored_fp32_vs_fp64": e_store,
        }
        if not k.startswith("grad.") or k.endswith("attn1.to_q.lora.down.weight"):
            print(f"{k:72s} {str(tuple(outputs[k].shape)):>16s} {rms(ref[k]):10.4g} {e:13.3e} {e_store:17.3e}")
    g = [v["rel_err_fp32_vs_fp64"] for k, v in stats["outputs"].items() if k.startswith("grad.")]
    stats["grad_rel_err_fp32_vs_fp64_max"] = max(g)
    print(f"grads: {len(g)} tensors, max fp32-vs-fp64 rel err {max(g):.3e}")
    stats["lora_effect"] = {
        "noise_pred_lora_vs_noise_pred_rel_diff": rel_err(ref["noise_pred_lora"], ref["noise_pred"]),
    }
    if "text_embeddings_lora" in ref:
        stats["lora_effect"]["text_embeddings_lora_vs_text_embeddings_rel_diff"] = rel_err(
            ref["text_embeddings_lora"], ref["text_embeddings"]
        )
    print("LoRA effect:", stats["lora_effect"])
    print("sensitivity (fp64):", sensitivity)
    print("activation RMS range (fp64):", json.dumps(act))
    for f in sorted(list(model_dir.rglob("*.safetensors")) + list(golden_dir.rglob("*.safetensors"))):
        canonicalize_header(f)
    stats["sizes_bytes"] = {
        "models/" + name: dir_size(model_dir),
        "golden/" + name: dir_size(golden_dir),
    }
    stats["num_params"] = {
        "unet": sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n),
        "vae": sum(p.numel() for p in vae.parameters()),
        "text_encoder": sum(p.numel() for n, p in te.named_parameters() if "lora_" not in n),
    }
    with open(golden_dir / "stats.json", "w") as fh:
        json.dump(stats, fh, indent=2, sort_keys=True)
        fh.write("\n")
    return stats


def copy_tokenizer(tokenizer_dir: Path, model_dir: Path) -> bool:
    dst = model_dir / "tokenizer"
    if not tokenizer_dir.is_dir() or not any(tokenizer_dir.iterdir()):
        print(f"WARNING: tokenizer folder {tokenizer_dir} missing; {dst} not written (re-run later)")
        return False
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(tokenizer_dir, dst)
    return True


# ----------------------------------------------------------------------------------------------------------
# Verification: reload everything from disk through the libraries' own loaders
# ----------------------------------------------------------------------------------------------------------


def verify(name: str):
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    model_dir = FIXTURES / "models" / name
    golden_dir = FIXTURES / "golden" / name
    x = load_file(str(golden_dir / "inputs.safetensors"))
    ref = load_file(str(golden_dir / "outputs.safetensors"))
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet").eval()
    vae = AutoencoderKL.from_pretrained(model_dir / "vae").eval()
    te = CLIPTextModel.from_pretrained(model_dir / "text_encoder", dtype=torch.float32).eval()
    out = base_forward(unet, vae, te, x)
    res = {k: rel_err(out[k], ref[k]) for k in out}

    def unet_with(file: str):
        u = UNet2DConditionModel.from_pretrained(model_dir / "unet").eval()
        sd, alphas, md = StableDiffusionPipeline.lora_state_dict(
            str(golden_dir), weight_name=file, return_lora_metadata=True
        )
        StableDiffusionPipeline.load_lora_into_unet(sd, alphas, u, metadata=md)
        with torch.no_grad():
            return u(x["latents"], x["timesteps"], x["encoder_hidden_states"]).sample

    for f in ("pytorch_lora_weights.safetensors", "lora_peft.safetensors", "lora_kohya.safetensors"):
        res["noise_pred_lora via " + f] = rel_err(unet_with(f), ref["noise_pred_lora"])

    if name == "tiny":
        for f in ("text_lora_peft.safetensors", "text_lora_kohya.safetensors"):
            t = CLIPTextModel.from_pretrained(model_dir / "text_encoder", dtype=torch.float32).eval()
            sd, alphas, md = StableDiffusionPipeline.lora_state_dict(
                str(golden_dir), weight_name=f, return_lora_metadata=True
            )
            # transformers 5's CLIPTextModel has no `text_model.` level: drop it for diffusers' loader
            sd = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in sd.items()}
            if alphas:
                alphas = {k.replace("text_encoder.text_model.", "text_encoder."): v for k, v in alphas.items()}
            StableDiffusionPipeline.load_lora_into_text_encoder(sd, alphas, t, metadata=md)
            with torch.no_grad():
                res["text_embeddings_lora via " + f] = rel_err(t(x["input_ids"]).last_hidden_state, ref["text_embeddings_lora"])

    with safe_open(str(golden_dir / "pytorch_lora_weights.safetensors"), "pt") as fh:
        assert LORA_ADAPTER_METADATA_KEY in fh.metadata()
    print(f"\n== verify {name} (fp32 from disk vs stored fp64 reference) ==")
    for k, v in res.items():
        print(f"  {k:60s} {v:.3e}")
    bad = {k: v for k, v in res.items() if not v < 1e-4}
    if bad:
        raise SystemExit(f"verification failed for {name}: {bad}")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only-assets", action="store_true")
    ap.add_argument("--models", default="tiny,alt")
    ap.add_argument("--skip-verify", action="store_true")
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    args = ap.parse_args()

    deterministic(max_threads=8)
    write_assets_tiny()
    if args.only_assets:
        return
    summary = {}
    for name in args.models.split(","):
        summary[name] = make_one(name, Path(args.tokenizer), b_std_unet=0.05, b_std_text=0.05)
    if not args.skip_verify:
        for name in args.models.split(","):
            verify(name)
    print("\nsizes (bytes):", {k: v for s in summary.values() for k, v in s["sizes_bytes"].items()})


if __name__ == "__main__":
    main()
