"""`mammodp tune` on tiny phantom-like patches: nested runs, budget per trial, resumable study."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mammodp.config import load_config
from mammodp.data.imageio import save_patch
from mammodp.errors import ConfigError
from mammodp.stages import tune

REPO = Path(__file__).resolve().parents[2]
PATCH = 32
BUDGET = 8.0


def patch(rng: np.random.Generator, malignant: bool) -> np.ndarray:
    """A noisy background with a disc: bright and irregular for malignant, faint for benign."""
    yy, xx = np.mgrid[:PATCH, :PATCH]
    r = rng.uniform(5, 9)
    disc = ((yy - PATCH / 2) ** 2 + (xx - PATCH / 2) ** 2) < r**2
    img = rng.uniform(0.1, 0.3, (PATCH, PATCH))
    img[disc] += 0.5 if malignant else 0.15
    return np.clip(img, 0, 1)


def write_manifest(root: Path, n_train: int = 8, n_val: int = 8) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for split, n in (("train", n_train), ("val", n_val)):
        for i in range(n):
            sid = f"{split}-{i}"
            save_patch(root / "patches" / f"{sid}.png", patch(rng, bool(i % 2)))
            rows.append({"sample_id": sid, "patient_id": f"P{split}{i // 2}", "split": split, "label": i % 2,
                         "pathology": "MALIGNANT" if i % 2 else "BENIGN", "image_path": f"patches/{sid}.png",
                         "source": "phantom"})
    path = root / "manifest.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine two threads contend and run ~4x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch, one_thread):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    write_manifest(tmp_path / "prepared" / "cbis")
    return load_config(REPO / "params.yaml", overrides={
        "experiment": "test-tune", "data.prepared_dir": str(tmp_path / "prepared"),
        "model.preset": "swin_micro", "model.pretrained_weights": None, "model.mode": "full",
        "dp.accountant": "rdp", "dp.delta": 1e-3, "dp.grad_chunk": 16, "dp.privacy_unit": "patch",
        "train.batch_size": 4, "train.physical_batch_size": 16, "train.device": "cpu", "train.amp": False,
        "tune.n_trials": 4, "tune.storage": f"sqlite:///{tmp_path}/optuna/study.db", "tune.max_epochs": 2,
        "tune.noise_multiplier": [0.3, 4.0], "tune.startup_trials": 4, "tune.pruner_startup_trials": 1,
        "tune.pruner_warmup_epochs": 0,
    })


def nested_trial_runs(experiment: str, parent: str):
    import mlflow

    return mlflow.search_runs(experiment_names=[experiment], output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.stage = 'tune-trial'")


def test_study_creates_nested_runs_within_budget_and_resumes(cfg, tmp_path):
    from mammodp.stages.train import fit_spec, load_tuned

    out = tmp_path / "metrics" / "tune" / "eps=8.json"
    report = tmp_path / "reports" / "tune" / "eps=8.json"
    first = tune.run(cfg, BUDGET, out=out, report=report)
    runs = nested_trial_runs(cfg.experiment, first["mlflow_run_id"])
    assert len(runs) == 4 and first["trials"]["total"] == 4
    for r in runs:
        assert r.data.metrics["final_epsilon"] <= BUDGET
        assert r.data.params["noise_multiplier"] and r.data.tags["epsilon"] == "8"
        assert r.data.tags["trial_state"] in ("COMPLETE", "PRUNED")
    assert first["max_trial_epsilon"] <= BUDGET
    assert first["private_train_trials"] == 4 and first["private_validation_trials"] == 4
    assert "covered by no epsilon" in first["privacy_statement"]
    # One epoch at the sigma floor fits the budget; below it would not.
    floor = first["search_space"]["noise_multiplier"][0]
    one_epoch = first["steps_per_epoch"]
    assert tune.epsilon_after("rdp", floor, first["sample_rate"], one_epoch, 1e-3) <= BUDGET
    assert tune.epsilon_after("rdp", floor * 0.9, first["sample_rate"], one_epoch, 1e-3) > BUDGET

    second = tune.run(cfg, BUDGET, out=out, report=report)
    assert second["study_name"] == first["study_name"]
    assert second["mlflow_run_id"] == first["mlflow_run_id"]
    assert second["trials"]["total"] == 8
    assert len(nested_trial_runs(cfg.experiment, first["mlflow_run_id"])) == 8
    assert second["max_trial_epsilon"] <= BUDGET

    # The full result is a report; the metrics file holds numbers only.
    second_again = tune.run(dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, n_trials=1)), BUDGET,
                            out=out, report=report)
    written = json.loads(report.read_text())
    assert written == json.loads(json.dumps(second_again))
    numbers = json.loads(out.read_text())
    assert numbers and all(isinstance(v, (int, float)) for v in numbers.values())
    assert numbers["trials"] == 9 and numbers["private_train_trials"] == 9
    # `mammodp train --tuned` takes the best params from the report.
    tuned = load_tuned(report)
    assert {k: v for k, v in tuned.items() if k != "privacy_statement"} == second_again["best_params"]
    assert tuned["privacy_statement"] == second_again["privacy_statement"]  # carried to the run
    spec = fit_spec(load_config(REPO / "params.yaml"), BUDGET, 0, tuned)
    assert (spec.lr, spec.noise_multiplier, spec.epochs) == (tuned["lr"], tuned["noise_multiplier"], tuned["epochs"])


def test_epochs_are_the_largest_count_within_budget():
    q, spe, delta = 0.1, 10, 1e-5
    for sigma in (0.8, 1.2, 2.0):
        e, eps = tune.max_epochs_within_budget(3.0, delta, sigma, q, spe, "rdp", 50)
        assert eps <= 3.0
        assert e == 50 or tune.epsilon_after("rdp", sigma, q, (e + 1) * spe, delta) > 3.0
    assert tune.max_epochs_within_budget(0.01, delta, 0.5, q, spe, "rdp", 5) == (0, 0.0)


def test_infeasible_noise_range_is_a_config_error(cfg):
    import dataclasses

    bad = dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, noise_multiplier=(0.1, 0.2)))
    with pytest.raises(ConfigError, match=r"tune\.noise_multiplier"):
        tune.run(bad, 0.5)
    with pytest.raises(ConfigError, match="finite budget"):
        tune.run(cfg, float("inf"))


def test_synthetic_objective_reads_no_real_validation_record(cfg, tmp_path):
    import dataclasses

    # Drop the real validation split altogether: synthetic tuning must not need it.
    cbis = tmp_path / "prepared" / "cbis" / "manifest.parquet"
    df = pd.read_parquet(cbis)
    df[df["split"] == "train"].to_parquet(cbis)
    synth = tmp_path / "synthetic"
    rng = np.random.default_rng(5)
    rows = []
    for i in range(12):
        save_patch(synth / f"s{i}.png", patch(rng, bool(i % 2)))
        rows.append({"sample_id": f"s{i}", "patient_id": "synthetic", "split": "train", "label": i % 2,
                     "pathology": "MALIGNANT" if i % 2 else "BENIGN", "image_path": f"s{i}.png",
                     "source": "synthetic", "generator_epsilon": "non-private", "generator_run_id": "r0"})
    pd.DataFrame(rows).to_parquet(synth / "manifest.parquet")
    c = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, synthetic_dir=str(synth)),
                            tune=dataclasses.replace(cfg.tune, data="synthetic", synthetic_val_size=8, n_trials=1))

    result = tune.run(c, BUDGET, out=tmp_path / "eps=8.json", report=tmp_path / "report-eps=8.json")
    assert result["objective_data"] == "synthetic"
    assert "8 patches" in result["objective_data_description"]
    assert result["private_train_trials"] == 1 and result["private_validation_trials"] == 0
    assert result["synthetic_privacy"] == "not_covered"
    assert "no real validation record was read" in result["privacy_statement"]
    assert result["max_trial_epsilon"] <= BUDGET
