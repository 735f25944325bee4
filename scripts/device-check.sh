#!/usr/bin/env bash
# One command for a GPU machine: build train-lora against the machine's torch, then check it in one run.
#
#   scripts/device-check.sh [--python-deps DIR] [--rebuild] [--device cuda|cuda:N|cpu] [--quick] [--out FILE]
#                           [--work DIR] [--only parity,bench,crash,dp] [--no-python] [--peak-tflops N]
#                           [--time-scale F]
#   scripts/device-check.sh --pack-python-deps DIR [--python-version 3.X]
#   npm run device-check -- [same options]
#
# Needs: Linux, an NVIDIA GPU, node 20+, cmake 3.18+, a C++20 compiler, and a python3 (or $PYTHON) whose torch
# (2.11 or newer) has CUDA. The python references also need transformers, peft, safetensors, accelerate and
# diffusers: installed, or carried in with --python-deps DIR (the machine needs no internet), or on PYTHONPATH /
# DIFFUSERS_SRC (a diffusers `src` folder). No CUDA toolkit is needed.
#
# What it does:
#   - node_modules: `npm ci` when missing (that needs the npm registry; otherwise carry node_modules along);
#   - the addon: built against python3's torch (LIBTORCH=<torch package dir> node scripts/build-native.js --force)
#     unless build/libtorch.json says it already was (--rebuild forces it); about 1-2 minutes on 16 cores;
#   - dist/: `npm run build:ts` when missing or older than src/;
#   - then node dist/bench/device-check.js with the other options (src/bench/device-check.ts).
# --python-deps DIR: every *.whl in DIR (but torch, triton, nvidia-*) is installed once with pip --no-deps into
#   .device-check-pydeps/lib in this repository (git-ignored; redone when DIR changes) and put on PYTHONPATH;
#   DIR/diffusers-src.tar.gz is unpacked beside it; that, or DIR/diffusers-src, DIR/src, DIR/diffusers/src (a
#   folder holding diffusers/), becomes DIFFUSERS_SRC; DIR itself goes on PYTHONPATH too (so a
#   `pip install --target DIR ...` folder works as it is).
# --pack-python-deps DIR (on a machine with pip's index): writes such a folder (~40 MB): the wheels of
#   transformers, peft, accelerate, safetensors, Pillow, requests, httpx, importlib_metadata, psutil, pyyaml and
#   their dependencies but torch and numpy, for $PYTHON's version (or --python-version 3.X, manylinux x86_64),
#   and diffusers-src.tar.gz: the diffusers package $PYTHON imports (or DIFFUSERS_SRC's).
#
# Time: on one H100/H200 the check itself should take about 5 minutes: making the SD 1.5-shaped random model
# (~4 GB in the system temp folder, kept for later runs; about a minute the first time), then the parts, each
# time-boxed: parity 150 s, benchmark 210 s, kill -9/resume 60 s, data parallel 60 s (--time-scale F multiplies
# them); a part that reaches its box reports what it has. Plus the build (1-2 minutes on 16 cores). On the CPU,
# `--device cpu --quick` runs every part with the tiny models (3-5 minutes on 2 cores).
#
# Output: progress on stderr; on stdout a markdown report: the device, libtorch and python versions, one section
# per part, then a summary table.
#
#   ## 1. Parity with diffusers / transformers / peft: pass (N s)
#   | model | output | ours fp32 | diffusers fp32 | fp32 < 0.0001 | ours bf16 | diffusers bf16 |
#     Rows: the tiny and alt fixture models (their golden inputs and LoRA files) and the SD 1.5-shaped random model
#     (sd15-random; 256 px latents, a 128 px image, a seeded rank-4 LoRA): text_embeddings, noise_pred, vae_mean,
#     vae_std, vae_decoded; noise_pred and loss with the UNet LoRA; the worst of the LoRA gradients (96, 112, 256
#     tensors). Each number is ||x - ref|| / ||ref|| with ref = diffusers/transformers/peft in fp64 on the same
#     GPU, same weights and inputs. "ours fp32" (TF32 off) must be < 1e-4, else FAIL and exit 1: expect 1e-7..1e-6
#     for the outputs and up to ~2e-5 for sd15-random's gradients (the CPU gives 2.2e-5 there). "diffusers fp32" is
#     the libraries' own fp32 error, the floor ours is compared with: the two columns should be close. bf16 (weights
#     and inputs cast, no threshold): ~3e-3..3e-2 for outputs, up to ~0.1-0.3 for gradients, on both sides.
#   ## 2. LoRA training benchmark: pass
#   | model | device | res | batch | dtype | ckpt | latents | ours step/s | ours samples/s | ours MFU | ours peak MB
#     | py step/s | py samples/s | py MFU | py peak MB | ours/py |
#     4 rows: the SD 1.5-shaped model at 512 px, batch 1 and 8, bf16, gradient checkpointing no / yes, cached
#     latents; "ours" is train-lora's step, "py" diffusers + peft eager (scripts/bench/diffusers_step.py), each in
#     its own process: 2 warm-up steps, then at least 5 steps and 3 s. samples/s = steps/s x batch. MFU = FLOPs of
#     one step x steps/s / the GPU's dense bf16 peak (989 TFLOP/s for H100/H200 SXM; a table by GPU name, or
#     --peak-tflops). FLOPs are counted with torch.utils.flop_counter in the python step on the same shapes: text
#     encoder forward + UNet forward + LoRA backward (the frozen weights get no weight gradients; checkpointing's
#     recompute is not counted): 1.73 TFLOP per 512 px sample (the UNet forward alone is 0.80 TFLOP). A UNet
#     step is memory-bound (GroupNorm, small convolutions): expect MFU in the single digits to low tens of percent.
#     peak MB: GPU memory in use while the process ran (nvidia-smi, CUDA context and allocator cache included; ~500
#     MB of it is the context). ours/py: train-lora's steps/s over diffusers', > 1 means train-lora is faster.
#   ## 3. kill -9 and resume: pass | warn
#     12 optimizer steps of the tiny fixture model at 64 px on the GPU (mixed precision: the device's default):
#     two uninterrupted runs (their difference is the run-to-run noise of the GPU kernels), and one killed with
#     SIGKILL just after step 6 is logged (possibly during that step's checkpoint write), then resumed with
#     --resume-from-checkpoint latest. Prints how many checkpoints the kill left and whether all are valid, and
#     for each run "bit-identical" to the first uninterrupted run or the worst per-tensor relative difference of
#     the final LoRA. pass: the resumed run is bit-identical; warn: it differs (compare with the run-to-run line;
#     train-lora has no deterministic-algorithms switch, so GPU atomics may make both lines differ).
#   ## 4. 2-process data parallel: pass | warn | skipped: 1 GPU
#     --num-processes 2 --dist-backend nccl (fp32) against 1 process with twice the per-device batch, 10 optimizer
#     steps: max relative differences of loss and grad norm per step and of the final LoRA (expect ~1e-7..1e-5;
#     warn above 1e-3). Skipped on one GPU, or when the addon was built without nccl.h.
#   ## Summary
#   | part | status | time | result |   then "OK in N s" or "FAILED: parity, ..." (and the setup time)
#
# The same results go to device-check-results.json (--out; every number above, per row and tensor group, the
# versions, the GPU and its peak). Exit status: 0 when no part failed or errored (warn and skipped are not
# failures), 1 when one did (an fp32 parity error >= 1e-4, a forward or training run that fails), 2 on a usage
# error or a missing prerequisite.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
# CUDA numbers devices as nvidia-smi does (the benchmark samples nvidia-smi -i <CUDA index>)
export PYTHON OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE} CUDA_DEVICE_ORDER=${CUDA_DEVICE_ORDER:-PCI_BUS_ID}
say() { echo "[device-check] $*" >&2; }
die() {
  say "$*"
  exit 2
}

PYDEPS='' PACK='' PYVER='' REBUILD=0 DEVICE=auto PASS=()
while (($#)); do
  case $1 in
  --python-deps) PYDEPS=${2:?--python-deps needs a folder}; shift 2 ;;
  --pack-python-deps) PACK=${2:?--pack-python-deps needs a folder}; shift 2 ;;
  --python-version) PYVER=${2:?--python-version needs e.g. 3.11}; shift 2 ;;
  --rebuild) REBUILD=1; shift ;;
  --device) DEVICE=${2:?--device needs a value}; PASS+=("$1" "$2"); shift 2 ;;
  -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) PASS+=("$1"); shift ;;
  esac
done

# ------------------------------------------------------------------ --pack-python-deps: make the folder, then stop
if [[ -n $PACK ]]; then
  mkdir -p "$PACK"
  cross=()
  [[ -n $PYVER ]] && cross=(--only-binary=:all: --python-version "$PYVER" --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  "$PYTHON" -m pip download --disable-pip-version-check -d "$PACK" "${cross[@]}" \
    transformers safetensors Pillow requests httpx importlib_metadata psutil pyyaml
  # peft and accelerate depend on torch, which the GPU machine has: their wheels only; numpy comes with torch's
  # environment there (17 MB less to carry)
  "$PYTHON" -m pip download --disable-pip-version-check -d "$PACK" "${cross[@]}" --no-deps peft accelerate
  rm -f "$PACK"/numpy-*.whl
  src=${DIFFUSERS_SRC:-}
  [[ -z $src ]] && src=$("$PYTHON" -c 'import diffusers, os; print(os.path.dirname(os.path.dirname(diffusers.__file__)))' 2>/dev/null || true)
  if [[ -n $src && -d $src/diffusers ]]; then
    tar -czf "$PACK/diffusers-src.tar.gz" -C "$src" --exclude __pycache__ diffusers
  else
    say "no diffusers found (set DIFFUSERS_SRC to a diffusers src folder): put one in $PACK/diffusers-src/diffusers yourself"
  fi
  say "wrote $PACK ($(du -sh "$PACK" | cut -f1)); on the GPU machine: scripts/device-check.sh --python-deps $PACK"
  exit 0
fi

# ------------------------------------------------------------------ python reference libraries
if [[ -n $PYDEPS ]]; then
  [[ -d $PYDEPS ]] || die "--python-deps $PYDEPS: no such folder"
  PYDEPS=$(cd "$PYDEPS" && pwd)
  shopt -s nullglob
  wheels=()
  for w in "$PYDEPS"/*.whl; do
    case $(basename "$w") in torch-* | triton-* | nvidia_* | nvidia-*) ;; *) wheels+=("$w") ;; esac
  done
  tarball=("$PYDEPS"/diffusers-src.tar.gz)
  site="$ROOT/.device-check-pydeps"
  if ((${#wheels[@]} + ${#tarball[@]})); then
    stamp=$(ls -l "${wheels[@]}" "${tarball[@]}" | cksum | cut -d' ' -f1)
    if [[ ! -f $site/.stamp || $(cat "$site/.stamp") != "$stamp" ]]; then
      rm -rf "$site" && mkdir -p "$site/lib"
      if ((${#wheels[@]})); then
        say "installing ${#wheels[@]} wheels from $PYDEPS into $site/lib (pip --no-deps)"
        "$PYTHON" -m pip install --disable-pip-version-check --quiet --no-index --no-deps --target "$site/lib" "${wheels[@]}"
      fi
      ((${#tarball[@]})) && mkdir -p "$site/diffusers-src" && tar -xzf "${tarball[0]}" -C "$site/diffusers-src"
      echo "$stamp" >"$site/.stamp"
    fi
    PYTHONPATH="$site/lib${PYTHONPATH:+:$PYTHONPATH}"
  fi
  PYTHONPATH="$PYDEPS${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONPATH
  for d in "$site/diffusers-src" "$PYDEPS/diffusers-src" "$PYDEPS/src" "$PYDEPS/diffusers/src"; do
    if [[ -f $d/diffusers/__init__.py ]]; then
      export DIFFUSERS_SRC=$d
      break
    fi
  done
fi

# ------------------------------------------------------------------ build
cd "$ROOT"
command -v node >/dev/null || die "node is not installed (node 20+ is needed)"
if [[ ! -d node_modules ]]; then
  say "node_modules is missing: npm ci --ignore-scripts (needs the npm registry; or carry node_modules along)"
  npm ci --ignore-scripts --no-audit --no-fund >&2
fi

cuda_wanted=0
case $DEVICE in
cuda*) cuda_wanted=1 ;;
auto) command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && cuda_wanted=1 ;;
esac
torch_dir=${LIBTORCH:-}
if [[ -z $torch_dir ]] && ((cuda_wanted)); then
  torch_dir=$("$PYTHON" -c 'import torch, os; print(os.path.dirname(torch.__file__))') ||
    die "$PYTHON cannot import torch: install a CUDA build of torch (2.11+) or set LIBTORCH"
  "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.version.cuda else 1)' ||
    die "the torch of $PYTHON ($torch_dir) has no CUDA: install a CUDA build of torch or set LIBTORCH"
fi
built_dir=$(node -e 'try{console.log(require("./build/libtorch.json").dir)}catch{}')
if ((REBUILD)) || [[ ! -f build/Release/train_lora.node ]] || [[ -n $torch_dir && $built_dir != "$torch_dir" && $built_dir != "$torch_dir/torch" ]]; then
  say "building the addon against ${torch_dir:-the libtorch build-native.js finds}"
  LIBTORCH=$torch_dir node scripts/build-native.js --force >&2
else
  say "addon already built against $built_dir (--rebuild to build again)"
fi
if [[ ! -f dist/bench/device-check.js || -n $(find src -name '*.ts' -newer dist/bench/device-check.js -print -quit) ]]; then
  [[ -d node_modules/typescript ]] || die "dist/ is missing or older than src/ and typescript is not installed: run npm run build:ts where it is, and bring dist/"
  say "compiling TypeScript (npm run build:ts)"
  npm run --silent build:ts >&2
fi

exec node dist/bench/device-check.js "${PASS[@]}"
