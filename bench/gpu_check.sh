#!/usr/bin/env bash
# GPU check in one call (under 8 minutes on one H200): the CUDA-only tests, the DP overhead
# benchmark at Swin-T 224 px, and one epoch of the paper plan (full-model and head-only DP).
#
# On a bare GPU machine (Python 3.12 with torch and timm, no opacus / pydicom), first carry
# the missing wheels with the working tree (here: `make gpu-wheels` writes them to .whl/);
# this script installs them into /tmp/site before anything runs.
#   bash bench/gpu_check.sh            # from the repo root
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
$PY - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PYEOF
echo "== pytest -m gpu"
timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider tests/privacy tests/models || echo "pytest -m gpu FAILED"
echo "== bench/dp_overhead.py swin_tiny 224 px"
timeout 200 $PY bench/dp_overhead.py --preset swin_tiny --device cuda --steps 5 --batch 32 || echo "dp_overhead FAILED"
echo "== one epoch of the paper plan"
timeout 180 $PY bench/gpu_train_check.py --patients 40 || echo "gpu_train_check FAILED"
