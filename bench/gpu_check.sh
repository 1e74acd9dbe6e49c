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
# the ones after it of their whole time.
DEADLINE=${GPU_CHECK_DEADLINE:-570}
cap() { local left=$((DEADLINE - SECONDS)); [ "$left" -lt "$1" ] && echo $((left > 10 ? left : 10)) || echo "$1"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY - <<'PYEOF'
import timm, torch
print("torch", torch.__version__, "timm", timm.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
status=0
echo "== pytest -m gpu"
timeout $(cap 240) $PY -m pytest -q -m gpu -p no:cacheprovider -rs tests/privacy tests/models tests/gan || { echo "pytest -m gpu FAILED"; status=1; }
echo "== bench/dp_overhead.py swin_tiny 224 px, batch 32, float32"
timeout $(cap 120) $PY bench/dp_overhead.py --preset swin_tiny --device cuda --steps 10 --batch 32 --device-time || { echo "dp_overhead FAILED"; status=1; }
echo "== bench/dp_overhead.py swin_tiny 224 px, batch 128, float32 (default route only)"
timeout $(cap 120) $PY bench/dp_overhead.py --preset swin_tiny --device cuda --steps 10 --batch 128 --grad-chunk 128 --routes auto --device-time || { echo "dp_overhead FAILED"; status=1; }
echo "== bench/dp_overhead.py swin_tiny 224 px, batch 128, bf16 autocast (as the paper plan trains)"
timeout $(cap 200) $PY bench/dp_overhead.py --preset swin_tiny --device cuda --steps 10 --batch 128 --grad-chunk 128 --amp bf16 --routes auto,auto-ieee,auto-bf16,hooks --device-time || { echo "dp_overhead FAILED"; status=1; }
echo "== three epochs of the paper plan"
timeout $(cap 150) $PY bench/gpu_train_check.py --patients 400 || { echo "gpu_train_check FAILED"; status=1; }
exit $status
