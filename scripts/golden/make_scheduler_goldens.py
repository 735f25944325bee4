"""Golden sampling trajectories of diffusers' schedulers, for src/inference/schedulers.ts.

Run:  PYTHONPATH=/path/to/diffusers/src python3 scripts/golden/make_scheduler_goldens.py
Writes test/fixtures/sampling/scheduler_golden.json (diffusers is imported, never copied).

Each case builds a scheduler class from SD 1.5's scheduler_config.json (assets/sd15-model/scheduler/), with some
keys overridden (prediction_type, timestep_spacing), exactly as `Class.from_config(config, **overrides)` does, and
runs 10 steps of the StableDiffusionPipeline loop with a fake model instead of the UNet:
    eps = base + 0.05 * scheduler.scale_model_input(x, t)
from fixed initial latents (seeded randn, 2x4x8x8, times init_noise_sigma). Euler ancestral draws its noise from a
CPU torch.Generator().manual_seed(SEED). Stored: timesteps, init_noise_sigma and the latents after every step.
Float32 arrays are base64 of little-endian float32 bytes.
"""
import base64
import json
import sys

sys.modules.setdefault("torchvision", None)

import torch  # noqa: E402
from common import FIXTURES, REPO, SCHEDULERS, versions  # noqa: E402

CONFIG = REPO / "assets" / "sd15-model" / "scheduler" / "scheduler_config.json"
OUT = FIXTURES / "sampling" / "scheduler_golden.json"
SHAPE = (2, 4, 8, 8)
STEPS = 10
SEED = 123
INPUT_SCALE = 0.05


def f32(t):
    return base64.b64encode(t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()).decode()


def run(name, overrides, init, base):
    with open(CONFIG) as f:
        config = json.load(f)
    sched = SCHEDULERS[name].from_config(config, **overrides)
    sched.set_timesteps(STEPS)
    gen = torch.Generator().manual_seed(SEED)
    x = init * sched.init_noise_sigma
    steps = []
    for t in sched.timesteps:
        model_input = sched.scale_model_input(x, t)
        eps = base + INPUT_SCALE * model_input
        kwargs = {}
        if name in ("euler_a", "euler"):
            kwargs["generator"] = gen
        if name == "ddim":
            kwargs["eta"] = 0.0
        x = sched.step(eps, t, x, **kwargs).prev_sample
        steps.append(x.clone())
    return {
        "scheduler": name,
        "overrides": overrides,
        "numInferenceSteps": STEPS,
        "timesteps": [float(t) for t in sched.timesteps],
        "initNoiseSigma": float(sched.init_noise_sigma),
        "latents": f32(torch.stack(steps)),
    }


def main():
    g = torch.Generator().manual_seed(0)
    init = torch.randn(SHAPE, generator=g)
    base = torch.randn(SHAPE, generator=g)
    cases = []
    for name in SCHEDULERS:
        cases.append(run(name, {}, init, base))
        cases.append(run(name, {"prediction_type": "v_prediction"}, init, base))
    for name, spacing in [("pndm", "linspace"), ("ddim", "trailing"), ("ddim", "linspace"), ("euler", "linspace"),
                          ("euler_a", "trailing"), ("dpmpp_2m", "trailing"), ("dpmpp_2m", "linspace"), ("pndm", "trailing")]:
        cases.append(run(name, {"timestep_spacing": spacing, "steps_offset": 0}, init, base))
    cases.append(run("ddim", {"set_alpha_to_one": True, "clip_sample": True}, init, base))
    out = {
        "shape": list(SHAPE),
        "inputScale": INPUT_SCALE,
        "seed": SEED,
        "init": f32(init),
        "base": f32(base),
        "cases": cases,
        "versions": versions("torch", "diffusers"),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: {len(cases)} cases")


if __name__ == "__main__":
    main()
