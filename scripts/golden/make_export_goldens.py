#!/usr/bin/env python3
"""Proof that the LoRA files train-lora exports load in diffusers and peft (goldens for test/export.test.ts).

How to run (from the repository root, after `npx tsc -p .`, the native build and `node scripts/make-export-fixtures.js export`):

    PYTHONPATH=/path/to/diffusers/src python3 scripts/golden/make_export_goldens.py

Inputs (written by train-lora, committed): test/fixtures/export/checkpoint-3/ (a LoRA checkpoint of a seeded
3-step run on test/fixtures/models/tiny, rank 4, alpha 8) and test/fixtures/export/lora/ (that checkpoint exported
by `exportCheckpoint` in every format). The script also runs `node dist/cli.js checkpoints export ... --merge`
into a temporary folder to get a merged pipeline.

For the UNet inputs of test/fixtures/golden/tiny/inputs.safetensors it computes, in float64 (timestep embedding
float32 inside diffusers, as in make_goldens.py), and stores in test/fixtures/export/golden.safetensors:

  noise_pred_base        UNet2DConditionModel.from_pretrained(models/tiny/unet), no LoRA
  noise_pred_diffusers   StableDiffusionPipeline.load_lora_weights(lora/pytorch_lora_weights.safetensors)
  noise_pred_peft        PeftModel.from_pretrained(unet, lora/lora_weights)
  noise_pred_kohya       StableDiffusionPipeline.load_lora_weights(lora/lora_kohya.safetensors) (diffusers converts it
                         with _convert_non_diffusers_lora_to_diffusers)
  noise_pred_merged      UNet2DConditionModel.from_pretrained(<merged>/final_pipeline/unet), no LoRA

and test/fixtures/export/golden.json: the adapter configs diffusers and peft built from the files (r, lora_alpha,
target_modules), the kohya key -> PEFT key map of the adapter diffusers built from the kohya file, the network alphas of
diffusers' converter, sd-scripts' hashes of
the kohya file (train_util.precalculate_safetensors_hashes, re-implemented below: it is 25 lines), the hashes of a
synthetic > 1 MiB file (so the legacy hash covers real bytes), the components StableDiffusionPipeline loaded from
final_pipeline/, and the largest difference between our merged UNet weights and diffusers' own fuse_lora().

Nothing of diffusers or sd-scripts is copied into the repository; diffusers is imported from PYTHONPATH.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from io import BytesIO

import torch

from common import (ADAPTER, FIXTURES, TINY_INPUTS, export_merged, rel_err, tiny_peft_unet, tiny_pipeline, tiny_unet,
                    unet_pred, versions)
import safetensors.torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FIX = FIXTURES / "export"
LORA = FIX / "lora"


# ---- sd-scripts' hashes (library/train_util.py, precalculate_safetensors_hashes and the two addnet hashes) ----
def precalculate_safetensors_hashes(tensors, metadata):
    metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = BytesIO(safetensors.torch.save(tensors, metadata))
    return addnet_hash_safetensors(b), addnet_hash_legacy(b)


def addnet_hash_legacy(b):
    m = hashlib.sha256()
    b.seek(0x100000)
    m.update(b.read(0x10000))
    return m.hexdigest()[0:8]


def addnet_hash_safetensors(b):
    h = hashlib.sha256()
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    for chunk in iter(lambda: b.read(1024 * 1024), b""):
        h.update(chunk)
    return h.hexdigest()


def lora_config(model):
    c = model.peft_config[ADAPTER]
    return {"r": c.r, "lora_alpha": c.lora_alpha, "target_modules": sorted(c.target_modules)}


def synthetic_kohya():
    """> 1 MiB of exactly representable values, so the legacy hash reads real bytes (test/export.test.ts builds the same)."""
    tensors = {}
    for i in range(3):
        n = 64 * 2048
        v = (torch.arange(n, dtype=torch.float64) + 1000 * i).remainder(251) / 8
        tensors[f"lora_unet_m{i}.lora_down.weight"] = v.float().reshape(64, 2048)
        tensors[f"lora_unet_m{i}.alpha"] = torch.tensor(float(i + 1))
    meta = {"ss_network_dim": "64", "ss_output_name": "synthetic", "ss_sd_model_name": "tiny"}
    model_hash, legacy_hash = precalculate_safetensors_hashes(tensors, meta)
    return {"metadata": meta, "modules": 3, "rows": 64, "cols": 2048, "model_hash": model_hash, "legacy_hash": legacy_hash}


def main():
    torch.manual_seed(0)
    x = load_file(str(TINY_INPUTS))
    out: dict[str, torch.Tensor] = {}
    info: dict = {"versions": versions("diffusers", "peft", "transformers", "torch", "safetensors")}

    out["noise_pred_base"] = unet_pred(tiny_unet(), x)

    # diffusers format: the pipeline loader, rank/alpha from lora_adapter_metadata.
    pipe = tiny_pipeline(LORA, "pytorch_lora_weights.safetensors")
    info["diffusers_config"] = lora_config(pipe.unet)
    out["noise_pred_diffusers"] = unet_pred(pipe.unet, x)
    # diffusers' own fuse, to compare with our merged weights below.
    pipe.fuse_lora(components=["unet"], lora_scale=1.0)
    pipe.unload_lora_weights()
    fused = {k: v.float() for k, v in pipe.unet.state_dict().items()}
    del pipe

    # peft adapter folder.
    pm = tiny_peft_unet(LORA / "lora_weights")
    info["peft_config"] = lora_config(pm)
    out["noise_pred_peft"] = unet_pred(pm.base_model.model, x)
    del pm

    # kohya file: the pipeline loader converts it; also the converter's own key map and alphas.
    kohya_file = LORA / "lora_kohya.safetensors"
    pipe = tiny_pipeline(LORA, "lora_kohya.safetensors")
    info["kohya_config"] = lora_config(pipe.unet)
    out["noise_pred_kohya"] = unet_pred(pipe.unet, x)
    # Where each kohya tensor ended up: the PEFT key of the UNet's adapter (diffusers' converter keeps the values
    # and passes alpha separately, so the tensors are found by value).
    peft_sd = get_peft_model_state_dict(pipe.unet, adapter_name=ADAPTER)
    del pipe
    sd = load_file(str(kohya_file))
    _, alphas = _convert_non_diffusers_lora_to_diffusers(dict(sd))
    key_map = {}
    for k, v in sd.items():
        if k.endswith(".alpha"):
            continue
        hits = [pk for pk, pv in peft_sd.items() if pv.shape == v.shape and torch.equal(pv.float(), v)]
        assert len(hits) == 1, (k, hits)
        key_map[k] = hits[0]
    assert len(key_map) == len(peft_sd)
    info["kohya_key_map"] = key_map
    info["kohya_network_alphas"] = {k: float(v) for k, v in alphas.items()}
    with safe_open(str(kohya_file), "pt") as f:
        meta = f.metadata()
    model_hash, legacy_hash = precalculate_safetensors_hashes(sd, meta)
    assert meta["sshs_model_hash"] == model_hash, (meta["sshs_model_hash"], model_hash)
    assert meta["sshs_legacy_hash"] == legacy_hash, (meta["sshs_legacy_hash"], legacy_hash)
    info["kohya_hashes"] = {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    info["synthetic_kohya"] = synthetic_kohya()

    # The merged pipeline, written by our CLI, loaded by diffusers.
    with tempfile.TemporaryDirectory() as tmp:
        final = export_merged(FIX / "checkpoint-3", tmp)
        merged_pipe = StableDiffusionPipeline.from_pretrained(str(final), safety_checker=None, requires_safety_checker=False)
        info["final_pipeline_components"] = sorted(k for k, v in merged_pipe.components.items() if v is not None)
        del merged_pipe
        merged = UNet2DConditionModel.from_pretrained(str(final / "unet"))
        ours = {k: v.float() for k, v in merged.state_dict().items()}
        info["merged_vs_fuse_lora_max_rel"] = max(rel_err(ours[k], fused[k]) for k in fused if fused[k].norm() > 0)
        assert set(ours) == set(fused)
        out["noise_pred_merged"] = unet_pred(merged, x)

    for k in ["noise_pred_diffusers", "noise_pred_peft", "noise_pred_kohya", "noise_pred_merged"]:
        info.setdefault("rel_vs_diffusers", {})[k] = rel_err(out[k], out["noise_pred_diffusers"])
        info.setdefault("rel_vs_base", {})[k] = rel_err(out[k], out["noise_pred_base"])
    for k, v in info["rel_vs_diffusers"].items():
        assert v < 1e-6, (k, v)
    assert info["merged_vs_fuse_lora_max_rel"] < 1e-6, info["merged_vs_fuse_lora_max_rel"]

    save_file({k: v.contiguous() for k, v in out.items()}, str(FIX / "golden.safetensors"), metadata={"versions": json.dumps(info["versions"])})
    (FIX / "golden.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: info[k] for k in ["diffusers_config", "peft_config", "kohya_config", "rel_vs_base", "rel_vs_diffusers",
                                           "merged_vs_fuse_lora_max_rel", "final_pipeline_components"]}, indent=2))


if __name__ == "__main__":
    main()
