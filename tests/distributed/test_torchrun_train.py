"""`torchrun --nproc_per_node=2 -m mammodp train` on a tiny phantom project, gloo on CPU.

The CLI detects the torchrun environment; the 2-rank cell has the 1-process privacy record
(q, sigma, steps, epsilon); only rank 0 logs an MLflow run and writes outputs; a rank killed
mid-run fails the job with no output written and its run marked FAILED; `--resume` finishes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def project(make_tiny_project) -> tuple[Path, dict]:
    root = make_tiny_project("ddp-proj", experiment="test-torchrun",
                             train=dict(epochs=5, batch_size=8, physical_batch_size=16, epsilons=[1], seeds=[0],
                                        device="cpu", amp=False),
                             dp=dict(accountant="rdp", per_sample_method="hooks", reproducible_noise=True))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return root, env


def torchrun(name: str, *extra: str) -> list[str]:
    return ["torchrun", "--standalone", "--nproc_per_node=2", "-m", "mammodp", "train", "--regime", "real",
            "--epsilon", "1", "--out", f"models/{name}", "--metrics", f"metrics/{name}.json",
            "--report", f"reports/{name}.json", *extra]


def train_runs(root: Path, name_filter: str = ""):
    """Train runs in the project's store, read without touching MLflow's process-wide URI."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("test-torchrun")
    return list(client.search_runs([exp.experiment_id], filter_string="tags.stage = 'train'" + name_filter))


def worker_pid(agent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (a child of the agent process)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int(next(line for line in (d / "status").read_text().splitlines()
                            if line.startswith("PPid:")).split()[1])
            environ = (d / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration):
            continue
        if ppid == agent and f"RANK={rank}".encode() in environ:
            return int(d.name)
    return None


@pytest.fixture(scope="module")
def one_process(project) -> dict:
    """The same cell trained by one plain process (in this interpreter): the reference."""
    from mammodp.config import load_config
    from mammodp.stages import train

    root, env = project
    cwd, uri = os.getcwd(), os.environ["MLFLOW_TRACKING_URI"]
    os.chdir(root)
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    try:
        train.run(load_config(root / "params.yaml"), regime="real", epsilon=1.0, out=root / "models/one",
                  metrics_out=root / "metrics/one.json", report_out=root / "reports/one.json")
    finally:
        os.chdir(cwd)
        os.environ["MLFLOW_TRACKING_URI"] = uri
    return json.loads((root / "metrics/one.json").read_text())


def same_privacy(got: dict, want: dict) -> None:
    for key in ("sample_rate", "steps", "noise_multiplier", "private", "within_budget"):
        assert got[key] == want[key], key
    assert got["epsilon"] == pytest.approx(want["epsilon"], rel=1e-12)


def test_two_ranks_have_the_one_process_privacy_record_and_one_run(project, one_process):
    root, env = project
    res = subprocess.run(torchrun("two"), cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "rank 1 of 2 (gloo on cpu)" in res.stderr
    same_privacy(json.loads((root / "metrics/two.json").read_text()), one_process)

    runs = train_runs(root, " and tags.world_size = '2'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 1 logged nothing
    assert sorted(p.name for p in (root / "models/two").iterdir()) == ["seed=0"]


def test_a_killed_rank_fails_the_job_cleanly_and_resume_finishes_it(project, one_process):
    root, env = project
    ckpt = root / "models/killed/.checkpoints/seed=0/last.pt"  # checkpoints live in the cell's --out
    before = {r.info.run_id for r in train_runs(root)}
    with open(root / "killed.log", "w") as log:
        job = subprocess.Popen(torchrun("killed"), cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while not ckpt.exists() and job.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ckpt.exists() and job.poll() is None, "the job should be mid-run after its first checkpoint"
        pid = worker_pid(job.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        rc = job.wait(timeout=300)
    out = (root / "killed.log").read_text()
    assert rc != 0
    # Rank 0 stops with one line: its collective failed, or torchrun's SIGTERM reached it first.
    assert ("error: distributed: rank 0/2: " in out and "no output was written" in out) or (
        "error: interrupted by SIGTERM; temporary outputs removed" in out), out[-3000:]
    # No half-written output: the cell's folder holds only the checkpoints to resume from (no
    # model), metrics and report are absent, no temp folder is left.
    assert sorted(p.name for p in (root / "models/killed").iterdir()) == [".checkpoints"]
    assert not [p.name for p in (root / "models").iterdir() if p.name.startswith(".killed")]
    assert not (root / "metrics/killed.json").exists() and not (root / "reports/killed.json").exists()
    new = [r for r in train_runs(root) if r.info.run_id not in before]
    assert len(new) == 1 and new[0].info.status in ("FAILED", "KILLED"), out[-2500:]
    from mammodp.checkpoint import read_checkpoint

    state, _ = read_checkpoint(ckpt)
    epoch_saved = state["epoch"]
    assert len(state["ranks"]) == 2  # every rank's sampler state

    res = subprocess.run(torchrun("killed", "--resume"), cwd=root, env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"at epoch {epoch_saved + 1}" in res.stderr
    same_privacy(json.loads((root / "metrics/killed.json").read_text()), one_process)
