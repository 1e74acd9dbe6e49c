"""The real pipeline: `dvc repro` in a temporary git repo on a tiny phantom data set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def tiny_params() -> dict:
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["phantom"].update(cbis_train_patients=24, cbis_test_patients=10, bcdr_patients=10,
                        image_height=256, image_width=160, mass_radius=[6.0, 14.0])
    p["prepare"].update(patch_size=32, margin=8, min_size=24, workers=1)
    p["pretrain"].update(train_patients=24, test_patients=6, epochs=1, warmup_epochs=0, batch_size=16)
    p["validate"]["min_class_fraction"] = 0.05
    p["train"].update(epochs=1, pretrain_epochs=1, epsilons=[1, "inf"], batch_size=16, physical_batch_size=16)
    p["evaluate"]["bootstrap"] = 10
    p["baseline"].update(epochs=2, batch_size=16, public_patches=16)
    p["gan"].update(epochs=1, width=4, checkpoint_every=1, sample_every=1)
    p["synthesize"]["n_per_class"] = 8
    p["synth_quality"].update(subsets=2, subset_size=8)
    p["tune"].update(epsilons=[6], n_trials=2, max_epochs=1, storage="sqlite:///optuna.db")
    p["promote"]["max_epsilon"] = 6.0
    p["audit"].update(epsilons=[1], models=2, epochs=1, real_records=16, canaries=16)
    return p


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


@pytest.fixture()
def project(tmp_path: Path) -> tuple[Path, dict]:
    """A copy of the tracked project in a fresh git repo, with tiny params."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    repo = tmp_path / "proj"
    for f in files:
        src = ROOT / f
        if src.is_file():
            dst = repo / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlflow.db",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    env.pop("MLFLOW_EXPERIMENT_NAME", None)
    _run(["git", "init", "-q"], repo, env)
    # DVC experiments commit through their own git backend: give the temp repo an identity.
    _run(["git", "config", "user.name", "mammodp-tests"], repo, env)
    _run(["git", "config", "user.email", "tests@mammodp.invalid"], repo, env)
    _run(["mammodp", "phantom", "--out", "data/raw"], repo, env)
    _run(["dvc", "commit", "--force", "--quiet", "data.dvc"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "init"], repo, env)
    return repo, env


def test_data_stages_repro_and_rerun_only_what_changed(project):
    repo, env = project
    _run(["dvc", "repro", "validate"], repo, env)
    for name in ("cbis", "bcdr"):
        assert (repo / "data/prepared" / name / "manifest.parquet").is_file()
        assert json.loads((repo / "reports/validation" / f"{name}.json").read_text())["success"] is True
    status = _run(["dvc", "status", "validate"], repo, env).stdout
    assert "up to date" in status
    # A validation-only change reruns validate, not the importers.
    res = _run(["dvc", "exp", "run", "-S", "validate.intensity_std_min=0.005", "validate"], repo, env)
    out = res.stdout + res.stderr
    assert "Running stage 'validate'" in out
    assert "Running stage 'prepare_cbis'" not in out
    # A patch-size change reruns the importers (and validation after them).
    res = _run(["dvc", "exp", "run", "-S", "prepare.patch_size=48", "validate"], repo, env)
    out = res.stdout + res.stderr
    assert "Running stage 'prepare_cbis'" in out and "Running stage 'validate'" in out


def test_whole_pipeline_and_gan_change_reruns_only_the_synthetic_pathway(project):
    repo, env = project
    # As `make repro` runs it: the stages served by one preloaded process (mammodp.preload).
    log = repo.parent / "preload.log"
    _run(["mammodp", "preload", "--log", str(log), "--", "dvc", "repro"], repo, env)
    served = log.read_text()
    assert "served ['train'" in served and "served ['evaluate'" in served and "declined" not in served
    summary = json.loads((repo / "reports/eval/summary.json").read_text())
    assert summary["n_runs"] == 5 * 2  # 4 regimes + the radiomics-linear baseline x {1, inf} x 1 seed
    assert summary["n_models"] == 4 * 2 + 1  # synth: one model, reported at both budgets
    for rec in summary["privacy_utility"]:
        if rec["epsilon"] != "inf" and rec["regime"] != "synth":
            assert float(rec["epsilon_spent"]) <= float(rec["epsilon"]) + 1e-9
    assert (repo / "plots/eval/figures/privacy_utility.png").is_file()
    assert json.loads((repo / "metrics/synthesis.json").read_text())
    promoted = json.loads((repo / "metrics/promote.json").read_text())
    assert promoted
    audit = json.loads((repo / "metrics/audit.json").read_text())
    assert audit["consistent"] == 1 and all(isinstance(v, (int, float)) for v in audit.values())
    # Every regime started from the public pretraining's weights (no private patient in them).
    assert (repo / "models/pretrain/model.pt").is_file()
    assert json.loads((repo / "metrics/pretrain.json").read_text())["train_records"] > 0
    assert "up to date" in _run(["dvc", "status"], repo, env).stdout

    # `dvc metrics show` is a table of numbers: every value of every metrics file is a number,
    # and no file holds more than ~60 of them.
    shown = json.loads(_run(["dvc", "metrics", "show", "--json"], repo, env).stdout)
    files = next(iter(shown.values()))["data"]
    assert any(f.startswith("metrics/eval/internal/") for f in files), sorted(files)
    assert "metrics/eval/internal/radiomics-linear.json" in files, sorted(files)  # the baseline, evaluated

    def leaves(node):
        return [x for v in node.values() for x in (leaves(v) if isinstance(v, dict) else [v])]

    for name, body in files.items():
        values = leaves(body["data"])
        assert values and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values), name
        assert len(values) <= 60, (name, len(values))
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "results"], repo, env)

    # A new budget leaves every existing cell up to date (only the new cells, evaluation and
    # what follows it change): not the shared public pretraining, not the synth model (the
    # shared synthetic pretraining), not the other budgets' fine-tunes.
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["epsilons"] = [1, 3, "inf"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = set(json.loads(_run(["dvc", "status", "--json"], repo, env).stdout))
    assert {"train_real@3", "train@synth-pretrain+dp-finetune-3", "train@real+synth-3",
            "train_baseline@3"} <= changed, changed
    assert not changed & {"train_real@1", "train_real@inf", "train_synth", "train@synth-pretrain+dp-finetune-1",
                          "train@synth-pretrain+dp-finetune-inf", "train@real+synth-inf",
                          "train_gan", "tune@6", "public_data", "pretrain", "features", "train_baseline@1",
                          "train_baseline@inf"}, changed
    _run(["git", "checkout", "params.yaml"], repo, env)

    res = _run(["dvc", "exp", "run", "-S", "gan.lr=0.0003"], repo, env)
    out = res.stdout + res.stderr
    for stage in ("train_gan", "synthesize", "synth_quality", "train_synth", "train@synth-pretrain+dp-finetune-1"):
        assert f"Running stage '{stage}'" in out, stage
    for stage in ("prepare_cbis", "prepare_bcdr", "validate", "train_real@1", "train_real@inf", "features",
                  "train_baseline@1"):
        assert f"Running stage '{stage}'" not in out, stage
    # The experiment carries its metrics (metrics files are committed, not git-ignored), so
    # `dvc exp show` compares numbers across experiments.
    exps = json.loads(_run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    experiment_rows = [e for base in exps for e in (base.get("experiments") or [])]
    assert experiment_rows, exps
    revs = [r for e in experiment_rows for r in e["revs"]]
    assert any(r["data"].get("metrics", {}).get("metrics/synthesis.json") for r in revs), revs[:1]
