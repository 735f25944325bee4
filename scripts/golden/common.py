"""What the golden scripts in this folder share: the fixture paths, the library versions they record, relative errors,
the safetensors writing, the tiny fixture model's loaders, the UNet forward they compare, and train-lora's scheduler
names. Each script imports it as `common` (its own folder is first on sys.path when it runs).

diffusers is imported from PYTHONPATH (its source tree); nothing of it is copied into this repository.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

try:
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
except ImportError:  # pragma: no cover
    sys.exit("diffusers not importable: run with PYTHONPATH=/path/to/diffusers/src")

from peft import PeftModel
from safetensors.torch import save_file
from transformers import CLIPTextModel

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "test" / "fixtures"
TINY_MODEL = FIXTURES / "models" / "tiny"  # written by make_goldens.py
TINY_INPUTS = FIXTURES / "golden" / "tiny" / "inputs.safetensors"  # its UNet inputs: latents, timesteps, encoder_hidden_states
ADAPTER = "exported"  # the adapter name the export goldens load LoRA files under

# train-lora's scheduler names -> the diffusers classes they stand for
SCHEDULERS = {
    "pndm": PNDMScheduler,
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}


def deterministic(max_threads: int):
    """Deterministic torch kernels on at most max_threads CPU threads (the thread count can change float sums)."""
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(max(1, min(max_threads, os.cpu_count() or 1)))


LIBRARIES = ("torch", "transformers", "peft", "diffusers", "safetensors")  # what a golden's stats record by default


def versions(*packages: str) -> dict:
    """{package: its __version__} for the packages given (default LIBRARIES), in that order (some scripts write the
    dict unsorted)."""
    return {name: importlib.import_module(name).__version__ for name in packages or LIBRARIES}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (/ 1 where b is zero)."""
    a, b = a.double(), b.double()
    d = float(torch.linalg.vector_norm(b))
    return float(torch.linalg.vector_norm(a - b)) / (d if d > 0 else 1.0)


# ---- safetensors ---------------------------------------------------------------------------------------------


def save_tensors(path: Path, tensors: dict, meta: dict | None = None):
    """save_file with contiguous tensors and {"format": "pt", **meta} as the metadata."""
    save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(path), metadata={"format": "pt", **(meta or {})})


def canonicalize_header(path: Path):
    """Sort the `__metadata__` entries of a safetensors header in place.

    The safetensors writer keeps the metadata in a hash map, so their order in the header (not their values,
    not the tensors) changes from run to run.  Sorting them makes re-generated files byte-identical.  Only done
    when re-serializing the parsed header reproduces the original bytes exactly (so nothing else changes).
    """
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n]
    text = header.rstrip(b" ")
    obj = json.loads(text)
    if json.dumps(obj, separators=(",", ":")).encode() != text:
        raise RuntimeError(f"{path}: unexpected header serialization; not canonicalizing")
    if "__metadata__" not in obj:
        return
    obj = {"__metadata__": dict(sorted(obj["__metadata__"].items())), **{k: v for k, v in obj.items() if k != "__metadata__"}}
    new = json.dumps(obj, separators=(",", ":")).encode()
    assert len(new) == len(text)
    path.write_bytes(raw[:8] + new + header[len(text) :] + raw[8 + n :])


# ---- the tiny fixture model ----------------------------------------------------------------------------------


def tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(str(TINY_MODEL / "unet"))


def tiny_pipeline(lora_dir: Path | None = None, weight_name: str | None = None) -> StableDiffusionPipeline:
    """models/tiny as a StableDiffusionPipeline (no safety checker); with weight_name, that LoRA file of lora_dir loaded
    by the pipeline's own loader as adapter ADAPTER."""
    pipe = StableDiffusionPipeline.from_pretrained(str(TINY_MODEL), safety_checker=None, requires_safety_checker=False)
    if weight_name is not None:
        pipe.load_lora_weights(str(lora_dir), weight_name=weight_name, adapter_name=ADAPTER)
    return pipe


def tiny_peft_unet(adapter_dir: Path) -> PeftModel:
    """models/tiny's UNet with a peft adapter folder loaded by PeftModel.from_pretrained as adapter ADAPTER."""
    return PeftModel.from_pretrained(tiny_unet(), str(adapter_dir), adapter_name=ADAPTER)


def load_frozen_models(dtype, model: Path = TINY_MODEL):
    """A diffusers folder's UNet and CLIPTextModel as the training scripts load them: frozen, cast to dtype."""
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", dtype=torch.float32)
    for m in (unet, text_encoder):
        m.requires_grad_(False)
        m.to(dtype=dtype)
    return unet, text_encoder


def unet_pred(unet, x: dict) -> torch.Tensor:
    """The UNet's noise prediction in float64 for the inputs x (TINY_INPUTS' keys), returned as float32."""
    unet = unet.to(torch.float64).eval()
    with torch.no_grad():
        return unet(x["latents"].double(), x["timesteps"], x["encoder_hidden_states"].double()).sample.float()


def export_merged(checkpoint: Path, out_dir: str) -> Path:
    """Runs train-lora's `checkpoints export --merge` (dist/cli.js) of a checkpoint on models/tiny into out_dir;
    returns the merged pipeline folder."""
    cmd = ["node", str(REPO / "dist" / "cli.js"), "checkpoints", "export", str(checkpoint), "--format", "diffusers",
           "--merge", "--out", out_dir, "--model", str(TINY_MODEL)]
    subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return Path(out_dir) / "final_pipeline"
