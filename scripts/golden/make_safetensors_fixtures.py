"""Writes small safetensors files with Python's `safetensors` package, for the reader tests.

Run: python3 scripts/golden/make_safetensors_fixtures.py   (needs torch + safetensors)
Writes test/fixtures/safetensors/python_all_dtypes.safetensors and python_expected.json (the values as JSON).
"""
import json
import os

import torch
from safetensors.torch import save_file

out = os.path.join(os.path.dirname(__file__), "..", "..", "test", "fixtures", "safetensors")
os.makedirs(out, exist_ok=True)
g = torch.Generator().manual_seed(0)
base = torch.randn(2, 3, generator=g, dtype=torch.float64) * 10
tensors = {
    "f64": base.clone(),
    "f32": base.float(),
    "f16": base.half(),
    "bf16": base.bfloat16(),
    "i64": torch.tensor([[-(2**40), 1, 2], [3, 4, 2**40]], dtype=torch.int64),
    "i32": torch.tensor([-(2**30), 0, 2**30], dtype=torch.int32),
    "i16": torch.tensor([-300, 0, 300], dtype=torch.int16),
    "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
    "u8": torch.tensor([0, 128, 255], dtype=torch.uint8),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(3.5),
    "empty": torch.zeros(0, 4),
    "nested.name.with.dots": torch.arange(5, dtype=torch.float32),
}
save_file(tensors, os.path.join(out, "python_all_dtypes.safetensors"), metadata={"format": "pt", "note": "made by Python safetensors"})
expected = {k: {"shape": list(v.shape), "values": v.flatten().double().tolist() if v.dtype != torch.bool else v.flatten().int().tolist()} for k, v in tensors.items()}
with open(os.path.join(out, "python_expected.json"), "w") as f:
    json.dump(expected, f, indent=1, sort_keys=True)
print("wrote", out)
