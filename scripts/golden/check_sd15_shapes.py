#!/usr/bin/env python3
"""Check that current diffusers/transformers module names and shapes equal the real SD 1.5 checkpoints.

How to run (from the repository root; no network, no weights, no memory: models are built on the meta device):

    PYTHONPATH=/path/to/diffusers/src python3 scripts/golden/check_sd15_shapes.py [--sd15 /work/shared/sd15]

It builds diffusers' UNet2DConditionModel and AutoencoderKL and transformers' CLIPTextModel from
<sd15>/{unet,vae,text_encoder}/config.json and compares every parameter name and shape with
<sd15>/<component>/param_shapes.json (the names/shapes of the real checkpoint files) and the totals in
<sd15>/summary.json.  transformers 5.x's CLIPTextModel has no `text_model` submodule, while real checkpoints
name the text encoder's weights `text_model.*`; the check reports that and then compares with the prefix
added.  Exit status 0 when everything matches (after that documented prefix), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

try:
    from diffusers import AutoencoderKL, UNet2DConditionModel
except ImportError:  # pragma: no cover
    sys.exit("diffusers not importable: run with PYTHONPATH=/path/to/diffusers/src")
from transformers import CLIPTextConfig, CLIPTextModel


def shapes_of(model: torch.nn.Module) -> dict[str, list[int]]:
    return {n: list(p.shape) for n, p in model.named_parameters()}


def compare(component: str, ours: dict, ref: dict, summary: dict | None) -> bool:
    missing = sorted(set(ref) - set(ours))
    extra = sorted(set(ours) - set(ref))
    mismatched = sorted(k for k in set(ref) & set(ours) if list(ref[k]) != list(ours[k]))
    n_ours = sum(math.prod(s) for s in ours.values())
    ok = not missing and not extra and not mismatched
    line = f"{component:13s} tensors ours={len(ours)} ref={len(ref)} params ours={n_ours:,}"
    if summary:
        line += f" ref={summary['num_params']:,}"
        ok = ok and n_ours == summary["num_params"] and len(ours) == summary["num_tensors"]
    print(line + ("  OK" if ok else "  MISMATCH"))
    for title, items in (("missing (in checkpoint, not in model)", missing), ("extra (in model, not in checkpoint)", extra)):
        if items:
            print(f"  {title}: {len(items)}")
            for k in items[:10]:
                print(f"    {k}")
    for k in mismatched[:10]:
        print(f"  shape mismatch {k}: ours {ours[k]} ref {ref[k]}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sd15", default="/work/shared/sd15")
    args = ap.parse_args()
    root = Path(args.sd15)
    summary = json.loads((root / "summary.json").read_text()) if (root / "summary.json").exists() else {}

    def load(component: str):
        return (
            json.loads((root / component / "config.json").read_text()),
            json.loads((root / component / "param_shapes.json").read_text()),
        )

    all_ok = True
    with torch.device("meta"):
        cfg, ref = load("unet")
        unet = UNet2DConditionModel.from_config(cfg)
        all_ok &= compare("unet", shapes_of(unet), ref, summary.get("unet"))

        cfg, ref = load("vae")
        vae = AutoencoderKL.from_config(cfg)
        all_ok &= compare("vae", shapes_of(vae), ref, summary.get("vae"))

        cfg, ref = load("text_encoder")
        te = CLIPTextModel(CLIPTextConfig(**cfg))
    ours = shapes_of(te)
    if not any(k.startswith("text_model.") for k in ours):
        print("text_encoder: this transformers' CLIPTextModel names parameters without the `text_model.` prefix "
              "(e.g. embeddings.token_embedding.weight); real checkpoints have it -> comparing with it added")
        ours = {"text_model." + k: v for k, v in ours.items()}
    all_ok &= compare("text_encoder", ours, ref, summary.get("text_encoder"))
    buffers = [n for n, _ in te.named_buffers()]
    print(f"text_encoder buffers (not compared; files written by old transformers may also hold "
          f"text_model.embeddings.position_ids, which a loader must ignore): {buffers}")

    print("RESULT:", "all names and shapes match" if all_ok else "MISMATCH")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
