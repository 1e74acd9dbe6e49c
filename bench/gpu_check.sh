#!/usr/bin/env bash
# GPU check in one call (about 5 minutes on one H200, every part under its own timeout): the
# CUDA-only tests, the DP overhead benchmark of Swin-T at 224 px (batch 32 in float32 and batch
# 128 under bf16 autocast with the default route, the same with its clipping products in IEEE
# float32 (auto-ieee: the exact TF32 products' A/B; auto-bf16: the same products as bf16 GEMMs
# with float32 output) and the hooks route; batch 128 in float32
# with the default route), and three epochs of the paper plan (full-model and head-only DP beside plain
# training).
#
# On a bare GPU machine (Python 3.12 with torch and timm, no opacus / pydicom / MLflow / DVC),
# first carry the missing wheels with the working tree (here: `make gpu-wheels` writes them to
# .whl/); this script installs them into /tmp/site before anything runs. The training core
# imports neither MLflow nor DVC.
#   bash bench/gpu_check.sh            # from the repo root
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
if ! $PY -c "import opacus, pydicom, timm" 2>/dev/null; then
  echo "opacus, pydicom or timm missing: run 'make gpu-wheels' here and carry .whl/ with the working tree" >&2
  exit 2
fi
# One deadline for the whole check (a device call may run 600 s): each part gets its own cap
# or what is left before DEADLINE seconds, whichever is less, so a slow part cannot starve
# the ones after it of their whole time; a part with less than its minimum left is skipped
# (and reported), not started to be killed.
DEADLINE=${GPU_CHECK_DEADLINE:-570}
status=0
part() {  # part MIN_S CAP_S NAME COMMAND...
  local min=$1 want=$2 name=$3 left=$((DEADLINE - SECONDS))
  shift 3
  echo "== $name"
  if [ "$left" -lt "$min" ]; then
    echo "$name SKIPPED: ${left} s left of the ${DEADLINE} s deadline, needs ${min} s"
    status=1
    return
  fi
  timeout -k 5 $((left < want ? left : want)) "$@" || { echo "$name FAILED"; status=1; }
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY - <<'PYEOF'
import timm, torch
print("torch", torch.__version__, "timm", timm.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
# Without CUDA every GPU test would skip (pytest: a pass) and every benchmark fail.
if ! $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "CUDA is not available to torch here (driver, or a CPU build): nothing to check" >&2
  exit 3
fi
part 60 240 "pytest -m gpu" $PY -m pytest -q -m gpu -p no:cacheprovider -rs tests/privacy tests/models tests/gan
part 60 120 "bench/dp_overhead.py swin_tiny 224 px, batch 32, float32" $PY bench/dp_overhead.py --preset swin_tiny --device cuda --steps 10 --batch 32 --device-time
part 60 120 "bench/dp_overhead.py swin_tiny 224 px, batch 128, float32 (default route only)" $PY bench/dp_overhead.py --preset swin_tiny --device cuda --steps 10 --batch 128 --grad-chunk 128 --routes auto --device-time
part 90 200 "bench/dp_overhead.py swin_tiny 224 px, batch 128, bf16 autocast (as the paper plan trains)" $PY bench/dp_overhead.py --preset swin_tiny --device cuda --steps 10 --batch 128 --grad-chunk 128 --amp bf16 --routes auto,auto-ieee,auto-bf16,hooks --device-time
part 90 150 "three epochs of the paper plan" $PY bench/gpu_train_check.py --patients 400
exit $status
