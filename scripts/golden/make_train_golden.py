#!/usr/bin/env python3
"""Golden reference for the LoRA TRAINING STEP of diffusers' train_text_to_image_lora.py.

How to run (from the repository root; CPU only, no network; about 5 minutes, 2 with --skip-checks):

    PYTHONPATH=/path/to/diffusers/src python3 scripts/golden/make_train_golden.py

Requirements: the versions listed in test/fixtures/golden/README.md (torch, transformers 5.x, peft, accelerate,
safetensors, and the diffusers *source tree* on PYTHONPATH). Nothing of diffusers is copied here; the script only
imports it. It needs test/fixtures/models/tiny (written by make_goldens.py).

What it does: it runs the inner loop of examples/text_to_image/train_text_to_image_lora.py (diffusers commit in
the README) on the `tiny` model, with the real Accelerator(gradient_accumulation_steps=2), `accelerator.accumulate`,
`accelerator.backward`, `accelerator.clip_grad_norm_`, the accelerate-wrapped AdamW and LR scheduler, and an
accelerate-prepared DataLoader. The stochastic parts of the script are fixed and stored as inputs:

  * `vae.encode(pixel_values).latent_dist.sample() * scaling_factor`  ->  `latents.<i>`  (random N(0,1))
  * `torch.randn_like(latents)`                                        ->  `noise.<i>`
  * `torch.randint(0, 1000, (bsz,))`                                   ->  `timesteps.<i>`
  * the tokenized captions                                             ->  `input_ids.<i>`
  * peft's gaussian LoRA init after `set_seed(1234)`                   ->  `lora_init.<peft key>`

Deviations from the script, all deliberate (the brief of this golden):

  * `lora_alpha = 8` with `rank = 4` (the script uses lora_alpha = rank); so the LoRA scale is 2, not 1.
  * The script passes `params_to_clip = lora_layers`, which is the `filter(...)` iterator that the optimizer
    constructor has already consumed, so `accelerator.clip_grad_norm_` receives NO parameters: it returns 0 and
    clips nothing (`effect_sizes_fp64.script_literal_*` in stats.json). Here the LoRA parameters are passed as a list, so
    clipping really happens, which is what `--max_grad_norm` is meant to do.
  * max_grad_norm: the tiny model's pre-clip LoRA gradient norm is only 0.01 to 0.08, so with max_grad_norm = 1.0
    clipping would never act. `default` and `snr` therefore use lr = 1e-3 with max_grad_norm 0.068 / 0.022,
    which clips some steps and not others. `bigstep` keeps max_grad_norm = 1.0 and uses lr = 1.0 to raise the
    last step's gradient norm to 4.8. That run is strongly non-linear, and its fp32 noise floor is ~4e-3
    (stats.json), so it is only a coarse check.
  * The float64 reference computes the loss in float64: the script's `model_pred.float()` is an upcast meant for
    fp16/bf16 training; applied to a float64 model it would be a downcast.

The result is computed twice with the same code: with every tensor in float64 (the stored reference) and in
float32 (to measure the noise floor). A third implementation by hand (plain loop, loss / 2, torch's
clip_grad_norm_, a hand-written AdamW and the cosine-with-warmup formula, no accelerate) must agree with the
accelerate run. That check shows which semantics a re-implementation has to reproduce.

Outputs (test/fixtures/golden/train/): inputs.safetensors, expected_<scenario>.safetensors,
expected_<scenario>.json, stats.json. See the "Training step" section of test/fixtures/golden/README.md.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F

from common import (FIXTURES, LIBRARIES, REPO, TINY_MODEL, canonicalize_header, deterministic, load_frozen_models,
                    rel_err, save_tensors, versions)
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params, compute_snr
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

OUT = FIXTURES / "golden" / "train"
TRAIN_LIBRARIES = LIBRARIES + ("accelerate",)  # the versions its stats record

# ---- training configuration (the script's argument names) -------------------------------------------------
RANK = 4
LORA_ALPHA = 8  # != rank on purpose: the LoRA scale is lora_alpha / rank = 2
TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]
SEED = 1234  # set_seed(SEED) immediately before unet.add_adapter
ADAM = dict(betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
LR_SCHEDULER = "cosine"
LR_WARMUP_STEPS = 2
MAX_TRAIN_STEPS = 3  # optimizer steps
GRADIENT_ACCUMULATION_STEPS = 2
TRAIN_BATCH_SIZE = 2
NUM_MICRO_STEPS = MAX_TRAIN_STEPS * GRADIENT_ACCUMULATION_STEPS  # 6 dataloader batches

# The tiny model's pre-clip LoRA gradient norm is only 0.013 to 0.073 with lr 1e-3, and no plausible input raises
# it much (noise x 20 gives 0.35). So `default` and `snr` keep lr = 1e-3 and set max_grad_norm below those norms,
# which makes clipping active on some steps and inactive on others. `bigstep` is max_grad_norm = 1.0 itself. It
# needs lr = 1.0 to get a gradient norm above 1 (4.8 on its last step). That is far from linear: A moves by about
# its own size, and the fp32 noise floor of the final weights rises to ~4e-3 (see stats.json).
SCENARIOS = {
    # prediction_type as passed to --prediction_type (None: the scheduler config's "epsilon"), snr_gamma,
    # learning_rate, max_grad_norm
    "default": dict(prediction_type=None, snr_gamma=None, learning_rate=1e-3, max_grad_norm=0.068),
    "snr": dict(prediction_type="v_prediction", snr_gamma=5.0, learning_rate=1e-3, max_grad_norm=0.022),
    "bigstep": dict(prediction_type=None, snr_gamma=None, learning_rate=1.0, max_grad_norm=1.0),
}
EXPECTED_CLIPPED = {"default": [False, True, True], "snr": [False, True, False], "bigstep": [False, False, True]}

# ---- fixed "random" inputs ---------------------------------------------------------------------------------
INPUT_SEED = 4321
# two samples per micro-step; both ends of [0, 1000) are included (t = 0 has SNR ~ 1175, t = 999 has SNR ~ 0.005)
TIMESTEPS = [[0, 999], [500, 250], [999, 1], [125, 875], [375, 625], [42, 777]]
# number of ordinary tokens per caption: includes an empty caption (bos, eos, pad...) and a full one (75 tokens,
# 77 positions, no padding)
CAPTION_LENGTHS = [(6, 19), (0, 75), (1, 40), (12, 3), (30, 8), (50, 2)]
BOS, EOS, VOCAB = 998, 999, 1000  # tiny tokenizer; SD pads with <|endoftext|> (= eos)


def make_inputs() -> dict:
    g = torch.Generator().manual_seed(INPUT_SEED)
    x = {}
    for i in range(NUM_MICRO_STEPS):
        x[f"latents.{i}"] = torch.randn(TRAIN_BATCH_SIZE, 4, 8, 8, generator=g)
        x[f"noise.{i}"] = torch.randn(TRAIN_BATCH_SIZE, 4, 8, 8, generator=g)
        x[f"timesteps.{i}"] = torch.tensor(TIMESTEPS[i], dtype=torch.int64)
        ids = torch.full((TRAIN_BATCH_SIZE, 77), EOS, dtype=torch.int64)
        for row, n in enumerate(CAPTION_LENGTHS[i]):
            ids[row, 0] = BOS
            ids[row, 1 : 1 + n] = torch.randint(2, BOS, (n,), generator=g)  # ids in [2, 997]
            ids[row, 1 + n] = EOS
        x[f"input_ids.{i}"] = ids
    return x


# ---- models ------------------------------------------------------------------------------------------------


def lora_params(unet) -> dict:
    """{peft key with the `unet.` prefix: parameter}, e.g. unet.down_blocks.0...attn1.to_q.lora_A.weight."""
    return {"unet." + n.replace(".default", ""): p for n, p in unet.named_parameters() if "lora_" in n}


def load_models(dtype, lora_init: dict | None):
    """As the script: load, freeze, cast to weight_dtype, then set_seed + add_adapter, then cast_training_params."""
    unet, text_encoder = load_frozen_models(dtype)
    set_seed(SEED)
    unet.add_adapter(
        LoraConfig(r=RANK, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian", target_modules=TARGET_MODULES)
    )
    # fp32 training keeps the LoRA params in fp32 (the script calls this only for fp16; a no-op here)
    cast_training_params(unet, dtype=dtype)
    if lora_init is not None:  # what the native trainer does: load the stored initial weights
        with torch.no_grad():
            params = lora_params(unet)
            assert set(params) == set(lora_init)
            for k, p in params.items():
                p.copy_(lora_init[k].to(dtype))
    return unet, text_encoder


class FixedBatches(torch.utils.data.Dataset):
    """The 6 fixed micro-batches, as 12 samples; DataLoader(batch_size=2, shuffle=False) gives them back."""

    def __init__(self, x: dict):
        self.x = x

    def __len__(self):
        return NUM_MICRO_STEPS * TRAIN_BATCH_SIZE

    def __getitem__(self, j):
        i, row = divmod(j, TRAIN_BATCH_SIZE)
        return {k: self.x[f"{k}.{i}"][row] for k in ("latents", "noise", "timesteps", "input_ids")}


def collate_fn(examples):
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def compute_loss(noise_scheduler, unet, text_encoder, batch, dtype, prediction_type, snr_gamma):
    """The body of `with accelerator.accumulate(unet):` up to the loss, line by line as in the script."""
    latents = batch["latents"].to(dtype)  # = vae.encode(...).latent_dist.sample() * scaling_factor
    noise = batch["noise"].to(dtype)  # = torch.randn_like(latents); noise_offset = 0
    timesteps = batch["timesteps"].long()  # = torch.randint(0, 1000, (bsz,))
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
    if prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    elif noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(noise_scheduler.config.prediction_type)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    # the script's `.float()` upcasts fp16/bf16 predictions; in the float64 reference keep float64
    up = (lambda t: t.float()) if dtype == torch.float32 else (lambda t: t)
    if snr_gamma is None:
        loss = F.mse_loss(up(model_pred), up(target), reduction="mean")
    else:
        snr = compute_snr(noise_scheduler, timesteps)  # float32 (alphas_cumprod is float32), in both runs
        mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
        if noise_scheduler.config.prediction_type == "epsilon":
            mse_loss_weights = mse_loss_weights / snr
        elif noise_scheduler.config.prediction_type == "v_prediction":
            mse_loss_weights = mse_loss_weights / (snr + 1)
        loss = F.mse_loss(up(model_pred), up(target), reduction="none")
        loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
        loss = loss.mean()
    return loss


def reset_accelerate():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_accelerate(x: dict, lora_init: dict, cfg: dict, dtype, clip_like_script: bool = False,
                     weight_decay: float = ADAM["weight_decay"]) -> dict:
    """The script's training loop with the real accelerate objects."""
    prediction_type, snr_gamma = cfg["prediction_type"], cfg["snr_gamma"]
    reset_accelerate()
    accelerator = Accelerator(
        gradient_accumulation_steps=GRADIENT_ACCUMULATION_STEPS, mixed_precision="no", cpu=True
    )
    noise_scheduler = DDPMScheduler.from_pretrained(TINY_MODEL, subfolder="scheduler")
    unet, text_encoder = load_models(dtype, lora_init)

    lora_layers = filter(lambda p: p.requires_grad, unet.parameters())  # as the script
    if not clip_like_script:
        lora_layers = list(lora_layers)  # reusable, so clip_grad_norm_ sees the parameters
    optimizer = torch.optim.AdamW(
        lora_layers, lr=cfg["learning_rate"], betas=ADAM["betas"], weight_decay=weight_decay, eps=ADAM["eps"]
    )
    train_dataloader = torch.utils.data.DataLoader(
        FixedBatches(x), shuffle=False, collate_fn=collate_fn, batch_size=TRAIN_BATCH_SIZE
    )
    lr_scheduler = get_scheduler(
        LR_SCHEDULER,
        optimizer=optimizer,
        num_warmup_steps=LR_WARMUP_STEPS * accelerator.num_processes,
        num_training_steps=MAX_TRAIN_STEPS * accelerator.num_processes,
    )
    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, train_dataloader, lr_scheduler
    )

    res = {"loss": [], "grad_norm": [], "lr": [], "sync": [], "sched_last_epoch": []}
    unet.train()
    for step, batch in enumerate(train_dataloader):
        with accelerator.accumulate(unet):
            loss = compute_loss(noise_scheduler, unet, text_encoder, batch, dtype, prediction_type, snr_gamma)
            res["loss"].append(float(loss.detach()))
            accelerator.backward(loss)
            res["sync"].append(bool(accelerator.sync_gradients))
            if accelerator.sync_gradients:
                params_to_clip = lora_layers
                res["lr"].append(float(optimizer.param_groups[0]["lr"]))  # the lr this optimizer.step() uses
                res["grad_norm"].append(float(accelerator.clip_grad_norm_(params_to_clip, cfg["max_grad_norm"])))
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            res["sched_last_epoch"].append(lr_scheduler.scheduler.last_epoch)
    res["lr_after"] = float(optimizer.param_groups[0]["lr"])
    res["lora"] = {k: v.detach().clone() for k, v in lora_params(accelerator.unwrap_model(unet)).items()}
    # the keys the script saves (get_peft_model_state_dict) are these keys
    sd = get_peft_model_state_dict(accelerator.unwrap_model(unet))
    assert {"unet." + k for k in sd} == set(res["lora"])
    reset_accelerate()
    return res


def cosine_with_warmup(step: int) -> float:
    """diffusers' get_cosine_schedule_with_warmup factor (num_cycles = 0.5) for LambdaLR's last_epoch = step."""
    if step < LR_WARMUP_STEPS:
        return step / max(1, LR_WARMUP_STEPS)
    progress = (step - LR_WARMUP_STEPS) / max(1, MAX_TRAIN_STEPS - LR_WARMUP_STEPS)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def train_by_hand(x: dict, lora_init: dict, cfg: dict, dtype) -> dict:
    """The same training without accelerate or torch.optim: what a re-implementation has to do.

    Per micro-step i: loss_i (undivided); backward(loss_i / 2), so gradients accumulate (.grad +=).
    After every 2nd micro-step (k = i // 2): the total L2 norm over all LoRA grads, then
    grads *= min(1, max_grad_norm / (norm + 1e-6)); one AdamW step with lr_k = learning_rate * cosine_with_warmup(k);
    then the grads are zeroed.
    """
    prediction_type, snr_gamma = cfg["prediction_type"], cfg["snr_gamma"]
    noise_scheduler = DDPMScheduler.from_pretrained(TINY_MODEL, subfolder="scheduler")
    unet, text_encoder = load_models(dtype, lora_init)
    unet.train()
    params = list(lora_params(unet).values())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    beta1, beta2 = ADAM["betas"]
    res = {"loss": [], "grad_norm": [], "lr": []}
    for i in range(NUM_MICRO_STEPS):
        batch = {k: x[f"{k}.{i}"] for k in ("latents", "noise", "timesteps", "input_ids")}
        loss = compute_loss(noise_scheduler, unet, text_encoder, batch, dtype, prediction_type, snr_gamma)
        res["loss"].append(float(loss.detach()))
        (loss / GRADIENT_ACCUMULATION_STEPS).backward()
        if (i + 1) % GRADIENT_ACCUMULATION_STEPS:
            continue
        k = i // GRADIENT_ACCUMULATION_STEPS
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
            coef = torch.clamp(cfg["max_grad_norm"] / (norm + 1e-6), max=1.0)
            lr = cfg["learning_rate"] * cosine_with_warmup(k)
            t = k + 1  # Adam's step count
            for p, mi, vi in zip(params, m, v):
                g = p.grad * coef
                p.mul_(1 - lr * ADAM["weight_decay"])  # decoupled weight decay, before the moment update
                mi.mul_(beta1).add_(g, alpha=1 - beta1)
                vi.mul_(beta2).add_(g * g, alpha=1 - beta2)
                denom = vi.sqrt() / math.sqrt(1 - beta2**t) + ADAM["eps"]
                p.add_(-(lr / (1 - beta1**t)) * mi / denom)
                p.grad = None
        res["grad_norm"].append(float(norm))
        res["lr"].append(lr)
    res["lora"] = {k: v.detach().clone() for k, v in lora_params(unet).items()}
    return res


# ---- helpers -----------------------------------------------------------------------------------------------


def max_rel_lora(a: dict, b: dict, init: dict | None = None) -> float:
    """max over tensors of ||a - b|| / ||b||, or / ||b - init|| (relative to the training update) if init given."""
    out = 0.0
    for k in b:
        ref = b[k].double() - (init[k].double() if init is not None else 0.0)
        out = max(out, float(torch.linalg.vector_norm(a[k].double() - b[k].double())) / float(torch.linalg.vector_norm(ref)))
    return out


def max_rel_scalars(a: list, b: list) -> float:
    return max(abs(p - q) / max(abs(q), 1e-30) for p, q in zip(a, b))


# ---- main --------------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-checks", action="store_true", help="skip the by-hand and script-literal runs")
    args = ap.parse_args()

    deterministic(max_threads=8)
    OUT.mkdir(parents=True, exist_ok=True)
    vers = versions(*TRAIN_LIBRARIES)
    meta = {"generator": "scripts/golden/make_train_golden.py", **vers}

    # ---- inputs + initial LoRA (peft's gaussian init: A ~ N(0, 1/r), B = 0) ---------------------------------
    x = make_inputs()
    unet, _ = load_models(torch.float32, None)
    lora_init = {k: p.detach().clone() for k, p in lora_params(unet).items()}
    del unet
    assert all(float(v.abs().max()) == 0.0 for k, v in lora_init.items() if ".lora_B." in k)
    a_std = float(torch.cat([v.flatten() for k, v in lora_init.items() if ".lora_A." in k]).std())
    # peft in float64: is its gaussian init the same numbers? (informational; the fp64 run loads lora_init anyway)
    unet64, _ = load_models(torch.float64, None)
    init64_same = all(torch.equal(p.float(), lora_init[k]) for k, p in lora_params(unet64).items())
    del unet64
    inputs = dict(x)
    inputs.update({"lora_init." + k: v for k, v in lora_init.items()})
    save_tensors(OUT / "inputs.safetensors", inputs, meta)

    stats = {
        "versions": vers,
        "config": {
            "rank": RANK,
            "lora_alpha": LORA_ALPHA,
            "init_lora_weights": "gaussian",
            "target_modules": TARGET_MODULES,
            "seed_before_add_adapter": SEED,
            "adam_beta1": ADAM["betas"][0],
            "adam_beta2": ADAM["betas"][1],
            "adam_weight_decay": ADAM["weight_decay"],
            "adam_epsilon": ADAM["eps"],
            "lr_scheduler": LR_SCHEDULER,
            "lr_warmup_steps": LR_WARMUP_STEPS,
            "max_train_steps": MAX_TRAIN_STEPS,
            "gradient_accumulation_steps": GRADIENT_ACCUMULATION_STEPS,
            "train_batch_size": TRAIN_BATCH_SIZE,
            "mixed_precision": "no",
            "noise_offset": 0,
            "scenarios": SCENARIOS,
        },
        "lora_init": {"num_tensors": len(lora_init), "num_params": sum(v.numel() for v in lora_init.values()),
                      "A_std": a_std, "peft_fp64_init_equals_fp32_init": init64_same},
        "scenarios": {},
    }

    def split(d: dict, which: str) -> dict:
        return {k: v for k, v in d.items() if f".lora_{which}." in k}

    def lora_diff(a: dict, b: dict) -> dict:
        """max over tensors of ||a - b|| / ||b|| for A and B, and for A relative to its update ||b - init||."""
        return {
            "A": max_rel_lora(split(a, "A"), split(b, "A")),
            "B": max_rel_lora(split(a, "B"), split(b, "B")),
            "A_update": max_rel_lora(split(a, "A"), split(b, "A"), lora_init),
        }

    for scenario, cfg in SCENARIOS.items():
        print(f"\n== scenario {scenario}: {cfg} ==")
        ref = train_accelerate(x, lora_init, cfg, torch.float64)
        f32 = train_accelerate(x, lora_init, cfg, torch.float32)
        assert ref["sync"] == [False, True] * MAX_TRAIN_STEPS, ref["sync"]
        assert len(ref["grad_norm"]) == MAX_TRAIN_STEPS
        clipped = [n > cfg["max_grad_norm"] for n in ref["grad_norm"]]
        assert clipped == EXPECTED_CLIPPED[scenario], (scenario, ref["grad_norm"])
        assert clipped == [n > cfg["max_grad_norm"] for n in f32["grad_norm"]]

        expected = {f"loss.{i}": torch.tensor(v, dtype=torch.float32) for i, v in enumerate(ref["loss"])}
        expected.update({f"grad_norm.{k}": torch.tensor(v, dtype=torch.float32) for k, v in enumerate(ref["grad_norm"])})
        expected.update({f"lr.{k}": torch.tensor(v, dtype=torch.float32) for k, v in enumerate(ref["lr"])})
        expected.update({"lora." + k: v.to(torch.float32) for k, v in ref["lora"].items()})
        save_tensors(
            OUT / f"expected_{scenario}.safetensors",
            expected,
            {**meta, "reference_dtype": "float64", "scenario": scenario,
             **{k: json.dumps(v) for k, v in cfg.items()}},
        )
        scalars = {f"loss.{i}": v for i, v in enumerate(ref["loss"])}
        scalars.update({f"grad_norm.{k}": v for k, v in enumerate(ref["grad_norm"])})
        scalars.update({f"lr.{k}": v for k, v in enumerate(ref["lr"])})
        scalars.update({f"clipped.{k}": c for k, c in enumerate(clipped)})
        scalars.update({f"clip_coef.{k}": min(1.0, cfg["max_grad_norm"] / (n + 1e-6)) for k, n in enumerate(ref["grad_norm"])})
        with open(OUT / f"expected_{scenario}.json", "w") as fh:
            json.dump({"scenario": scenario, **{k: v for k, v in cfg.items()},
                       "prediction_type": cfg["prediction_type"] or "epsilon", **scalars}, fh, indent=2)
            fh.write("\n")

        # noise floor: the same computation in float32, and the stored (fp32-rounded) reference
        stored = {k[len("lora."):]: v for k, v in expected.items() if k.startswith("lora.")}
        s = {
            "config": cfg,
            "loss": ref["loss"],
            "grad_norm": ref["grad_norm"],
            "lr": ref["lr"],
            "clipped": clipped,
            "lr_after_training": ref["lr_after"],
            "scheduler_last_epoch_after_each_micro_step": ref["sched_last_epoch"],
            "fp32_vs_fp64": {
                "loss_max_rel": max_rel_scalars(f32["loss"], ref["loss"]),
                "grad_norm_max_rel": max_rel_scalars(f32["grad_norm"], ref["grad_norm"]),
                "lr_equal": f32["lr"] == ref["lr"],
                "lora_max_rel": lora_diff(f32["lora"], ref["lora"]),
            },
            "stored_fp32_vs_fp64_lora_max_rel": lora_diff(stored, ref["lora"]),
            # how far training moved the weights: ||final - init|| / ||final|| (B starts at 0, so 1 for B)
            "update_size_rel_A": [
                min(rel_err(lora_init[k], ref["lora"][k]) for k in split(lora_init, "A")),
                max(rel_err(lora_init[k], ref["lora"][k]) for k in split(lora_init, "A")),
            ],
        }
        if not args.skip_checks:
            hand = train_by_hand(x, lora_init, cfg, torch.float64)
            s["by_hand_vs_accelerate_fp64"] = {
                "loss_max_rel": max_rel_scalars(hand["loss"], ref["loss"]),
                "grad_norm_max_rel": max_rel_scalars(hand["grad_norm"], ref["grad_norm"]),
                "lr_max_abs": max(abs(a - b) for a, b in zip(hand["lr"], ref["lr"])),
                "lora_max_rel": lora_diff(hand["lora"], ref["lora"]),
            }
            assert max(s["by_hand_vs_accelerate_fp64"]["lora_max_rel"].values()) < 1e-9, s["by_hand_vs_accelerate_fp64"]
            assert s["by_hand_vs_accelerate_fp64"]["loss_max_rel"] < 1e-12
            assert s["by_hand_vs_accelerate_fp64"]["lr_max_abs"] == 0.0
            # The script as written: params_to_clip is the exhausted filter, so clip_grad_norm_ sees no parameters.
            lit = train_accelerate(x, lora_init, cfg, torch.float64, clip_like_script=True)
            s["effect_sizes_fp64"] = {  # how much a deviation changes the final weights (compare with the floor)
                "script_literal_no_clipping": lora_diff(lit["lora"], ref["lora"]),
                "script_literal_clip_grad_norm_returns": lit["grad_norm"],
                "no_weight_decay": lora_diff(
                    train_accelerate(x, lora_init, cfg, torch.float64, weight_decay=0.0)["lora"], ref["lora"]
                ),
            }
        stats["scenarios"][scenario] = s
        print(json.dumps(s, indent=1))

    for f in sorted(OUT.glob("*.safetensors")):
        canonicalize_header(f)
    # reload what was written and check it is what was computed
    back = load_file(str(OUT / "inputs.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in inputs.items())
    with open(OUT / "stats.json", "w") as fh:
        json.dump(stats, fh, indent=2, sort_keys=True)
        fh.write("\n")
    print(f"\nwrote {OUT.relative_to(REPO)}: " + ", ".join(sorted(p.name for p in OUT.iterdir())))


if __name__ == "__main__":
    main()
