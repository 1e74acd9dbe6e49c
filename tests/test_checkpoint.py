"""Checkpoints: plain data only (no pickle), settings-checked resume, one trainer per output,
stale temp outputs cleared, SIGTERM unwinding (temp outputs removed, MLflow run KILLED)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mammodp.checkpoint import (
    Checkpoint,
    OutputLocked,
    SettingsMismatch,
    exclusive_output,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from mammodp.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_round_trip_is_plain_data_read_with_weights_only(tmp_path):
    state = {"w": torch.arange(4.0), "probs": np.array([0.1, 0.9], np.float32), "epoch": 3,
             "history": [{"epsilon": float("inf"), "loss": 0.5}], "gen": torch.Generator().get_state()}
    p = save_checkpoint(tmp_path / "c.pt", state, {"train": {"lr": 1e-3, "epsilons": (1.0, float("inf"))}})
    raw = torch.load(p, weights_only=True)  # what any reader can do safely
    assert raw["format"] == "mammodp-checkpoint/1" and "settings_sha256" in raw
    got = load_checkpoint(p, {"train": {"lr": 1e-3, "epsilons": (1.0, float("inf"))}})
    assert isinstance(got["probs"], np.ndarray) and got["probs"].dtype == np.float32
    np.testing.assert_array_equal(got["probs"], state["probs"])
    assert torch.equal(got["w"], state["w"]) and got["epoch"] == 3 and got["history"] == state["history"]
    assert not list(tmp_path.glob(".c.pt.tmp-*"))


class _Payload:
    """Pickled, this would run code on load (it creates a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_bearing_checkpoint_is_refused_and_runs_no_code(tmp_path):
    """The resume path of training never unpickles objects (torch.load weights_only=True)."""
    from mammodp.models.swin import create_classifier
    from mammodp.training import FitSpec, fit

    marker = tmp_path / "pwned"
    bad = tmp_path / "last.pt"
    torch.save({"model": {}, "evil": _Payload(str(marker))}, bad)
    spec = FitSpec(epochs=1, lr=1e-3, weight_decay=0.0, batch_size=4, physical_batch_size=4, label_smoothing=0.0,
                   flip=False, amp=False, seed=0, epsilon=float("inf"), delta=1e-5, max_grad_norm=1.0,
                   accountant="rdp", privacy_unit="patch", grad_chunk=4)
    table = _table(8)
    with pytest.raises(DataError, match="not a readable checkpoint"):
        fit(create_classifier("swin_micro"), spec, private=None, public=table, val=table, device="cpu",
            checkpoint=bad, resume=True, progress=False)
    assert not marker.exists()


def _table(n: int):
    import pandas as pd

    from mammodp.data.datasets import PatchTable

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"sample_id": [f"s{i}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
                          "label": [i % 2 for i in range(n)]})
    return PatchTable(frame=frame, images=rng.uniform(0, 1, (n, 1, 32, 32)).astype(np.float32),
                      labels=frame["label"].to_numpy())


def _spec(**kw):
    from mammodp.training import FitSpec

    base = dict(epochs=2, lr=1e-3, weight_decay=0.0, batch_size=4, physical_batch_size=4, label_smoothing=0.0,
                flip=False, amp=False, seed=0, epsilon=float("inf"), delta=1e-5, max_grad_norm=1.0,
                accountant="rdp", privacy_unit="patch", grad_chunk=4)
    return FitSpec(**{**base, **kw})


def test_resume_with_a_changed_setting_is_refused_naming_it(tmp_path):
    """Seen before: lr 1e-3 -> 5e-2 with --resume trained nothing and shipped the old weights."""
    from mammodp.models.swin import create_classifier
    from mammodp.training import fit

    table = _table(8)
    ck = Checkpoint(tmp_path / "last.pt", {"params": {"model.preset": "swin_micro"}})
    fit(create_classifier("swin_micro"), _spec(), private=None, public=table, val=table, device="cpu",
        checkpoint=ck, progress=False)
    with pytest.raises(SettingsMismatch, match=r"fit\.lr \(the checkpoint was made with 0\.001, this run has 0\.05\)"):
        fit(create_classifier("swin_micro"), _spec(lr=5e-2), private=None, public=table, val=table, device="cpu",
            checkpoint=ck, resume=True, progress=False)
    other = dataclasses.replace(ck, settings={"params": {"model.preset": "swin_tiny"}})
    with pytest.raises(SettingsMismatch, match=r"params\.model\.preset"):
        other.load(_spec())
    # Identical settings resume: nothing left to train, the saved epochs come back.
    res = fit(create_classifier("swin_micro"), _spec(), private=None, public=table, val=table, device="cpu",
              checkpoint=ck, resume=True, progress=False)
    assert [h["epoch"] for h in res.history] == [0, 1]


def test_restart_mode_sets_an_unusable_checkpoint_aside_and_trains_afresh(tmp_path):
    from mammodp.models.swin import create_classifier
    from mammodp.training import fit

    table = _table(8)
    fit(create_classifier("swin_micro"), _spec(), private=None, public=table, val=table, device="cpu",
        checkpoint=Checkpoint(tmp_path / "last.pt"), progress=False)
    seen = []
    fit(create_classifier("swin_micro"), _spec(lr=5e-2), private=None, public=table, val=table, device="cpu",
        checkpoint=Checkpoint(tmp_path / "last.pt", on_mismatch="restart"), resume=True,
        on_epoch=lambda r: seen.append(r["epoch"]), progress=False)
    assert seen == [0, 1]  # trained afresh with the new lr
    assert (tmp_path / "last.pt.unusable").is_file()
    _, flat = read_checkpoint(tmp_path / "last.pt")
    assert flat["fit.lr"] == 5e-2


def test_a_truncated_checkpoint_is_a_clear_error(tmp_path):
    p = save_checkpoint(tmp_path / "c.pt", {"x": torch.zeros(1000)}, {})
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(DataError, match="not a readable checkpoint"):
        load_checkpoint(p, {})


_HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from mammodp.checkpoint import exclusive_output
    with exclusive_output(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_a_second_trainer_on_the_same_output_is_refused_until_the_first_dies(tmp_path):
    out = tmp_path / "models" / "real-1"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdout=subprocess.PIPE, env=_env(),
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLocked, match=rf"another trainer \(pid {holder.pid}\)"):
            with exclusive_output(out):
                pass
    finally:
        holder.kill()  # kill -9: the kernel releases the lock
        holder.wait()
    with exclusive_output(out) as ckpt:
        assert ckpt == out / ".checkpoints"


def test_stale_temp_outputs_of_a_killed_run_are_removed_on_the_next_start(tmp_path):
    out, metrics = tmp_path / "real-1", tmp_path / "metrics" / "real-1.json"
    metrics.parent.mkdir()
    stale = [tmp_path / ".real-1.tmp-abc123", tmp_path / ".real-1.old-4242", metrics.parent / ".real-1.json.tmp-9.json"]
    stale[0].mkdir()
    (stale[0] / "weights.pt").write_bytes(b"half")
    stale[1].mkdir()
    stale[2].write_text("{")
    keep = tmp_path / ".real-10.tmp-zzz"
    keep.mkdir()
    with exclusive_output(out, metrics):
        pass
    assert not any(p.exists() for p in stale) and keep.is_dir()


_SIGTERM_CHILD = textwrap.dedent("""
    import sys, time
    from mammodp import tracking
    from mammodp.io import atomic_dir
    with tracking.start_run("test-signals", "train", name="victim") as run:
        print(run.info.run_id, flush=True)
        with atomic_dir(sys.argv[1]) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 1000)
            print(tmp, flush=True)
            time.sleep(60)
""")


def test_sigterm_marks_the_run_killed_and_removes_temp_outputs(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**_env(), "MLFLOW_TRACKING_URI": uri}
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", _SIGTERM_CHILD, str(out)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=env, text=True, cwd=tmp_path)
    try:
        run_id = child.stdout.readline().strip()
        tmp = Path(child.stdout.readline().strip())
        assert tmp.is_dir() and tmp.name.startswith(".out.tmp-")
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode != 0
    assert not tmp.exists() and not out.exists()
    assert mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "KILLED"
