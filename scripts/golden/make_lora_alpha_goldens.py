#!/usr/bin/env python3
"""LoRAs whose alpha is not their rank, made with peft, for test/lora-alpha.test.ts (every LoRA at its true strength).

How to run (from the repository root):

    PYTHONPATH=/path/to/diffusers/src python3 scripts/golden/make_lora_alpha_goldens.py

A peft LoraConfig(r=4, lora_alpha=16) on test/fixtures/models/tiny's UNet (to_q/to_k/to_v/to_out.0), with seeded
random A and B (B is zero at peft's init, which would make every alpha look right), written to
test/fixtures/lora-alpha/:

  peft_adapter/            PeftModel.save_pretrained: adapter_config.json (r 4, lora_alpha 16) + adapter_model.safetensors
                           (keys base_model.model.<module>.lora_A.weight; no alpha anywhere in the file)
  checkpoint/              the same weights as a train-lora checkpoint's model.safetensors (unet.<module>.lora_A.weight,
                           no metadata) with a minimal trainer_state.json (config.train_mode lora, rank 4, lora_alpha 16)
  lora_meta.safetensors    the checkpoint's model.safetensors with lora_rank / lora_alpha in its metadata (as train-lora
                           writes it now)
  bare_peft.safetensors    the same keys and no metadata: its strength cannot be known
  golden.safetensors       noise_pred_base (no LoRA) and noise_pred_peft (PeftModel.from_pretrained(unet, peft_adapter)),
                           float64 UNet as in make_export_goldens.py, on test/fixtures/golden/tiny/inputs.safetensors

It asserts that peft reads r 4 / lora_alpha 16 back from the folder and that the adapter changes the output by far more
than the test tolerance (so a LoRA loaded at the wrong alpha cannot pass). peft's model card (README.md) is removed.
"""

from __future__ import annotations

import json
import shutil

import torch

from common import FIXTURES, TINY_INPUTS, rel_err, tiny_unet, unet_pred, versions
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

OUT = FIXTURES / "lora-alpha"
RANK, ALPHA = 4, 16
TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def main() -> None:
    torch.manual_seed(0)
    x = load_file(str(TINY_INPUTS))
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)

    base = unet_pred(tiny_unet(), x)

    unet = tiny_unet()
    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights="gaussian")
    pm = get_peft_model(unet, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(str(OUT / "peft_adapter"))
    (OUT / "peft_adapter" / "README.md").unlink(missing_ok=True)
    del pm, unet

    # The reference: peft loading the folder it wrote.
    unet = tiny_unet()
    pm = PeftModel.from_pretrained(unet, str(OUT / "peft_adapter"))
    c = pm.peft_config["default"]
    assert (c.r, c.lora_alpha) == (RANK, ALPHA), (c.r, c.lora_alpha)
    pred = unet_pred(pm.base_model.model, x)
    del pm, unet

    adapter = load_file(str(OUT / "peft_adapter" / "adapter_model.safetensors"))
    prefix = "base_model.model."
    assert all(k.startswith(prefix) for k in adapter), list(adapter)[:3]
    ckpt = {"unet." + k[len(prefix):]: v.contiguous() for k, v in adapter.items()}
    (OUT / "checkpoint").mkdir()
    save_file(ckpt, str(OUT / "checkpoint" / "model.safetensors"), metadata={"format": "pt"})
    state = {"version": 1, "global_step": 0, "config": {"train_mode": "lora", "rank": RANK, "lora_alpha": ALPHA}}
    (OUT / "checkpoint" / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n")
    save_file(ckpt, str(OUT / "lora_meta.safetensors"), metadata={"format": "pt", "lora_rank": str(RANK), "lora_alpha": str(ALPHA)})
    save_file(ckpt, str(OUT / "bare_peft.safetensors"), metadata={"format": "pt"})

    info = {
        "r": RANK,
        "lora_alpha": ALPHA,
        "rel_peft_vs_base": rel_err(pred, base),
        "versions": versions("torch", "peft"),
    }
    assert info["rel_peft_vs_base"] > 0.05, info
    save_file({"noise_pred_base": base.contiguous(), "noise_pred_peft": pred.contiguous()}, str(OUT / "golden.safetensors"),
              metadata={"info": json.dumps(info)})
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
