"""The classifier training stage on a small phantom: tracking names, budgets, resume, utility."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from mammodp.config import load_config
from mammodp.data.datasets import PatchTable
from mammodp.metrics.classification import classification_metrics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder with a small easy phantom, prepared (cbis + bcdr), and its params."""
    from mammodp.stages import phantom, prepare

    root = tmp_path_factory.mktemp("proj")
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["model"].update(pretrained_weights=None, mode="full")  # no pretrain stage here: random init, all trained
    p["phantom"].update(cbis_train_patients=90, cbis_test_patients=30, bcdr_patients=10, image_height=256,
                        image_width=160, mass_radius=[7.0, 14.0], difficulty=0.0)
    p["prepare"].update(patch_size=32, margin=8, min_size=24, workers=1)
    p["data"].update(raw_dir=str(root / "raw"), cbis_dir=str(root / "raw/cbis-ddsm"), bcdr_dir=str(root / "raw/bcdr"),
                     prepared_dir=str(root / "prepared"), synthetic_dir=str(root / "synthetic"))
    p["train"].update(epochs=12, batch_size=32, physical_batch_size=64, lr=2e-3, epsilons=[1, "inf"])
    p["experiment"] = "test-train"
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    cfg = load_config(root / "params.yaml")
    phantom.run(cfg, out=root / "raw")
    prepare.run(cfg, source="cbis-ddsm", root=root / "raw/cbis-ddsm", out=root / "prepared/cbis")
    prepare.run(cfg, source="bcdr", root=root / "raw/bcdr", out=root / "prepared/bcdr")
    return root


@pytest.fixture()
def env(project, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project}/mlflow.db")
    return load_config(project / "params.yaml")




def test_nonprivate_and_private_runs_track_the_stable_names(env, project):
    import mlflow

    from mammodp.stages import train

    s_inf = train.run(env, regime="real", epsilon=math.inf, out=project / "m/real-inf",
                      metrics_out=project / "metrics/real-inf.json", report_out=project / "reports/real-inf.json")
    s_dp = train.run(env, regime="real", epsilon=1.0, out=project / "m/real-1",
                     metrics_out=project / "metrics/real-1.json", report_out=project / "reports/real-1.json")

    # Metrics files hold numbers only (same columns per cell); the prose is in the report.
    for name in ("real-inf", "real-1"):
        numbers = json.loads((project / f"metrics/{name}.json").read_text())
        assert numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers.values())
        assert "privacy_note" in json.loads((project / f"reports/{name}.json").read_text())
    assert json.loads((project / "metrics/real-1.json").read_text())["private"] == 1
    assert "epsilon" not in json.loads((project / "metrics/real-inf.json").read_text())

    # Lineage: the run's dataset inputs name its manifests, with digests; the experiment opens
    # in MLflow's model-training view; adding a budget would keep the same grid parent.
    run_dp = mlflow.get_run(s_dp["runs"][0]["run_id"])
    inputs = {(d.dataset.name, d.tags[0].value if d.tags else None): d.dataset for d in run_dp.inputs.dataset_inputs}
    names = {n for n, _ in inputs}
    assert {"cbis-train", "cbis-val"} <= names, names
    for ds in inputs.values():
        assert ds.digest and "manifest.parquet" in ds.source and not ds.source.startswith(str(project))
    exp = mlflow.get_experiment_by_name(env.experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    more = dataclasses.replace(env, train=dataclasses.replace(env.train, epsilons=(1.0, 3.0, math.inf)))
    assert train.grid_parent_run(more) == run_dp.data.tags["mlflow.parentRunId"]

    # DP run: epsilon spent at most the target, from the accountant over Poisson sampling.
    assert 0 < s_dp["epsilon_spent_max"] <= 1.0 + 1e-9
    run = mlflow.get_run(s_dp["runs"][0]["run_id"])
    tags, params = run.data.tags, run.data.params
    assert tags["stage"] == "train" and tags["regime"] == "real" and tags["epsilon"] == "1" and tags["seed"] == "0"
    assert tags["mlflow.parentRunId"]
    for key in ("noise_multiplier", "sample_rate", "steps", "delta", "max_grad_norm", "accountant", "privacy_unit"):
        assert key in params, key
    assert float(params["noise_multiplier"]) > 0 and 0 < float(params["sample_rate"]) < 1
    history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "epsilon")
    assert len(history) >= env.train.epochs
    assert max(h.value for h in history) <= 1.0 + 1e-9
    assert history[-1].value == pytest.approx(s_dp["epsilon_spent_max"])
    assert tags["within_budget"] == "true"

    # Non-private run: flagged as touching private data without DP; epsilon tag inf.
    run_inf = mlflow.get_run(s_inf["runs"][0]["run_id"])
    assert run_inf.data.tags["epsilon"] == "inf"
    assert run_inf.data.tags["private_data_without_dp"] == "true"
    assert "val_auprc" in run_inf.data.metrics and "train_loss" in run_inf.data.metrics

    # The saved model scores the internal test set well above chance (non-private smoke run).
    from mammodp.inference import load_classifier, predict_proba

    model, meta = load_classifier(project / "m/real-inf/seed=0")
    test = PatchTable.load(project / "prepared/cbis/manifest.parquet", ["test"])
    auroc = classification_metrics(test.labels, predict_proba(model, test.images))["auroc"]
    assert auroc > 0.6, auroc
    assert float(meta["epsilon"]) == math.inf and json.loads((project / "reports/real-1.json").read_text())["runs"]


def test_resume_after_a_kill_ends_with_the_same_epsilon(env, project):
    from mammodp.models.swin import create_classifier
    from mammodp.stages.train import fit_spec
    from mammodp.training import fit

    cbis = project / "prepared/cbis/manifest.parquet"
    tr, va = PatchTable.load(cbis, ["train"]), PatchTable.load(cbis, ["val"])
    spec = dataclasses.replace(fit_spec(env, 2.0, 0), epochs=4)

    torch.manual_seed(0)
    full = fit(create_classifier("swin_micro"), spec, private=tr, public=None, val=va, device="cpu", progress=False)

    class Killed(Exception):
        pass

    def kill_after_two(rec):
        if rec["epoch"] == 1:
            raise Killed

    ck = project / "resume.pt"
    torch.manual_seed(0)
    with pytest.raises(Killed):
        fit(create_classifier("swin_micro"), spec, private=tr, public=None, val=va, device="cpu",
            checkpoint=ck, on_epoch=kill_after_two, progress=False)
    resumed = fit(create_classifier("swin_micro"), spec, private=tr, public=None, val=va, device="cpu",
                  checkpoint=ck, resume=True, progress=False)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert resumed.privacy["steps"] == full.privacy["steps"]
    assert resumed.privacy["epsilon"] == pytest.approx(full.privacy["epsilon"], rel=1e-9)
    assert [h["epsilon"] for h in resumed.history] == pytest.approx([h["epsilon"] for h in full.history])
    assert full.privacy["epsilon"] <= 2.0 + 1e-9


def test_synthetic_records_are_never_private_records(env, project):
    """real+synth: the accountant's record count and sample rate see only the real patches."""
    from mammodp.models.swin import create_classifier
    from mammodp.stages.train import fit_spec
    from mammodp.training import fit

    cbis = project / "prepared/cbis/manifest.parquet"
    tr, va = PatchTable.load(cbis, ["train"]), PatchTable.load(cbis, ["val"])
    synth = PatchTable.load(cbis, ["test"])  # stands in for a synthetic set (public here)
    spec = dataclasses.replace(fit_spec(env, 6.0, 0), epochs=1, synth_ratio=1.0)
    res = fit(create_classifier("swin_micro"), spec, private=tr, public=synth, val=va, device="cpu", progress=False)
    assert res.privacy["n_records"] == len(tr)
    assert res.privacy["sample_rate"] == pytest.approx(spec.batch_size / len(tr))
    assert res.privacy["epsilon"] <= 6.0 + 1e-9


def test_unknown_regime_and_missing_synthetic_set_are_clear_errors(env, project):
    from mammodp.errors import ConfigError, DataError
    from mammodp.stages import train

    with pytest.raises(ConfigError, match="regime"):
        train.run(env, regime="federated", epsilon=1.0)
    with pytest.raises(DataError, match="manifest"):
        train.run(env, regime="synth", epsilon=None, out=project / "m/x", metrics_out=project / "metrics/x.json")
    assert not (project / "m/x").exists()
    with pytest.raises(ConfigError, match="once"):  # synth takes no budget
        train.run(env, regime="synth", epsilon=1.0, out=project / "m/x")
    with pytest.raises(ConfigError, match="budget"):
        train.run(env, regime="real", epsilon=None, out=project / "m/x")


def _stand_in_synthetic_set(project: Path, generator_run_id: str) -> None:
    """A synthetic set (the synthesize stage's manifest layout) made of the CBIS test patches."""
    import shutil

    import pandas as pd

    src, dst = project / "prepared/cbis", project / "synthetic"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    df = pd.read_parquet(dst / "manifest.parquet")
    df = df[df["split"] == "test"].copy()
    df["split"], df["source"] = "train", "synthetic"
    df["generator_run_id"], df["generator_epsilon"] = generator_run_id, "non-private"
    df.to_parquet(dst / "manifest.parquet", index=False)


def test_synth_is_one_model_for_every_budget_and_each_finetune_starts_from_it(env, project):
    """`synth` is trained once (no budget); `synth-pretrain+dp-finetune` fine-tunes exactly its
    weights (no pretraining of its own), names it in its lineage, and refuses a stale one."""
    import mlflow

    from mammodp.errors import DataError
    from mammodp.stages import train

    _stand_in_synthetic_set(project, "gen-a")
    cfg = dataclasses.replace(env, train=dataclasses.replace(env.train, pretrain_epochs=2, epochs=1))
    with pytest.raises(DataError, match="synth model"):  # no synth model yet: refused before training
        train.run(cfg, regime="synth-pretrain+dp-finetune", epsilon=1.0, out=project / "m/ft-1",
                   synth_model=project / "m/synth")
    assert not (project / "m/ft-1").exists()

    s = train.run(cfg, regime="synth", epsilon=None, out=project / "m/synth",
                  metrics_out=project / "metrics/synth.json", report_out=project / "reports/synth.json")
    assert s["budget_independent"] and math.isinf(s["epsilon_target"])
    assert len(s["runs"][0]["run_id"]) and s["runs"][0]["steps"] > 0
    synth_run = mlflow.get_run(s["runs"][0]["run_id"])
    assert synth_run.data.tags["budget_independent"] == "true"
    assert synth_run.data.params["train.pretrain_epochs"] == "2" and "train.epochs" not in synth_run.data.params
    synth_w = torch.load(project / "m/synth/seed=0/weights.pt", weights_only=True)

    # lr 0: the fine-tune (DP at eps 1, one epoch) cannot move the weights, so what it saves is
    # what it started from: the synth model, bit for bit.
    frozen = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.0))
    ft = train.run(frozen, regime="synth-pretrain+dp-finetune", epsilon=1.0, out=project / "m/ft-1",
                   metrics_out=project / "metrics/ft-1.json", report_out=project / "reports/ft-1.json",
                   synth_model=project / "m/synth")
    ft_w = torch.load(project / "m/ft-1/seed=0/weights.pt", weights_only=True)
    assert set(ft_w) == set(synth_w) and all(torch.equal(ft_w[k], synth_w[k]) for k in synth_w)
    run = mlflow.get_run(ft["runs"][0]["run_id"])
    assert run.data.tags["init_run_id"] == synth_run.info.run_id
    assert "pretrain_val_auprc" not in run.data.metrics  # no synthetic pretraining inside the cell
    assert 0 < ft["runs"][0]["epsilon"] <= 1.0 + 1e-9

    # A new synthetic set (another generator run) makes the synth model stale: refused.
    _stand_in_synthetic_set(project, "gen-b")
    with pytest.raises(DataError, match="retrain it"):
        train.run(cfg, regime="synth-pretrain+dp-finetune", epsilon=6.0, out=project / "m/ft-6",
                  synth_model=project / "m/synth")
    import shutil

    shutil.rmtree(project / "synthetic")
