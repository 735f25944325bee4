"""Golden values for src/schedules (lr.ts, noise.ts), computed by diffusers itself.

Run:  PYTHONPATH=/path/to/diffusers/src python3 scripts/golden/make_schedule_goldens.py
Needs torch and diffusers (imported, never copied). Writes
  test/fixtures/schedules/lr_golden.json     get_scheduler(...).get_last_lr()[0] after k scheduler.step() calls
  test/fixtures/schedules/noise_golden.json  DDPMScheduler.from_pretrained(<dir>, subfolder="scheduler") tensors

Float32 arrays are stored as base64 of little-endian float32 bytes (bit-exact, NaN-safe).

torch's CPU linspace kernel is compiled per CPU capability; the AVX2/AVX512 builds contract
`start + step * i` into a fused multiply-add, the "default" build does not. The noise goldens are
therefore computed in child processes with ATEN_CPU_CAPABILITY=avx2 (the usual case) and, for
the linspace-based configs, also with ATEN_CPU_CAPABILITY=default.

torch's CPU float32 sqrt (x ** 0.5, .sqrt()) is not correctly rounded in the MKL-linked x86 wheels
(about 0.6% of inputs come out 1 ulp off); CUDA's sqrt is. A third child ("ieee") therefore runs
the same diffusers code with Tensor.sqrt / Tensor.__pow__(0.5) replaced by a correctly rounded sqrt
(computed in float64, rounded to the tensor's dtype): that is what the TS implementation must match
bit for bit; the plain CPU run is kept to bound the difference.
"""
import base64
import json
import os
import subprocess
import sys
import tempfile

# diffusers.training_utils pulls in transformers/peft, which import torchvision when it is installed; a
# torchvision built for another torch breaks that import chain. Nothing here needs it: hide it.
sys.modules.setdefault("torchvision", None)

import torch  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
OUT = os.path.join(ROOT, "test", "fixtures", "schedules")


def f32(t):
    return base64.b64encode(t.detach().to(torch.float32).contiguous().numpy().astype("<f4").tobytes()).decode()


# ----------------------------------------------------------------------------------------- lr
def lr_goldens():
    from diffusers.optimization import get_scheduler

    cases = []

    def add(name, kind, lr, warmup, total, steps, num_cycles=None, power=None, step_rules=None):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=lr)
        kw = {}
        if num_cycles is not None:
            kw["num_cycles"] = num_cycles
        if power is not None:
            kw["power"] = power
        if step_rules is not None:
            kw["step_rules"] = step_rules
        sched = get_scheduler(kind, optimizer=opt, num_warmup_steps=warmup, num_training_steps=total, **kw)
        lrs = [sched.get_last_lr()[0]]
        for _ in range(steps):
            opt.step()
            sched.step()
            lrs.append(sched.get_last_lr()[0])
        cases.append(
            {
                "name": name,
                "kind": kind,
                "lr": lr,
                "warmup": warmup,
                "total": total,
                "num_cycles": num_cycles,
                "power": power,
                "step_rules": step_rules,
                "lrs": lrs,
            }
        )

    kinds = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
    for kind in kinds:
        add(f"{kind}/w7_t50", kind, 1e-4, 7, 50, 70)
        add(f"{kind}/w0_t50", kind, 3e-4, 0, 50, 70)
        add(f"{kind}/w10_t5", kind, 1e-4, 10, 5, 30)  # total < warmup
        if kind != "polynomial":  # diffusers' polynomial divides by zero at step == total == warmup
            add(f"{kind}/w50_t50", kind, 1e-4, 50, 50, 70)
            add(f"{kind}/w0_t0", kind, 1e-4, 0, 0, 10)
        # two processes: get_scheduler receives warmup*2 and total*2, lr scaled by --scale_lr (4 * 2 * 2)
        add(f"{kind}/2proc_scaled", kind, 1e-4 * 4 * 2 * 2, 7 * 2, 50 * 2, 130)
    add("cosine/num_cycles_3_is_ignored", "cosine", 1e-4, 7, 50, 70, num_cycles=3)
    add("cosine_with_restarts/cycles3", "cosine_with_restarts", 1e-4, 7, 50, 70, num_cycles=3)
    add("cosine_with_restarts/cycles2_w0_t37", "cosine_with_restarts", 2e-4, 0, 37, 50, num_cycles=2)
    add("polynomial/power2", "polynomial", 1e-4, 7, 50, 70, power=2.0)
    add("polynomial/power0.5", "polynomial", 5e-5, 3, 41, 60, power=0.5)
    add("polynomial/lr_close_to_end", "polynomial", 2e-7, 5, 20, 30, power=1.5)
    add("piecewise_constant/a", "piecewise_constant", 1e-4, None, None, 50, step_rules="1:10,0.1:20,0.01:30,0.005")
    add("piecewise_constant/b", "piecewise_constant", 1e-3, None, None, 30, step_rules="0.5:3,2:15,0.25")
    return {"torch": torch.__version__, "cases": cases}


# -------------------------------------------------------------------------------------- noise
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
CONFIGS = {
    "sd15": SD15,
    "ddpm_linear": {
        "_class_name": "DDPMScheduler",
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
    },
    "scaled_linear_odd": {"beta_schedule": "scaled_linear", "beta_start": 0.0001, "beta_end": 0.03, "num_train_timesteps": 257},
    "linear_defaults": {},
    "cosine_v": {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 257, "prediction_type": "v_prediction"},
    "laplace": {"beta_schedule": "laplace", "num_train_timesteps": 101},
    "zero_snr_v": dict(SD15, rescale_betas_zero_snr=True, prediction_type="v_prediction", _class_name="DDIMScheduler"),
    "trained": {
        "num_train_timesteps": 9,
        "trained_betas": [0.001, 0.0123456789, 0.02, 0.05, 0.1, 0.2, 0.3, 0.45, 0.6],
        "beta_schedule": "linear",
    },
}
FULL = {"sd15", "ddpm_linear"}  # also half/bf16 add_noise coefficients and several gammas


def min_snr_weights(noise_scheduler, timesteps, snr_gamma):
    # train_text_to_image_lora.py, --snr_gamma branch
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if noise_scheduler.config.prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif noise_scheduler.config.prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    return mse_loss_weights


def use_correctly_rounded_sqrt():
    plain_sqrt = torch.Tensor.sqrt
    plain_pow = torch.Tensor.__pow__

    def sqrt(self):
        if self.is_floating_point() and self.dtype != torch.float64:
            return plain_sqrt(self.double()).to(self.dtype)
        return plain_sqrt(self)

    def pow_(self, exponent):
        if isinstance(exponent, float) and exponent == 0.5:
            return sqrt(self)
        return plain_pow(self, exponent)

    torch.Tensor.sqrt = sqrt
    torch.Tensor.__pow__ = pow_


def noise_child(names):
    """Runs in a child process (capability fixed by the environment); prints JSON."""
    if os.environ.get("GOLDEN_IEEE_SQRT") == "1":
        use_correctly_rounded_sqrt()
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    res = {"capability": torch.backends.cpu.get_cpu_capability(), "configs": {}}
    for name in names:
        cfg = CONFIGS[name]
        with tempfile.TemporaryDirectory() as d:
            os.makedirs(os.path.join(d, "scheduler"))
            with open(os.path.join(d, "scheduler", "scheduler_config.json"), "w") as fh:
                json.dump(cfg, fh)
            s = DDPMScheduler.from_pretrained(d, subfolder="scheduler")
        n = s.config.num_train_timesteps
        t = torch.arange(n, dtype=torch.long)
        r = {
            "config": cfg,
            "prediction_type": s.config.prediction_type,
            "betas": f32(s.betas),
            "alphas_cumprod": f32(s.alphas_cumprod),
        }
        dtypes = {"float32": torch.float32}
        if name in FULL:
            dtypes.update({"float16": torch.float16, "bfloat16": torch.bfloat16})
        for dn, dt in dtypes.items():
            one = torch.ones(n, 1, dtype=dt)
            zero = torch.zeros(n, 1, dtype=dt)
            # add_noise(x, eps, t) = sqrt_alpha_prod * x + sqrt_one_minus_alpha_prod * eps, in x's dtype
            r[f"sqrt_alpha_prod/{dn}"] = f32(s.add_noise(one, zero, t).flatten())
            r[f"sqrt_one_minus_alpha_prod/{dn}"] = f32(s.add_noise(zero, one, t).flatten())
        r["snr"] = f32(compute_snr(s, t))
        weights = {}
        own = s.config.prediction_type
        preds = ["epsilon", "v_prediction", "sample"] if name in FULL else [own]
        gammas = [5.0, 2.7] if name in FULL else [5.0]
        for pred in preds:
            s.register_to_config(prediction_type=pred)
            for g in gammas:
                weights[f"{pred}/{g!r}"] = f32(min_snr_weights(s, t, g))
        s.register_to_config(prediction_type=own)
        r["min_snr_weights"] = weights
        res["configs"][name] = r
    json.dump(res, sys.stdout)


def run_child(capability, names, ieee_sqrt=False):
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, GOLDEN_IEEE_SQRT="1" if ieee_sqrt else "0")
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--noise-child", ",".join(names)],
        env=env,
        check=True,
        stdout=subprocess.PIPE,
    ).stdout
    return json.loads(out)


def sparse_diff(a_b64, ref_b64):
    """{"idx": [...], "val": base64 float32} for the entries whose bits differ, or None if none do."""
    import numpy as np

    a = np.frombuffer(base64.b64decode(a_b64), dtype="<u4")
    r = np.frombuffer(base64.b64decode(ref_b64), dtype="<u4")
    idx = np.nonzero(a != r)[0]
    if len(idx) == 0:
        return None
    return {"idx": idx.tolist(), "val": base64.b64encode(a[idx].astype("<u4").tobytes()).decode()}


def only_different(run, ref):
    out = {}
    for k, v in run.items():
        if k in ("config", "prediction_type"):
            continue
        if isinstance(v, dict):
            d = {kk: sparse_diff(vv, ref[k][kk]) for kk, vv in v.items()}
            d = {kk: vv for kk, vv in d.items() if vv is not None}
            if d:
                out[k] = d
        else:
            d = sparse_diff(v, ref[k])
            if d is not None:
                out[k] = d
    return out


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--noise-child":
        noise_child(sys.argv[2].split(","))
        return
    import diffusers

    os.makedirs(OUT, exist_ok=True)
    lr = lr_goldens()
    lr["diffusers"] = diffusers.__version__
    with open(os.path.join(OUT, "lr_golden.json"), "w") as fh:
        json.dump(lr, fh, indent=1)

    main_run = run_child("avx2", list(CONFIGS), ieee_sqrt=True)
    cpu_run = run_child("avx2", list(CONFIGS))
    linspace_based = ["sd15", "ddpm_linear", "scaled_linear_odd", "linear_defaults", "zero_snr_v"]
    plain = run_child("default", linspace_based)
    noise = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "capability": main_run["capability"],
        "configs": main_run["configs"],
        # the same with torch's own CPU sqrt (MKL): expected within 1 ulp of "configs"
        # (stored sparsely: the indices whose bits differ and their float32 values).
        "cpu_sqrt": {"configs": {k: only_different(v, main_run["configs"][k]) for k, v in cpu_run["configs"].items()}},
        "default_capability": {
            "capability": plain["capability"],
            "configs": {k: {"betas": v["betas"], "alphas_cumprod": v["alphas_cumprod"]} for k, v in plain["configs"].items()},
        },
    }
    with open(os.path.join(OUT, "noise_golden.json"), "w") as fh:
        json.dump(noise, fh, indent=1)
    print("wrote", OUT, "capabilities:", main_run["capability"], plain["capability"])


if __name__ == "__main__":
    main()
