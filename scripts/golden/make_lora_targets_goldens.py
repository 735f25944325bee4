#!/usr/bin/env python3
"""Goldens for test/lora-targets.test.ts: LoRA beyond attention (ff, proj_in/proj_out, LoCon convs) in every format.

How to run (from the repository root, after `npx tsc -p .`, the native build and
`node scripts/make-export-fixtures.js lora-targets`), with diffusers' src/ and sd-scripts' checkout on PYTHONPATH:

    PYTHONPATH=/path/to/diffusers/src:/path/to/sd-scripts python3 scripts/golden/make_lora_targets_goldens.py

Inputs (written by train-lora, committed): test/fixtures/lora-targets/checkpoint-3/ (a 3-step run on models/tiny with
--lora-target-preset full --rank 2 --lora-alpha 4 --conv-rank 1 --conv-alpha 0.5) and its exports in lora/.

For the UNet inputs of test/fixtures/golden/tiny/inputs.safetensors it computes in float64 and stores in
test/fixtures/lora-targets/golden.safetensors:

  noise_pred_base        the UNet without LoRA
  noise_pred_diffusers   StableDiffusionPipeline.load_lora_weights(lora/pytorch_lora_weights.safetensors)
  noise_pred_peft        PeftModel.from_pretrained(unet, lora/lora_weights)
  noise_pred_kohya       load_lora_weights(lora/lora_kohya.safetensors) (diffusers' kohya converter)
  noise_pred_sdscripts   sd-scripts' own loader: networks.lora.create_network_from_weights on the diffusers UNet
                         (same module names and classes as sd-scripts' SD1 UNet), apply_to + load_weights
  noise_pred_merged      a `checkpoints export --merge` UNet loaded by UNet2DConditionModel.from_pretrained
  noise_pred_sdscripts_file  sdscripts_locon.safetensors (written here by sd-scripts' LoRANetwork, conv_dim 1)
                         applied by sd-scripts

and in golden.json: the peft configs diffusers and peft built (r, lora_alpha, rank_pattern/alpha_pattern sizes),
sd-scripts' UNet module names for its default network (LoRANetwork, lora_dim 4) and with conv_dim 2 on models/tiny,
and the same two lists on SD 1.5's real architecture (UNet2DConditionModel from assets/sd15-model's config, built on
the meta device), with each module's kind (Linear / Conv2d kernel).

sd-scripts is imported as it is; its image-only dependencies (torchvision, cv2, einops, the SDXL UNet module) are
replaced by stand-ins because networks/lora.py imports them at module level but never uses them for SD1 networks.
Nothing of diffusers or sd-scripts is copied into the repository.
"""

from __future__ import annotations

import json
import sys
import tempfile
import types
from unittest import mock

import torch

from common import (ADAPTER, FIXTURES, REPO, TINY_INPUTS, export_merged, rel_err, tiny_peft_unet, tiny_pipeline,
                    tiny_unet, unet_pred, versions)
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

for _name in ["torchvision", "torchvision.transforms", "cv2", "einops"]:
    sys.modules.setdefault(_name, mock.MagicMock())
_sdxl = types.ModuleType("library.sdxl_original_unet")
_sdxl.SdxlUNet2DConditionModel = type("SdxlUNet2DConditionModel", (), {})  # never an SD1 UNet's class
sys.modules.setdefault("library.sdxl_original_unet", _sdxl)
try:
    import networks.lora as kohya_lora  # sd-scripts
except ImportError:  # pragma: no cover
    sys.exit("sd-scripts not importable: put its checkout on PYTHONPATH")

FIX = FIXTURES / "lora-targets"
LORA = FIX / "lora"
SD15_UNET_CONFIG = REPO / "assets" / "sd15-model" / "unet" / "config.json"  # SD 1.5's real config


def lora_config(model):
    c = model.peft_config[ADAPTER]
    return {"r": c.r, "lora_alpha": c.lora_alpha, "rank_pattern": len(c.rank_pattern), "alpha_pattern": len(c.alpha_pattern)}


class _NoTextEncoder(torch.nn.Module):
    pass


def kohya_modules(unet, conv_dim=None):
    """sd-scripts' UNet LoRA modules (name, kind, dim, alpha) for its default network, or with conv_dim (LoCon)."""
    kw = {"conv_lora_dim": conv_dim, "conv_alpha": 1.0} if conv_dim else {}
    # LoRANetwork extends its class-level UNET_TARGET_REPLACE_MODULE list in place when conv_dim or modules_dim is
    # given (harmless in sd-scripts, which builds one network per process); start each network from the default.
    kohya_lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"]
    net = kohya_lora.LoRANetwork(_NoTextEncoder(), unet, lora_dim=4, alpha=8, **kw)
    return [[m.lora_name, type(m.lora_down).__name__ + ("" if isinstance(m.lora_down, torch.nn.Linear) else f"{m.lora_down.kernel_size[0]}x{m.lora_down.kernel_size[1]}"),
             m.lora_dim, float(m.alpha)] for m in net.unet_loras]


def main():
    torch.manual_seed(0)
    x = load_file(str(TINY_INPUTS))
    out: dict[str, torch.Tensor] = {}
    info: dict = {"versions": versions("diffusers", "peft", "transformers", "torch")}

    out["noise_pred_base"] = unet_pred(tiny_unet(), x)

    pipe = tiny_pipeline(LORA, "pytorch_lora_weights.safetensors")
    info["diffusers_config"] = lora_config(pipe.unet)
    out["noise_pred_diffusers"] = unet_pred(pipe.unet, x)
    del pipe

    pm = tiny_peft_unet(LORA / "lora_weights")
    info["peft_config"] = lora_config(pm)
    out["noise_pred_peft"] = unet_pred(pm.base_model.model, x)
    del pm

    pipe = tiny_pipeline(LORA, "lora_kohya.safetensors")
    out["noise_pred_kohya"] = unet_pred(pipe.unet, x)
    del pipe

    # sd-scripts: the network built from the file's own module dims/alphas, applied to the UNet, weights loaded.
    unet = tiny_unet()
    kohya_file = str(LORA / "lora_kohya.safetensors")
    net, sd = kohya_lora.create_network_from_weights(1.0, kohya_file, None, _NoTextEncoder(), unet, for_inference=True)
    net.apply_to(_NoTextEncoder(), unet, apply_text_encoder=False, apply_unet=True)
    missing, unexpected = net.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing[:5], unexpected[:5])
    info["sdscripts_modules_loaded"] = len(net.unet_loras)
    net.to(torch.float64)  # its modules are not children of the UNet (apply_to patches forward)
    out["noise_pred_sdscripts"] = unet_pred(unet, x)
    del net, unet

    with tempfile.TemporaryDirectory() as tmp:
        out["noise_pred_merged"] = unet_pred(UNet2DConditionModel.from_pretrained(str(export_merged(FIX / "checkpoint-3", tmp) / "unet")), x)

    # A LoCon file written by sd-scripts itself (what users download): LoRANetwork with its defaults (alpha 1,
    # conv_alpha 1) at dim 2 / conv_dim 1 on models/tiny, lora_up drawn at random so every module matters, saved as
    # save_weights saves it (its state_dict in float32; the sshs_* hash metadata is left out), and applied by sd-scripts.
    unet = tiny_unet()
    kohya_lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"]
    torch.manual_seed(1)
    net = kohya_lora.LoRANetwork(_NoTextEncoder(), unet, lora_dim=2, alpha=1, conv_lora_dim=1, conv_alpha=1)
    with torch.no_grad():
        for m in net.unet_loras:
            m.lora_up.weight.normal_(0.0, 0.5)
    net.apply_to(_NoTextEncoder(), unet, apply_text_encoder=False, apply_unet=True)  # registers the modules
    sd = {k: v.detach().float().contiguous() for k, v in net.state_dict().items()}
    assert len(sd) == 3 * 117, len(sd)
    save_file(sd, str(FIX / "sdscripts_locon.safetensors"), metadata={"ss_network_module": "networks.lora", "ss_network_dim": "2", "ss_network_alpha": "1.0"})
    net.to(torch.float64)
    out["noise_pred_sdscripts_file"] = unet_pred(unet, x)
    info["sdscripts_file_vs_base"] = rel_err(out["noise_pred_sdscripts_file"], out["noise_pred_base"])
    del net, unet

    # sd-scripts' module sets: models/tiny, and SD 1.5's real architecture (no weights needed: the meta device).
    tiny = tiny_unet()
    info["sdscripts_tiny_default"] = kohya_modules(tiny)
    info["sdscripts_tiny_conv"] = kohya_modules(tiny, conv_dim=2)
    with torch.device("meta"):
        sd15 = UNet2DConditionModel.from_config(json.loads(SD15_UNET_CONFIG.read_text()))
    info["sdscripts_sd15_default"] = kohya_modules(sd15)
    info["sdscripts_sd15_conv"] = kohya_modules(sd15, conv_dim=2)
    info["sd15_counts"] = {"default": len(info["sdscripts_sd15_default"]), "conv": len(info["sdscripts_sd15_conv"])}

    for k in ["noise_pred_peft", "noise_pred_kohya", "noise_pred_sdscripts", "noise_pred_merged"]:
        info.setdefault("rel_vs_diffusers", {})[k] = rel_err(out[k], out["noise_pred_diffusers"])
    info["rel_lora_vs_base"] = rel_err(out["noise_pred_diffusers"], out["noise_pred_base"])
    for k, v in info["rel_vs_diffusers"].items():
        assert v < 1e-6, (k, v)

    save_file({k: v.contiguous() for k, v in out.items()}, str(FIX / "golden.safetensors"), metadata={"versions": json.dumps(info["versions"])})
    (FIX / "golden.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    print(json.dumps({k: info[k] for k in ["diffusers_config", "peft_config", "rel_vs_diffusers", "rel_lora_vs_base", "sd15_counts", "sdscripts_modules_loaded", "sdscripts_file_vs_base"]}, indent=2))


if __name__ == "__main__":
    main()
