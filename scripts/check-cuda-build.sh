#!/usr/bin/env bash
# Proves the CUDA build on a machine without a GPU (npm run check:cuda-build; CI runs it after the CPU tests):
#   1. pip-installs torch's CUDA 13 wheels into a cache folder (~4 GB; reused while the package list is the same);
#   2. builds the addon against them into build-cuda/ (scripts/build-native.js --out, LIBTORCH=...), with NCCL;
#   3. with that addon (TRAIN_LORA_ADDON, inherited by every process the tests spawn): `train-lora devices` must
#      report a CUDA build without a device, and the parity, training/resume, checkpoint and gloo data-parallel
#      tests must pass on the CPU.
# Environment: TRAIN_LORA_CACHE (the cache root, as for the demo), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
CACHE="${TRAIN_LORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/train-lora}"
TORCH_HOME="$CACHE/torch-cu13"
OUT="build-cuda"
# torch and the nvidia-* wheels it loads (torch's own dependencies, installed with --no-deps so that nothing else
# comes along), plus the two header-only wheels ProcessGroupNCCL.hpp needs and torch does not depend on
# (crt/host_config.h, nv/target): with them the build compiles NCCL in, so this check covers that code too.
PACKAGES=(torch==2.14.1 nvidia-cublas nvidia-cuda-runtime nvidia-cuda-nvrtc nvidia-cudnn-cu13 nvidia-cufft
  nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-nccl-cu13 nvidia-nvjitlink
  nvidia-nvshmem-cu13 nvidia-cuda-cupti nvidia-nvtx nvidia-cufile nvidia-cuda-crt nvidia-cuda-cccl)
TESTS=(test/parity.test.ts test/train-parity.test.ts test/train-resume.test.ts test/checkpoint-manager.test.ts
  test/distributed.test.ts test/cuda-graphs.test.ts)

say() { echo "[check:cuda-build] $*"; }
fail() { say "FAILED: $*" >&2; exit 1; }

# 1. torch + CUDA wheels. A marker with the package list makes an interrupted install count as absent.
marker="$TORCH_HOME/.train-lora-packages"
t0=$SECONDS
if [[ -f "$marker" && "$(cat "$marker")" == "${PACKAGES[*]}" ]]; then
  say "reusing $TORCH_HOME"
else
  # pip's configured indexes, if any, become the whole source: the first one replaces PyPI (so that a machine
  # without internet does not wait for pypi.org), the others are extra. Otherwise plain pip (PyPI).
  index_args=()
  if urls="$("$PY" -m pip config get global.extra-index-url 2>/dev/null)" && [[ -n "$urls" ]]; then
    read -r -a url_list <<<"$(echo "$urls" | tr '\n' ' ')"
    index_args=(--index-url "${url_list[0]}")
    for u in "${url_list[@]:1}"; do index_args+=(--extra-index-url "$u"); done
  fi
  say "installing torch 2.14.1 with CUDA 13 wheels into $TORCH_HOME (~4 GB)"
  rm -rf "$TORCH_HOME" "$TORCH_HOME.partial"
  mkdir -p "$CACHE"
  "$PY" -m pip install --disable-pip-version-check "${index_args[@]}" --no-deps --target "$TORCH_HOME.partial" "${PACKAGES[@]}"
  echo "${PACKAGES[*]}" >"$TORCH_HOME.partial/.train-lora-packages"
  mv "$TORCH_HOME.partial" "$TORCH_HOME"
fi
install_s=$((SECONDS - t0))

# 2. The CUDA-linked addon.
t0=$SECONDS
LIBTORCH="$TORCH_HOME/torch" node scripts/build-native.js --out "$OUT"
build_s=$((SECONDS - t0))
addon="$PWD/$OUT/Release/train_lora.node"
node -e '
  const info = require(process.argv[1]);
  if (!info.cuda) { console.error("libtorch.json: not a CUDA build"); process.exit(1); }
  if (!info.nccl.enabled) { console.error("NCCL is off: " + JSON.stringify(info.nccl.missing)); process.exit(1); }
' "$PWD/$OUT/libtorch.json" || fail "the build in $OUT is not a CUDA build with NCCL"

# 3. Checks with that addon.
export TRAIN_LORA_ADDON="$addon"
npm run --silent build:ts
devices="$(node dist/cli.js devices)" || fail "train-lora devices failed with the CUDA-linked addon"
echo "$devices"
grep -q '(CUDA build)' <<<"$devices" || fail "train-lora devices does not report a CUDA build"
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  grep -Eq '\[OK\] +cuda:0' <<<"$devices" || fail "this machine has a GPU, but train-lora devices lists no CUDA device"
else
  grep -Eq '\[--\] +cuda:' <<<"$devices" || fail "expected train-lora devices to say that no CUDA device was found"
fi
backends="$(node -e 'console.log(require("./dist/native").native().distBackends().join(","))')"
[[ "$backends" == *nccl* ]] || fail "distBackends() is '$backends', expected nccl in a CUDA build with NCCL"
say "devices: CUDA build, no device; distributed backends: $backends"

t0=$SECONDS
tests_ok=1
npx jest --ci "${TESTS[@]}" || tests_ok=0
tests_s=$((SECONDS - t0))
summary="torch install ${install_s} s, CUDA-linked build ${build_s} s, ${#TESTS[@]} test files on the CPU ${tests_s} s"
[[ $tests_ok == 1 ]] || fail "the tests failed with the CUDA-linked addon ($summary)"
say "OK: $summary"
