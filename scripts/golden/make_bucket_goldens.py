"""Bucket assignment goldens from kohya's sd-scripts itself (test/fixtures/buckets/kohya_buckets.json).

Runs sd-scripts' own make_bucket_resolutions (library/model_util.py) and BucketManager.select_bucket
(library/train_util.py), read from a local sd-scripts git mirror and executed as they are (only those two
definitions, so that the rest of sd-scripts' imports are not needed), over a table of image sizes and settings.

  /tmp/pyref/bin/python scripts/golden/make_bucket_goldens.py [SD_SCRIPTS_GIT_DIR]
"""
import ast
import json
import math
import os
import subprocess
import sys
from typing import Tuple

import numpy as np

GIT = sys.argv[1] if len(sys.argv) > 1 else "/work/.mirror/kohya-ss+sd-scripts/repo"


def source(path: str) -> str:
    return subprocess.check_output(["git", f"--git-dir={GIT}", "show", f"HEAD:{path}"], text=True)


def definition(src: str, name: str) -> str:
    for node in ast.parse(src).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return ast.get_source_segment(src, node)
    raise KeyError(name)


ns = {"math": math, "np": np, "Tuple": Tuple, "random": None, "logger": None}
exec(definition(source("library/model_util.py"), "make_bucket_resolutions"), ns)
ns["model_util"] = type("M", (), {"make_bucket_resolutions": staticmethod(ns["make_bucket_resolutions"])})
exec(definition(source("library/train_util.py"), "BucketManager"), ns)
BucketManager = ns["BucketManager"]

SETTINGS = [
    dict(resolution=512, min=256, max=1024, step=64, no_upscale=False),
    dict(resolution=512, min=256, max=1024, step=64, no_upscale=True),
    dict(resolution=768, min=320, max=1536, step=64, no_upscale=False),
    dict(resolution=32, min=16, max=64, step=4, no_upscale=False),
    dict(resolution=32, min=8, max=64, step=8, no_upscale=True),
]
SIZES = [
    (512, 512), (1024, 1024), (640, 480), (480, 640), (1920, 1080), (1080, 1920), (3000, 1000), (1000, 3000),
    (300, 200), (200, 300), (777, 555), (555, 777), (4032, 3024), (100, 100), (64, 256), (48, 40), (40, 48),
    (33, 21), (21, 33), (60, 30), (130, 70), (512, 384), (384, 512), (1234, 987), (2048, 512), (17, 90),
]

out = []
for s in SETTINGS:
    bm = BucketManager(s["no_upscale"], (s["resolution"], s["resolution"]), s["min"], s["max"], s["step"])
    if not s["no_upscale"]:
        bm.make_buckets()
    resos = [list(r) for r in bm.predefined_resos] if not s["no_upscale"] else []
    cases = []
    for w, h in SIZES:
        try:
            reso, resized, err = bm.select_bucket(w, h)
        except ZeroDivisionError:  # a bucket side of 0 (--bucket-no-upscale, image under one step): kohya fails
            cases.append({"size": [w, h], "error": True})
            continue
        cases.append({"size": [w, h], "bucket": [int(reso[0]), int(reso[1])], "resized": [int(resized[0]), int(resized[1])], "ar_error": float(err)})
    out.append({"settings": s, "resolutions": resos, "cases": cases})

dst = os.path.join(os.path.dirname(__file__), "..", "..", "test", "fixtures", "buckets", "kohya_buckets.json")
with open(dst, "w") as f:
    json.dump(out, f, indent=None, separators=(",", ":"))
    f.write("\n")
print(f"wrote {dst}: {sum(len(o['cases']) for o in out)} cases")
