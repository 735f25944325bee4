#!/usr/bin/env python3
"""Runs a diffusers training script (the end-to-end bench runs examples/text_to_image/train_text_to_image_lora.py)
as `python SCRIPT ARGS...` would, when torchvision cannot be imported.

    run_diffusers_script.py SCRIPT [ARGS...]

If `import torchvision` works it is used. Otherwise pil_transforms.py (beside this file) stands in for
torchvision.transforms: transformers, peft and diffusers are imported first, so that they record torchvision as
missing (a torchvision package on PYTHONPATH would make transformers import torchvision.io, which no stand-in has),
(accelerate and datasets too),
then the stand-in is registered as the modules `torchvision` and `torchvision.transforms`, and the script runs as
__main__. DIFFUSERS_SRC (a diffusers repo or its src folder) goes first on sys.path when set.
"""
import importlib.machinery
import os
import runpy
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: run_diffusers_script.py SCRIPT [ARGS...]")
    script = sys.argv[1]
    src = os.environ.get("DIFFUSERS_SRC")
    if src:
        sys.path.insert(0, str(Path(src) / "src") if (Path(src) / "src" / "diffusers").is_dir() else src)
    try:
        import torchvision  # noqa: F401
        import torchvision.transforms  # noqa: F401
    except Exception:
        sys.modules.pop("torchvision", None)
        import accelerate  # noqa: F401
        import datasets  # noqa: F401
        import diffusers  # noqa: F401
        import peft  # noqa: F401
        import transformers
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()  # lru-cached: False from here on
        sys.path.insert(0, str(HERE))
        import pil_transforms

        tv = types.ModuleType("torchvision")
        tv.__version__ = "0.0.0+pil-stand-in"
        tv.__spec__ = importlib.machinery.ModuleSpec("torchvision", None)
        pil_transforms.__spec__ = importlib.machinery.ModuleSpec("torchvision.transforms", None)
        tv.transforms = pil_transforms
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.transforms"] = pil_transforms
        _ = transformers
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
