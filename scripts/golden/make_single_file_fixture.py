#!/usr/bin/env python3
"""The tiny test model as one original-layout (LDM) Stable Diffusion file, for test/single-file.test.ts.

How to run (from the repository root; diffusers' source tree, not an installed package, because the reverse converter
is one of its scripts, not part of the library):

    DIFFUSERS=/path/to/diffusers python3 scripts/golden/make_single_file_fixture.py

It converts test/fixtures/models/tiny (diffusers layout) with diffusers' own reverse converter,
scripts/convert_diffusers_to_original_stable_diffusion.py (its convert_unet_state_dict / convert_vae_state_dict /
convert_text_enc_state_dict, imported from $DIFFUSERS, nothing copied), and writes
test/fixtures/models/tiny-single-file.safetensors (float32, the same tensors as the folder):

  model.diffusion_model.*         the UNet          (input_blocks / middle_block / output_blocks)
  first_stage_model.*             the VAE           (encoder.down.N.block.M / mid.attn_1 / decoder.up.N ...)
  cond_stage_model.transformer.*  the CLIP text encoder

One correction: the reverse converter hard-codes SD's four VAE levels when it numbers the decoder's up blocks
(diffusers up_blocks.i -> up.{3 - i}); for the tiny model's two levels that gives up.3 / up.2, which diffusers'
own forward converter does not read back. Those keys are renumbered to up.{n - 1 - i} (n = 2), the layout of a real
two-level LDM VAE.

The file is then proven with diffusers' forward converters (diffusers.loaders.single_file_utils:
convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, run with the folder's configs):
each gives back exactly the folder's state dict (same names, bit-identical tensors).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "test" / "fixtures" / "models" / "tiny"
OUT = REPO / "test" / "fixtures" / "models" / "tiny-single-file.safetensors"


def diffusers_converters():
    """diffusers' reverse converter script (diffusers -> original names) and its single_file_utils (original ->
    diffusers), from the source tree named by $DIFFUSERS."""
    diffusers_root = Path(os.environ.get("DIFFUSERS", ""))
    script = diffusers_root / "scripts" / "convert_diffusers_to_original_stable_diffusion.py"
    if not script.is_file():
        sys.exit("set DIFFUSERS to a diffusers source tree (with scripts/convert_diffusers_to_original_stable_diffusion.py and src/)")
    sys.path.insert(0, str(diffusers_root / "src"))
    spec = importlib.util.spec_from_file_location("convert_to_original", script)
    conv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conv)
    from diffusers.loaders import single_file_utils as sfu

    return conv, sfu


def main() -> None:
    conv, sfu = diffusers_converters()

    unet = load_file(str(TINY / "unet" / "diffusion_pytorch_model.safetensors"))
    vae = load_file(str(TINY / "vae" / "diffusion_pytorch_model.safetensors"))
    text = load_file(str(TINY / "text_encoder" / "model.safetensors"))
    unet_cfg = json.loads((TINY / "unet" / "config.json").read_text())
    vae_cfg = json.loads((TINY / "vae" / "config.json").read_text())

    sd_unet = {"model.diffusion_model." + k: v for k, v in conv.convert_unet_state_dict(dict(unet)).items()}
    sd_vae = conv.convert_vae_state_dict(dict(vae))
    levels = len(vae_cfg["up_block_types"])
    fixed = {}
    for k, v in sd_vae.items():
        m = re.match(r"^decoder\.up\.(\d+)\.(.*)$", k)
        if m:
            i = 3 - int(m.group(1))  # the diffusers up_blocks index the converter numbered as 3 - i
            k = f"decoder.up.{levels - 1 - i}.{m.group(2)}"
        fixed[k] = v
    sd_vae = {"first_stage_model." + k: v for k, v in fixed.items()}
    assert "text_model.encoder.layers.22.layer_norm2.bias" not in text  # an SD 1.x (CLIP ViT) text encoder
    sd_text = {"cond_stage_model.transformer." + k: v for k, v in conv.convert_text_enc_state_dict(dict(text)).items()}
    state = {**sd_unet, **sd_vae, **sd_text}
    assert len(state) == len(unet) + len(vae) + len(text)
    state = {k: v.contiguous().to(torch.float32) for k, v in state.items()}

    # diffusers' forward converters must give the folder back exactly.
    back = {
        "unet": (sfu.convert_ldm_unet_checkpoint(state, unet_cfg), unet),
        "vae": (sfu.convert_ldm_vae_checkpoint(state, vae_cfg), vae),
        "text_encoder": (sfu.convert_ldm_clip_checkpoint(state), text),
    }
    for name, (got, want) in back.items():
        assert set(got) == set(want), (name, sorted(set(got) ^ set(want))[:10])
        for k in want:
            assert got[k].shape == want[k].shape and torch.equal(got[k].float(), want[k].float()), (name, k)

    OUT.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(OUT), metadata={"format": "pt"})
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(state)} tensors, float32); diffusers' converters give the folder back exactly")


if __name__ == "__main__":
    main()
