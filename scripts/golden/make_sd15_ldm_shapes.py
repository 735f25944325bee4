#!/usr/bin/env python3
"""The tensor names and shapes of a real SD 1.5 single-file checkpoint (original LDM layout), without its weights, for
test/single-file.test.ts (configs inferred from SD 1.5's real shapes).

From test/fixtures/sd15/{unet,vae,text_encoder}_param_shapes.json (SD 1.5's diffusers names and shapes) it builds
meta tensors (no memory), converts them with diffusers' reverse converter
scripts/convert_diffusers_to_original_stable_diffusion.py (imported from $DIFFUSERS, which hard-codes exactly SD 1.x's
four levels), checks with diffusers' forward converters (single_file_utils.convert_ldm_*_checkpoint with SD 1.5's
configs) that every diffusers name comes back with its shape, and writes test/fixtures/sd15/ldm_param_shapes.json
({"model.diffusion_model.input_blocks.0.0.weight": [320, 4, 3, 3], ...}).

Usage:  DIFFUSERS=/path/to/diffusers python3 scripts/golden/make_sd15_ldm_shapes.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_single_file_fixture import diffusers_converters  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHAPES = REPO / "test" / "fixtures" / "sd15"
CONFIGS = REPO / "assets" / "sd15-model"


def main() -> None:
    conv, sfu = diffusers_converters()

    meta = {}
    for c in ["unet", "vae", "text_encoder"]:
        shapes = json.loads((SHAPES / f"{c}_param_shapes.json").read_text())
        meta[c] = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    state = {}
    state.update({"model.diffusion_model." + k: v for k, v in conv.convert_unet_state_dict(dict(meta["unet"])).items()})
    state.update({"first_stage_model." + k: v for k, v in conv.convert_vae_state_dict(dict(meta["vae"])).items()})
    state.update({"cond_stage_model.transformer." + k: v for k, v in conv.convert_text_enc_state_dict(dict(meta["text_encoder"])).items()})

    unet_cfg = json.loads((CONFIGS / "unet" / "config.json").read_text())
    vae_cfg = json.loads((CONFIGS / "vae" / "config.json").read_text())
    back = {
        "unet": sfu.convert_ldm_unet_checkpoint(state, unet_cfg),
        "vae": sfu.convert_ldm_vae_checkpoint(state, vae_cfg),
        "text_encoder": sfu.convert_ldm_clip_checkpoint(state),
    }
    for c, got in back.items():
        want = meta[c]
        assert set(got) == set(want), (c, sorted(set(got) ^ set(want))[:10])
        for k in want:
            assert tuple(got[k].shape) == tuple(want[k].shape), (c, k, got[k].shape, want[k].shape)
    out = SHAPES / "ldm_param_shapes.json"
    out.write_text(json.dumps({k: list(v.shape) for k, v in sorted(state.items())}, indent=0) + "\n")
    print(f"wrote {out}: {len(state)} tensors; diffusers' forward converters give every SD 1.5 name and shape back")


if __name__ == "__main__":
    main()
