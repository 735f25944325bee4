#!/usr/bin/env python3
"""Loads a merged pipeline folder of a --variant base (train-lora --merge) with diffusers, as test/export-metadata.test.ts
asks: `StableDiffusionPipeline.from_pretrained(FINAL, variant=VARIANT, torch_dtype=torch.float16)` must load every component, and the UNet it
loaded is run on the UNet inputs of INPUTS (float64, as make_export_goldens.py runs UNets).

    PYTHONPATH=/path/to/diffusers/src python3 scripts/golden/check_variant_merge.py FINAL VARIANT INPUTS OUT.safetensors

Writes OUT.safetensors (tensor noise_pred) and prints one JSON line: the components loaded, each model component's
parameter dtype. Nothing of diffusers is copied here.
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import load_file, save_file

from diffusers import StableDiffusionPipeline


def main() -> None:
    final, variant, inputs, out = sys.argv[1:5]
    pipe = StableDiffusionPipeline.from_pretrained(
        final, variant=variant, torch_dtype=torch.float16, safety_checker=None, requires_safety_checker=False
    )
    dtypes = {}
    for name in ["unet", "vae", "text_encoder"]:
        m = getattr(pipe, name)
        dtypes[name] = str(next(m.parameters()).dtype).replace("torch.", "")
    components = sorted(k for k, v in pipe.components.items() if v is not None)
    x = load_file(inputs)
    unet = pipe.unet.to(torch.float64).eval()
    with torch.no_grad():
        pred = unet(x["latents"].double(), x["timesteps"], x["encoder_hidden_states"].double()).sample.float()
    save_file({"noise_pred": pred.contiguous()}, out)
    print(json.dumps({"components": components, "dtypes": dtypes}))


if __name__ == "__main__":
    main()
