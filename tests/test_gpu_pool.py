"""`MAMMODP_GPU_POOL`: concurrent jobs of one machine each hold a different GPU id."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CLAIM = ("import sys, time; from mammodp.runtime import claim_gpu; "
         "print(claim_gpu(sys.argv[1]), flush=True); time.sleep(float(sys.argv[2]))")


def test_concurrent_jobs_get_distinct_gpus_and_a_dead_job_frees_its_own(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "LOCAL_RANK")}
    env.update(MAMMODP_GPU_POOL="0,1", PYTHONPATH=str(ROOT))
    jobs = [subprocess.Popen([sys.executable, "-c", CLAIM, str(tmp_path), "3"], env=env, stdout=subprocess.PIPE,
                             text=True) for _ in range(2)]
    first = sorted(j.stdout.readline().strip() for j in jobs)
    assert first == ["0", "1"]  # both held at once: one each
    # A third job waits for a free GPU and gets the one released first.
    third = subprocess.run([sys.executable, "-c", CLAIM, str(tmp_path), "0"], env=env, capture_output=True,
                           text=True, timeout=60)
    assert third.stdout.strip() in ("0", "1")
    for j in jobs:
        j.wait(timeout=30)
    # Without a pool nothing is claimed, and an explicit single device is respected.
    plain = {**env, "MAMMODP_GPU_POOL": ""}
    out = subprocess.run([sys.executable, "-c", CLAIM, str(tmp_path), "0"], env=plain, capture_output=True, text=True)
    assert out.stdout.strip() == "None"
    fixed = {**env, "CUDA_VISIBLE_DEVICES": "1"}
    out = subprocess.run([sys.executable, "-c", CLAIM, str(tmp_path), "0"], env=fixed, capture_output=True, text=True)
    assert out.stdout.strip() == "None"
