"""Crash tests of `mammodp train` as real processes: kill -9 at a checkpoint boundary and
mid-epoch, then resume; resume with changed settings refused; SIGTERM marks the run KILLED;
a second trainer on the same output is refused; the pipeline command resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_train_commands_resume_and_keep_their_checkpoints():
    """`dvc repro` after a kill resumes: the command asks for it and DVC keeps the folder."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name in ("train_real", "train"):
        assert "--resume-if-valid" in stages[name]["cmd"], name
        (model,) = [o for o in stages[name]["outs"] if isinstance(o, dict) and next(iter(o)).startswith("models/")]
        assert next(iter(model.values()))["persist"] is True, name


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny prepared phantom and params: 3 DP epochs of a few steps each."""
    from mammodp.config import load_config
    from mammodp.stages import phantom, prepare

    root = tmp_path_factory.mktemp("crash")
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["model"].update(pretrained_weights=None, mode="full")  # no pretrain stage here: random init, all trained
    p["phantom"].update(cbis_train_patients=30, cbis_test_patients=10, bcdr_patients=4, image_height=256,
                        image_width=160, mass_radius=[7.0, 14.0], difficulty=0.0)
    p["prepare"].update(patch_size=32, margin=8, min_size=24, workers=1)
    p["data"].update(raw_dir=str(root / "raw"), cbis_dir=str(root / "raw/cbis-ddsm"), bcdr_dir=str(root / "raw/bcdr"),
                     prepared_dir=str(root / "prepared"), synthetic_dir=str(root / "synthetic"))
    p["train"].update(epochs=3, batch_size=8, physical_batch_size=64, epsilons=[2], seeds=[0], device="cpu")
    p["dp"]["accountant"] = "rdp"  # cheaper per-epoch accounting
    p["experiment"] = "test-crash"
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    p["train"]["lr"] = 5e-2
    (root / "params_lr.yaml").write_text(yaml.safe_dump(p))
    p["train"]["lr"] = 1e-3
    p["train"]["epochs"] = 40
    (root / "params_long.yaml").write_text(yaml.safe_dump(p))
    cfg = load_config(root / "params.yaml")
    phantom.run(cfg, out=root / "raw")
    prepare.run(cfg, source="cbis-ddsm", root=root / "raw/cbis-ddsm", out=root / "prepared/cbis")
    return root


def _train(project: Path, cell: str, *extra: str, params: str = "params.yaml") -> subprocess.Popen:
    """`mammodp train` of one cell as a real process (the one to kill)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db",
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mammodp.cli", *_args(cell, params, *extra)], cwd=project,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _args(cell: str, params: str, *extra: str) -> list[str]:
    return ["train", "--regime", "real", "--epsilon", "2", "--out", f"models/{cell}", "--metrics",
            f"metrics/{cell}.json", "--report", f"reports/{cell}.json", "-p", params, *extra]


def _train_here(project: Path, monkeypatch, cell: str, *extra: str, params: str = "params.yaml"):
    """The same command in this process (what follows a kill; saves a process start-up)."""
    from typer.testing import CliRunner

    from mammodp.cli import app

    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project}/mlflow.db")
    result = CliRunner().invoke(app, _args(cell, params, *extra))
    return result.exit_code, result.output


def _wait_for(pred, proc: subprocess.Popen, timeout: float = 300.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc.poll() is not None:
            pytest.fail(f"the trainer exited {proc.returncode} before {what}:\n{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}:\n{proc.communicate()[1][-3000:]}")
        time.sleep(0.01)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _leftovers(project: Path, cell: str) -> list[str]:
    names = [p.name for p in (project / "models").glob(f".{cell}.*")]
    for folder in ("metrics", "reports"):
        names += [p.name for p in (project / folder).glob(f".{cell}.*")] if (project / folder).is_dir() else []
    if (project / "models" / cell / ".checkpoints").exists():
        names.append(f"{cell}/.checkpoints")
    return sorted(names)


def _expected_epsilon(run: dict, delta: float) -> float:
    from mammodp.privacy.accountant import make_accountant

    acc = make_accountant(run["accountant"])
    acc.history = [(run["noise_multiplier"], run["sample_rate"], run["steps"])]
    return acc.epsilon(delta)


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:") or "Traceback" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


@pytest.mark.slow
def test_kill_9_at_a_checkpoint_boundary_and_mid_epoch_then_resume(project, monkeypatch, caplog):
    from mammodp.privacy.sampler import steps_per_epoch

    ckpt = project / "models/real-2/.checkpoints/seed=0/last.pt"
    finals = []
    for mode in ("boundary", "mid-epoch"):
        proc = _train(project, "real-2")
        _wait_for(ckpt.is_file, proc, what="the first checkpoint")
        if mode == "mid-epoch":
            t1, m1 = time.monotonic(), ckpt.stat().st_mtime_ns
            _wait_for(lambda: ckpt.stat().st_mtime_ns != m1, proc, what="the second checkpoint")
            time.sleep((time.monotonic() - t1) / 2)  # half an epoch after a checkpoint
        proc.kill()  # kill -9
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        assert any(n.startswith(".real-2.tmp-") for n in _leftovers(project, "real-2"))  # debris of the kill

        if mode == "boundary":
            # Resuming with another setting (-p with a changed lr) is refused, naming the key.
            code, err = _train_here(project, monkeypatch, "real-2", "--resume", params="params_lr.yaml")
            assert code == 1
            line = _one_error_line(err)
            assert "params.train.lr" in line and "0.001" in line and "0.05" in line, line
            assert ckpt.is_file()

        caplog.clear()
        with caplog.at_level("INFO", logger="mammodp.training"):
            code, err = _train_here(project, monkeypatch, "real-2",
                                    "--resume" if mode == "boundary" else "--resume-if-valid")
        assert code == 0, err[-3000:]
        resumed = [r.getMessage() for r in caplog.records if "resumed from" in r.getMessage()]
        assert len(resumed) == 1 and "at epoch 0" not in resumed[0], resumed
        assert _leftovers(project, "real-2") == []  # no .tmp-*, no checkpoints: nothing half-done
        assert (project / "models/real-2/seed=0/weights.pt").is_file()
        run = json.loads((project / "reports/real-2.json").read_text())["runs"][0]
        assert run["steps"] == 3 * steps_per_epoch(run["sample_rate"])  # every step counted once
        assert run["epsilon"] == pytest.approx(_expected_epsilon(run, 1e-4), rel=1e-9)
        assert run["epsilon"] <= 2.0 + 1e-9
        finals.append(run["epsilon"])
    assert finals[0] == pytest.approx(finals[1], rel=1e-12)


@pytest.mark.slow
def test_sigterm_marks_the_run_killed_and_a_second_trainer_is_refused(project, monkeypatch):
    import mlflow

    ckpt = project / "models/real-2-long/.checkpoints/seed=0/last.pt"
    first = _train(project, "real-2-long", params="params_long.yaml")
    try:
        _wait_for(ckpt.is_file, first, what="the first checkpoint")
        code, err = _train_here(project, monkeypatch, "real-2-long", params="params_long.yaml")
        assert code == 1
        assert f"another trainer (pid {first.pid})" in _one_error_line(err)
        assert first.poll() is None, "the first trainer must still be running"
        first.send_signal(signal.SIGTERM)
        code, _, err = _finish(first, timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert code == 128 + signal.SIGTERM, err[-3000:]
    assert "interrupted by SIGTERM" in _one_error_line(err)
    assert [n for n in _leftovers(project, "real-2-long") if ".tmp-" in n] == []
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    exp = client.get_experiment_by_name("test-crash")
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'train' and params.`train.epochs` = '40'")
    assert [r.info.status for r in runs] == ["KILLED"]
