"""The grid over workers: a 2-job DVC experiment queue runs two grid cells concurrently (one
GPU id each from $MAMMODP_GPU_POOL), logging to the shared MLflow server; `mammodp collect` then
brings both cells' outputs and dvc.lock entries into the workspace from DVC's cache,
without training again (README, "From one machine to a cluster")."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
CELLS = ("train_real@1", "train_real@inf")


def tiny_params() -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["model"].update(pretrained_weights=None, mode="full")  # no pretrain stage here: random init, all trained
    p["experiment"] = "test-queue"
    p["phantom"].update(cbis_train_patients=24, cbis_test_patients=4, bcdr_patients=4, image_height=256,
                        image_width=160, mass_radius=[7.0, 14.0], difficulty=0.0)
    p["prepare"].update(patch_size=32, margin=8, min_size=24, workers=1)
    p["pretrain"].update(train_patients=24, test_patients=4, epochs=1, warmup_epochs=0, batch_size=16)
    p["validate"]["min_class_fraction"] = 0.05
    p["train"].update(epochs=1, epsilons=[1, "inf"], batch_size=8, physical_batch_size=16, device="cpu", amp=False)
    p["dp"].update(accountant="rdp", per_sample_method="hooks")
    return p


def sh(cmd: list[str], cwd: Path, env: dict, timeout: float = 900) -> str:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def test_two_queue_jobs_run_two_cells_and_land_in_the_workspace(server, tmp_path, runs_in):
    import mlflow

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    repo = tmp_path / "proj"
    for f in files:
        if (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "MLFLOW_TRACKING_URI": server["tracking_uri"],
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    sh(["git", "init", "-q"], repo, env)
    sh(["git", "config", "user.name", "mammodp-tests"], repo, env)
    sh(["git", "config", "user.email", "tests@mammodp.invalid"], repo, env)
    sh(["mammodp", "phantom", "--out", "data/raw"], repo, env)
    sh(["dvc", "commit", "--force", "--quiet", "data.dvc"], repo, env)
    # The cells' upstream (prepare, validate, the public pretraining) once, committed: the queued
    # runs start from it (README: "commit upstream stages first").
    sh(["dvc", "repro", "validate", "pretrain"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "data and upstream stages"], repo, env)

    for cell in CELLS:
        sh(["dvc", "exp", "run", "--queue", cell], repo, env)
    sh(["dvc", "queue", "start", "--jobs", "2"], repo, {**env, "MAMMODP_GPU_POOL": "0,1"})
    deadline = time.time() + 1800
    status = ""
    while time.time() < deadline:
        status = sh(["dvc", "queue", "status"], repo, env)
        if "Running" not in status and "Queued" not in status:
            break
        time.sleep(5)
    assert status.count("Success") == 2, status + "".join(
        subprocess.run(["dvc", "queue", "logs", line.split()[1]], cwd=repo, env=env, capture_output=True,
                       text=True).stdout[-3000:] for line in status.splitlines() if "Failed" in line)
    sh(["dvc", "queue", "stop", "--kill"], repo, env)

    # Collect: each cell's lock entry and cached outputs come back without training again.
    assert not (repo / "models/classifier/real-1/seed=0").exists()
    out = sh(["mammodp", "collect"], repo, env)
    for cell in CELLS:
        assert f"{cell} <- experiment" in out, out
    for eps in ("1", "inf"):
        assert (repo / f"models/classifier/real-{eps}/seed=0").is_dir()
        assert json.loads((repo / f"metrics/train/real-{eps}.json").read_text())["steps"] > 0
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(CELLS) <= set(lock)
    assert "up to date" in sh(["dvc", "status", *CELLS], repo, env)

    # Both cells logged to the shared server; concurrent jobs held different GPU ids.
    runs = runs_in(server["tracking_uri"], "test-queue", "tags.stage = 'train'")
    assert sorted(r.data.tags["epsilon"] for r in runs) == ["1", "inf"]
    gpus = [r.data.tags["cuda_visible_devices"] for r in runs]
    assert set(gpus) <= {"0", "1"}
    a, b = runs
    if a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time:  # they overlapped
        assert gpus[0] != gpus[1]
