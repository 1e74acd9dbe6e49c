"""`mammodp validate` end to end: reports, MLflow run, exit codes and the one-line error."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from mammodp.cli import app
from mammodp.config import load_config
from mammodp.data.imageio import save_patch
from mammodp.stages.validate import expected_shape

REPO = Path(__file__).resolve().parents[1]
PATCH = 32


def write_set(folder: Path, splits: tuple[str, ...], n: int = 8, seed: int = 0) -> Path:
    """A valid manifest.parquet with n patches per split (half malignant) in `folder`."""
    rng = np.random.default_rng(seed)
    rows = []
    for split in splits:
        for i in range(n):
            sid = f"{folder.name}-{split}-{i}"
            save_patch(folder / f"{sid}.png", rng.uniform(0.2, 0.8, (PATCH, PATCH)))
            rows.append(dict(
                sample_id=sid, patient_id=f"P-{sid}", split=split, label=i % 2,
                pathology="MALIGNANT" if i % 2 else "BENIGN", image_path=f"{sid}.png",
                source=folder.name,
            ))
    path = folder / "manifest.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    """A temp working folder with params.yaml (32 px patches) and a temp MLflow store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["prepare"]["patch_size"] = PATCH
    raw["experiment"] = "test-validate"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path


def invoke(*args: str):
    return CliRunner().invoke(app, ["validate", *args, "-p", "params.yaml"])


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def last_run():
    from mammodp.tracking import find_runs

    runs = find_runs("test-validate")
    assert len(runs) == 1
    return runs.iloc[0]


def test_clean_manifest_exits_0(workdir: Path, caplog):
    manifest = write_set(workdir / "data" / "prepared" / "cbis", ("train", "val", "test"))
    caplog.set_level(logging.INFO)
    result = invoke("--manifest", str(manifest), "--report-dir", "reports")
    assert result.exit_code == 0, result.output
    # GX's INFO chatter (docs registry, temp docs site) is silenced under the CLI's INFO logging.
    assert [r.getMessage() for r in caplog.records if r.name.startswith("great_expectations")] == []
    assert "cbis:" in result.stdout and "expectations passed" in result.stdout

    report = json.loads((workdir / "reports" / "cbis.json").read_text())
    assert report["success"] is True and report["failed"] == []
    assert report["n_rows"] == 24 and report["expected_shape"] == [PATCH, PATCH]

    run = last_run()
    assert run["status"] == "FINISHED"
    assert run["metrics.expectations_failed"] == 0
    assert run["metrics.expectations_evaluated"] == report["statistics"]["evaluated"]
    assert run["tags.validation_success"] == "true"
    import mlflow

    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run["run_id"], "validation")]
    assert artifacts == ["validation/cbis.json"]
    # GX ran ephemeral: no gx/ project, data docs or other files of its own appeared here.
    assert {p.name for p in workdir.iterdir()} <= {
        "params.yaml", "data", "reports", "mlflow.db", "mlruns", "mlartifacts"}


def test_broken_manifest_exits_1_naming_the_expectation(workdir: Path):
    """Default discovery: every prepared set is checked and reported, then the stage fails."""
    prepared = workdir / "data" / "prepared"
    write_set(prepared / "bcdr", ("external",))
    cbis = write_set(prepared / "cbis", ("train", "val", "test"), seed=1)
    df = pd.read_parquet(cbis)
    df.loc[1, "sample_id"] = df.loc[0, "sample_id"]
    df.to_parquet(cbis)

    result = invoke("--report-dir", "reports")
    assert result.exit_code == 1
    assert error_lines(result) == [
        "error: cbis: expect_column_values_to_be_unique(sample_id) (first: patient_id 'P-cbis-train-0', "
        "sample_id 'cbis-train-0') (reports in reports)"]
    assert "Traceback" not in result.output

    bcdr = json.loads((workdir / "reports" / "bcdr.json").read_text())
    broken = json.loads((workdir / "reports" / "cbis.json").read_text())
    assert bcdr["success"] is True
    assert broken["success"] is False
    assert broken["failed"] == ["expect_column_values_to_be_unique(sample_id)"]
    run = last_run()
    assert run["status"] == "FAILED"  # the MLflow run fails with the pipeline
    assert run["metrics.expectations_failed"] == 1
    assert run["metrics.cbis.expectations_failed"] == 1
    assert run["metrics.bcdr.expectations_failed"] == 0


def test_missing_manifest_is_a_data_error(workdir: Path):
    result = invoke("--manifest", "data/prepared/nope/manifest.parquet", "--report-dir", "reports")
    assert result.exit_code == 1
    assert error_lines(result) == [
        "error: data/prepared/nope/manifest.parquet: manifest not found"]
    assert not (workdir / "reports").exists()


def test_synthetic_manifest_expects_the_patch_size(workdir: Path):
    """`synthesize` resizes generator output to prepare.patch_size: every set is checked at it."""
    cfg = load_config(workdir / "params.yaml")
    cfg = dataclasses.replace(cfg, gan=dataclasses.replace(cfg.gan, image_size=128))
    synthetic = Path(cfg.data.synthetic_dir) / "manifest.parquet"
    prepared = Path(cfg.data.prepared_dir) / "cbis" / "manifest.parquet"
    assert expected_shape(cfg, synthetic) == expected_shape(cfg, prepared) == (PATCH, PATCH)


@pytest.mark.parametrize("key, value", [
    ("min_class_fraction", 0.5), ("intensity_mean", [0.9, 0.1]), ("intensity_std_min", -1.0)])
def test_bad_validate_params_are_rejected(workdir: Path, key, value):
    raw = yaml.safe_load((workdir / "params.yaml").read_text())
    raw["validate"][key] = value
    (workdir / "params.yaml").write_text(yaml.safe_dump(raw))
    result = invoke("--report-dir", "reports")
    assert result.exit_code == 1
    assert len(error_lines(result)) == 1 and f"validate.{key}" in error_lines(result)[0]
