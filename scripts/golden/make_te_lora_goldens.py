#!/usr/bin/env python3
"""Goldens for TEXT-ENCODER LoRA (--train-text-encoder): the training step and the three export formats.

How to run (from the repository root; CPU only, no network; about a minute):

    PYTHONPATH=/path/to/diffusers/src python3 scripts/golden/make_te_lora_goldens.py

Requirements: as make_train_golden.py (torch, transformers 5.x, peft, diffusers source tree on PYTHONPATH). It needs
test/fixtures/models/tiny and test/fixtures/golden/train/inputs.safetensors (latents, noise, timesteps, captions and
the UNet's initial LoRA, shared with the UNet-only golden). Nothing of diffusers/peft is copied; they are imported.

A. Training (test/fixtures/golden/te_lora/expected_train.*): diffusers' dreambooth LoRA loop with
   --train_text_encoder (examples/dreambooth/train_dreambooth_lora.py): UNet LoRA (to_k, to_q, to_v, to_out.0) plus a
   transformers CLIPTextModel with a peft LoRA (here q_proj, k_proj, v_proj, out_proj and the MLP's fc1, fc2), rank 4,
   alpha 8; the text encoder runs with grad in train mode; loss as train_text_to_image_lora.py; accumulation 2;
   clip_grad_norm_ over both models' LoRA parameters; torch AdamW with TWO param groups (UNet lr 1e-3, text encoder
   lr 5e-4: sd-scripts' --text_encoder_lr / diffusers' advanced script's text_encoder_lr); diffusers' cosine schedule
   with 2 warmup steps (LambdaLR scales both groups by the same factor); 3 optimizer steps. Reference in float64,
   float32 noise floor in stats. The text encoder's initial LoRA is peft's gaussian init after set_seed(1234) and the
   UNet's adapter (stored as te_lora_init.*).

B. Exports (test/fixtures/golden/te_lora/export/): a LoRA with non-zero B (checkpoint.safetensors, train-lora's
   checkpoint layout `unet.<module>.lora_A.weight`, `text_encoder.text_model.<module>.lora_A.weight`, alpha 8), and
   what the other tools write and load for it:
   * diffusers.safetensors: StableDiffusionPipeline.save_lora_weights(unet_lora_layers=..., text_encoder_lora_layers=
     convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder)), *_lora_adapter_metadata) as the
     dreambooth script saves it;
   * peft_text_encoder/adapter_model.safetensors: PeftModel(CLIPTextModel).save_pretrained;
   * kohya_keys.json: the sd-scripts / A1111 names (lora_te_text_model_encoder_layers_N_..., lora_unet_...);
   * outputs.safetensors: the text encoder's last_hidden_state for fixed ids: base, and with the LoRA loaded by
     diffusers from the diffusers file, by peft (PeftModel.from_pretrained) and from a kohya file with those names
     converted by diffusers' kohya converter (all three must agree; checked here).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

import make_train_golden as tg  # the UNet golden's inputs, loss and helpers
from common import FIXTURES, TINY_MODEL, deterministic, load_frozen_models, rel_err, save_tensors, tiny_pipeline, versions
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

OUT = FIXTURES / "golden" / "te_lora"
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
UNET_LR, TE_LR = 1e-3, 5e-4
MAX_GRAD_NORM = 0.1


def te_params(te) -> dict:
    """{checkpoint key: parameter}: text_encoder.text_model.<module>.lora_A.weight (train-lora's spelling)."""
    return {"text_encoder.text_model." + n.replace(".default", ""): p for n, p in te.named_parameters() if "lora_" in n}


def load_models(dtype, unet_init: dict, te_init: dict | None):
    unet, te = load_frozen_models(dtype)
    tg.set_seed(tg.SEED)
    unet.add_adapter(LoraConfig(r=tg.RANK, lora_alpha=tg.LORA_ALPHA, init_lora_weights="gaussian", target_modules=tg.TARGET_MODULES))
    te.add_adapter(LoraConfig(r=tg.RANK, lora_alpha=tg.LORA_ALPHA, init_lora_weights="gaussian", target_modules=TE_TARGETS))
    with torch.no_grad():
        for k, p in tg.lora_params(unet).items():
            p.copy_(unet_init[k].to(dtype))
        if te_init is not None:
            for k, p in te_params(te).items():
                p.copy_(te_init[k].to(dtype))
    return unet, te


def train(x: dict, unet_init: dict, te_init: dict, dtype) -> dict:
    noise_scheduler = DDPMScheduler.from_pretrained(TINY_MODEL, subfolder="scheduler")
    unet, te = load_models(dtype, unet_init, te_init)
    up, tp = list(tg.lora_params(unet).values()), list(te_params(te).values())
    optimizer = torch.optim.AdamW(
        [{"params": up, "lr": UNET_LR}, {"params": tp, "lr": TE_LR}],
        lr=UNET_LR, betas=tg.ADAM["betas"], weight_decay=tg.ADAM["weight_decay"], eps=tg.ADAM["eps"],
    )
    sched = get_scheduler(tg.LR_SCHEDULER, optimizer=optimizer, num_warmup_steps=tg.LR_WARMUP_STEPS, num_training_steps=tg.MAX_TRAIN_STEPS)
    unet.train()
    te.train()
    res = {"loss": [], "grad_norm": [], "lr": [], "te_lr": []}
    for i in range(tg.NUM_MICRO_STEPS):
        batch = {k: x[f"{k}.{i}"] for k in ("latents", "noise", "timesteps", "input_ids")}
        loss = tg.compute_loss(noise_scheduler, unet, te, batch, dtype, None, None)
        res["loss"].append(float(loss.detach()))
        (loss / tg.GRADIENT_ACCUMULATION_STEPS).backward()
        if i % tg.GRADIENT_ACCUMULATION_STEPS == 1:
            res["lr"].append(optimizer.param_groups[0]["lr"])
            res["te_lr"].append(optimizer.param_groups[1]["lr"])
            res["grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(up + tp, MAX_GRAD_NORM)))
            optimizer.step()
            sched.step()
            optimizer.zero_grad()
    res["lora"] = {**{k: v.detach().clone() for k, v in tg.lora_params(unet).items()}, **{k: v.detach().clone() for k, v in te_params(te).items()}}
    return res


def part_a(meta: dict) -> dict:
    inputs = load_file(str(tg.OUT / "inputs.safetensors"))
    x = {k: v for k, v in inputs.items() if not k.startswith("lora_init.")}
    unet_init = {k[len("lora_init."):]: v for k, v in inputs.items() if k.startswith("lora_init.")}
    _, te = load_models(torch.float32, unet_init, None)
    te_init = {k: p.detach().clone() for k, p in te_params(te).items()}
    del te
    ref = train(x, unet_init, te_init, torch.float64)
    f32 = train(x, unet_init, te_init, torch.float32)
    clipped = [n > MAX_GRAD_NORM for n in ref["grad_norm"]]
    assert any(clipped) and not all(clipped), ref["grad_norm"]
    tensors = {"te_lora_init." + k: v for k, v in te_init.items()}
    tensors.update({"lora." + k: v.float() for k, v in ref["lora"].items()})
    save_tensors(OUT / "expected_train.safetensors", tensors, meta)
    info = {
        "te_targets": TE_TARGETS, "unet_lr": UNET_LR, "te_lr": TE_LR, "max_grad_norm": MAX_GRAD_NORM,
        **{f"loss.{i}": v for i, v in enumerate(ref["loss"])},
        **{f"grad_norm.{i}": v for i, v in enumerate(ref["grad_norm"])},
        **{f"lr.{i}": v for i, v in enumerate(ref["lr"])},
        **{f"te_lr.{i}": v for i, v in enumerate(ref["te_lr"])},
        **{f"clipped.{i}": c for i, c in enumerate(clipped)},
    }
    with open(OUT / "expected_train.json", "w") as fh:
        json.dump(info, fh, indent=2)
        fh.write("\n")
    te_keys = [k for k in ref["lora"] if k.startswith("text_encoder.")]
    return {
        "fp32_vs_fp64_lora_max_rel": max(rel_err(f32["lora"][k].double(), ref["lora"][k]) for k in ref["lora"] if ref["lora"][k].norm() > 0),
        "fp32_vs_fp64_loss_max_rel": max(abs(a - b) / abs(b) for a, b in zip(f32["loss"], ref["loss"])),
        "te_update_rel": max(rel_err(ref["lora"][k], te_init[k].double()) for k in te_keys if te_init[k].norm() > 0),
        "te_B_norm_after": max(float(ref["lora"][k].norm()) for k in te_keys if ".lora_B." in k),
        "grad_norm": ref["grad_norm"],
    }


def part_b(meta: dict) -> dict:
    d = OUT / "export"
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(777)
    pipe = tiny_pipeline()
    te, unet = pipe.text_encoder, pipe.unet
    ids = torch.randint(2, 998, (2, 77), generator=g)
    ids[:, 0] = 998
    ids[0, 20:] = 999
    with torch.no_grad():
        base = te(ids)[0]
    unet_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=tg.TARGET_MODULES)
    te_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    unet.add_adapter(unet_cfg)
    te.add_adapter(te_cfg)
    with torch.no_grad():
        for m in (unet, te):
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "lora_A" in n else 0.2))
        want = te(ids)[0]
    ckpt = {**{k: v.detach().clone() for k, v in tg.lora_params(unet).items()}, **{k: v.detach().clone() for k, v in te_params(te).items()}}
    save_tensors(d / "checkpoint.safetensors", ckpt, {"lora_alpha": "8", **meta})
    # diffusers, as the dreambooth LoRA script saves it (+ the adapter metadata diffusers writes for rank/alpha)
    te_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(te))
    unet_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    tmp = Path(tempfile.mkdtemp())
    StableDiffusionPipeline.save_lora_weights(
        tmp, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=te_cfg.to_dict(),
    )
    dfile = d / "diffusers.safetensors"
    os.replace(tmp / "pytorch_lora_weights.safetensors", dfile)
    # peft, the text encoder's adapter folder
    te2 = CLIPTextModel.from_pretrained(TINY_MODEL, subfolder="text_encoder")
    pm = get_peft_model(te2, LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    res = set_peft_model_state_dict(pm, {"base_model.model." + k: v for k, v in get_peft_model_state_dict(te).items()})
    assert not res.unexpected_keys, res.unexpected_keys
    pm.save_pretrained(str(d / "peft_text_encoder"))
    for extra in ("README.md",):
        (d / "peft_text_encoder" / extra).unlink(missing_ok=True)
    # kohya names (sd-scripts: lora_te_ + the module path with dots as underscores; alpha tensors)
    kohya = {}
    for k, v in ckpt.items():
        comp, rest = k.split(".", 1)
        mod, ab = rest.rsplit(".lora_", 1)
        name = ("lora_unet_" if comp == "unet" else "lora_te_") + mod.replace(".", "_")
        kohya[name + (".lora_down.weight" if ab.startswith("A") else ".lora_up.weight")] = v
        kohya[name + ".alpha"] = torch.tensor(8.0)
    kfile = tmp / "kohya.safetensors"
    save_file(kohya, str(kfile))
    with open(d / "kohya_keys.json", "w") as fh:
        json.dump(sorted(kohya), fh, indent=1)
        fh.write("\n")

    outs = {}
    with torch.no_grad():
        p1 = tiny_pipeline(d, dfile.name)
        outs["diffusers"] = p1.text_encoder(ids)[0]
        # kohya: diffusers' own kohya converter maps every name to its module (pipe.load_lora_weights of a kohya file
        # with text-encoder keys fails under transformers 5 inside diffusers, which looks the modules up with the
        # text_model. level it no longer has), loaded with peft at the converter's alpha.
        conv, alphas = _convert_non_diffusers_lora_to_diffusers(load_file(str(kfile)))
        te_conv = convert_state_dict_to_peft({k[len("text_encoder."):]: v for k, v in conv.items() if k.startswith("text_encoder.")})
        assert len(te_conv) == len([k for k in kohya if k.startswith("lora_te_") and not k.endswith(".alpha")]), len(te_conv)
        te_alphas = {float(v) for k, v in alphas.items() if k.startswith("text_encoder.")}
        assert te_alphas == {8.0}, te_alphas
        tk = get_peft_model(CLIPTextModel.from_pretrained(TINY_MODEL, subfolder="text_encoder"),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
        res = set_peft_model_state_dict(tk, {"base_model.model." + k.removeprefix("text_model."): v for k, v in te_conv.items()})
        assert not [k for k in res.missing_keys if "lora_" in k] and not res.unexpected_keys, res
        outs["kohya"] = tk(ids)[0]
        pp = PeftModel.from_pretrained(CLIPTextModel.from_pretrained(TINY_MODEL, subfolder="text_encoder"), str(d / "peft_text_encoder"))
        outs["peft"] = pp(ids)[0]
    diffs = {k: float((v - want).abs().max()) for k, v in outs.items()}
    assert all(v < 1e-5 for v in diffs.values()), diffs
    save_tensors(d / "outputs.safetensors", {"input_ids": ids, "base": base, "lora": want}, meta)
    return {"loaders_vs_peft_forward_max_abs": diffs, "lora_vs_base_rel": float((want - base).norm() / base.norm())}


def main():
    deterministic(max_threads=4)
    OUT.mkdir(parents=True, exist_ok=True)
    vers = versions(*tg.TRAIN_LIBRARIES)
    meta = {"generator": "scripts/golden/make_te_lora_goldens.py"}
    stats = {"versions": vers, "train": part_a(meta), "export": part_b(meta)}
    with open(OUT / "stats.json", "w") as fh:
        json.dump(stats, fh, indent=2, sort_keys=True)
        fh.write("\n")
    print(json.dumps(stats, indent=1))


if __name__ == "__main__":
    main()
