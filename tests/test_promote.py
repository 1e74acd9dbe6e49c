"""`mammodp promote` against a real MLflow registry in a temporary SQLite store."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from mammodp.config import load_config
from mammodp.errors import DataError, PrivacyError
from mammodp.stages import promote

REPO = Path(__file__).resolve().parents[1]
NAME = "mammodp-classifier"


@pytest.fixture
def store(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A real tiny classifier saved with `save_classifier` (logged into each run that needs one)."""
    import torch

    from mammodp.models.swin import create_classifier
    from mammodp.inference import save_classifier

    torch.manual_seed(0)
    model = create_classifier("swin_micro", pretrained_weights=None, mode="full")
    meta = {"preset": "swin_micro", "mode": "full", "patch_size": 32, "margin": 4, "min_size": 16,
            "threshold": 0.5, "epsilon": 1.0}
    return save_classifier(model, meta, tmp_path_factory.mktemp("clf") / "clf")


def cfg(experiment: str, max_epsilon: float = 6.0):
    c = load_config(REPO / "params.yaml")
    return dataclasses.replace(c, experiment=experiment,
                               promote=dataclasses.replace(c.promote, model_name=NAME, max_epsilon=max_epsilon))


def train_run(experiment: str, eps: str, val: float, *, model_dir: Path | None = None, internal: float = 0.5,
              within: str = "true", drop_tags: tuple[str, ...] = (), regime: str = "real",
              total: str | None = None, synthetic_privacy: str = "none", extra_tags: dict | None = None) -> str:
    """A run tagged and logged like `mammodp train`'s (privacy tags, params, metrics, model)."""
    import mlflow

    from mammodp import tracking
    from mammodp.pyfunc_model import log_classifier

    if total is None:
        total = "inf" if eps == "inf" else f"{float(eps) * 0.97:g}"
    not_covered = total == "not_covered" or eps == "inf"
    tags = {"regime": regime, "epsilon": eps, "delta": "0.0001", "seed": "0", "privacy_unit": "patch",
            "synthetic_privacy": synthetic_privacy, "within_budget": within, "epsilon_total": total,
            "epsilon_total_method": "none" if not_covered else "prv",
            "private_data_without_dp": str(not_covered).lower(), **(extra_tags or {})}
    for t in drop_tags:
        tags.pop(t)
    with tracking.start_run(experiment, "train", name=f"train/{regime}/eps={eps}", tags=tags,
                            params={"accountant": "rdp", "noise_multiplier": 1.1, "sample_rate": 0.1,
                                    "steps": 40, "max_grad_norm": 1.0, "delta": 1e-4}) as run:
        tracking.log_metrics({"best_val_auprc": val, "final_val_auprc": val - 0.01,
                              "internal_auprc": internal, "external_auprc": internal - 0.1})
        if eps != "inf":
            mlflow.log_metric("epsilon", float(eps) * 0.97, step=4)
        if model_dir is not None:
            log_classifier(model_dir, np.full((32, 32), 0.5, np.float32))
        return run.info.run_id


def registry_state() -> dict:
    """Everything a promotion could change: versions (tags, timestamps) and aliases."""
    from mlflow import MlflowClient

    client = MlflowClient()
    rm = client.get_registered_model(NAME)
    versions = sorted(client.search_model_versions(f"name = '{NAME}'"), key=lambda v: int(v.version))
    return {
        "aliases": dict(rm.aliases), "updated": rm.last_updated_timestamp, "description": rm.description,
        "versions": [(v.version, v.run_id, dict(v.tags), v.last_updated_timestamp) for v in versions],
    }


def test_aliases_follow_validation_and_second_promotion_changes_nothing(store, model_dir):
    import mlflow

    exp = "test-promote"
    # eps=1: the better TEST run has the worse validation AUPRC: test must not decide.
    train_run(exp, "1", 0.60, internal=0.95)
    best1 = train_run(exp, "1", 0.70, internal=0.40, model_dir=model_dir)
    best6 = train_run(exp, "6", 0.80, model_dir=model_dir, regime="real+synth")
    best_inf = train_run(exp, "inf", 0.95, model_dir=model_dir)
    overspent = train_run(exp, "6", 0.99, within="false", total="7.2", model_dir=model_dir)

    report = store / "reports" / "promote.json"
    record = promote.run(cfg(exp), out=store / "metrics" / "promote.json", report=report)

    client = mlflow.MlflowClient()
    by_alias = {a: client.get_model_version_by_alias(NAME, a) for a in ("eps-1", "eps-6", "eps-inf", "champion")}
    assert by_alias["eps-1"].run_id == best1
    assert by_alias["eps-6"].run_id == best6
    assert by_alias["eps-inf"].run_id == best_inf
    # Champion: best validation among budgets <= 6 (the non-private run is better but excluded).
    assert by_alias["champion"].run_id == best6
    tags = by_alias["eps-6"].tags
    assert tags["epsilon"] == "6" and tags["delta"] == "0.0001" and tags["accountant"] == "rdp"
    assert tags["privacy_unit"] == "patch" and tags["regime"] == "real+synth"
    assert tags["synthetic_privacy"] == "none" and tags["source_run_id"] == best6
    assert tags["val_auprc"] == "0.8" and tags["internal_auprc"] == "0.5" and tags["external_auprc"] == "0.4"
    assert float(tags["epsilon_spent"]) == pytest.approx(5.82)
    assert record["champion"]["run_id"] == best6
    # Over its budget end to end: never a budget's alias, but the best outside every budget.
    assert client.get_model_version_by_alias(NAME, "best-not-private").run_id == overspent
    assert [r["reason"] for r in record["not_eligible"]] == ["epsilon_total 7.2 exceeds the budget 6"]
    assert json.loads(report.read_text()) == json.loads(json.dumps(record))
    numbers = json.loads((store / "metrics" / "promote.json").read_text())
    assert all(isinstance(v, (int, float)) for v in numbers.values())  # a DVC metric: numbers only
    assert numbers["eps-6/epsilon_total"] == pytest.approx(5.82) and numbers["champion/version"] > 0
    assert "epsilon_total 5.82" in by_alias["eps-6"].description and "DP-SGD" in by_alias["eps-6"].description

    before = registry_state()
    n_runs = len(mlflow.search_runs(experiment_names=[exp]))
    again = promote.run(cfg(exp), out=store / "metrics" / "promote.json", report=report)
    assert registry_state() == before
    assert len(mlflow.search_runs(experiment_names=[exp])) == n_runs  # no audit run for a no-op
    assert again == record
    assert len(before["versions"]) == 4


def test_run_without_privacy_record_is_refused(store):
    from typer.testing import CliRunner

    from mammodp.cli import app

    exp = "test-promote-refuse"
    train_run(exp, "1", 0.7)
    bad = train_run(exp, "6", 0.9, drop_tags=("delta", "privacy_unit"))
    with pytest.raises(PrivacyError) as err:
        promote.run(cfg(exp), out=store / "promote.json")
    assert bad in str(err.value) and "delta, privacy_unit" in str(err.value)

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["model"].update(pretrained_weights=None, mode="full")  # no pretrain stage here: random init, all trained
    raw["experiment"] = exp
    (store / "params.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["promote", "--all-runs", "--out", str(store / "promote.json")])
    assert result.exit_code == 1
    assert bad in result.output and "lacks its privacy record" in result.output
    assert not (store / "promote.json").exists()


def test_a_not_covered_run_never_gets_a_budget_alias_or_champion(store, model_dir):
    """The mislabel of issue 10: a synthetic run from a non-DP generator had the best AUPRC."""
    from mlflow import MlflowClient

    exp = "test-promote-coverage"
    mislabel = train_run(exp, "1", 0.99, model_dir=model_dir, regime="synth-pretrain+dp-finetune",
                         total="not_covered", synthetic_privacy="not_covered")
    covered = train_run(exp, "1", 0.60, model_dir=model_dir)
    legacy = train_run(exp, "6", 0.95, model_dir=model_dir, drop_tags=("epsilon_total",))  # before epsilon_total
    covered6 = train_run(exp, "6", 0.70, model_dir=model_dir, regime="real+synth", total="5.5",
                         synthetic_privacy="dp(eps=3)",
                         extra_tags={"tuning_statement": "2 trial(s) trained with DP-SGD ... (2 x 6, 2 x 0.0001)"})
    promote.run(cfg(exp, max_epsilon=60.0), out=store / "p.json", report=store / "r.json")
    client = MlflowClient()
    # Someone pointed eps-1 at the mislabelled version and left a stale eps-12: promotion repairs both.
    bad = client.search_model_versions(f"name = '{NAME}' and run_id = '{mislabel}'")[0].version
    client.set_registered_model_alias(NAME, "eps-1", bad)
    client.set_registered_model_alias(NAME, "eps-12", bad)
    record = promote.run(cfg(exp, max_epsilon=60.0), out=store / "p.json", report=store / "r.json")

    aliases = client.get_registered_model(NAME).aliases
    assert "eps-12" not in aliases
    assert client.get_model_version_by_alias(NAME, "eps-1").run_id == covered
    assert client.get_model_version_by_alias(NAME, "eps-6").run_id == covered6
    assert client.get_model_version_by_alias(NAME, "champion").run_id == covered6
    assert client.get_model_version_by_alias(NAME, "best-not-private").run_id == mislabel
    for alias in aliases:
        tags = client.get_model_version_by_alias(NAME, alias).tags
        if alias in ("best-not-private", "eps-inf"):
            continue
        # Every finite-budget alias: covered end to end, within its budget.
        budget = 60.0 if alias == "champion" else float(alias.removeprefix("eps-").replace("_", "."))
        assert float(tags["epsilon_total"]) <= min(budget, float(tags["epsilon"])) + 1e-9
        assert tags["synthetic_privacy"] != "not_covered" and tags["private_data_without_dp"] == "false"
        assert tags["within_budget"] == "true"
    reasons = {r["run_id"]: r["reason"] for r in record["not_eligible"]}
    assert "not covered end to end" in reasons[mislabel] and "no epsilon_total" in reasons[legacy]
    v6 = client.get_model_version_by_alias(NAME, "eps-6")
    assert v6.tags["tuning_statement"].startswith("2 trial(s)") and "Tuning: 2 trial(s)" in v6.description
    assert "DP generator" in v6.description
    bnp = client.get_model_version_by_alias(NAME, "best-not-private")
    assert "no epsilon covers it" in bnp.description
    assert "END-TO-END" in client.get_registered_model(NAME).description


def test_alias_names_are_valid_registry_aliases():
    assert promote.alias_for(1.0) == "eps-1"
    assert promote.alias_for(0.5) == "eps-0_5"
    assert promote.alias_for(float("inf")) == "eps-inf"
    assert promote.alias_for(2e6) == "eps-2e_06"


def test_a_budget_independent_synth_model_competes_at_every_budget_it_fits(store, model_dir):
    """The synth regime is one model for every budget: with a DP generator its end-to-end epsilon
    is the generator's, so it may hold any budget's alias that epsilon fits, and no smaller one."""
    from mlflow import MlflowClient

    exp = "test-promote-once"
    dp_synth = train_run(exp, "inf", 0.90, model_dir=model_dir, regime="synth", total="3",
                         synthetic_privacy="dp(eps=3)",
                         extra_tags={"budget_independent": "true", "private_data_without_dp": "false",
                                     "epsilon_total_method": "rdp"})
    plain_synth = train_run(exp, "inf", 0.95, model_dir=model_dir, regime="synth", total="not_covered",
                            synthetic_privacy="not_covered", extra_tags={"budget_independent": "true"})
    real1 = train_run(exp, "1", 0.60, model_dir=model_dir)
    train_run(exp, "6", 0.70, model_dir=model_dir)
    promote.run(cfg(exp, max_epsilon=60.0), out=store / "p.json", report=store / "r.json")
    client = MlflowClient()
    by_alias = {a: client.get_model_version_by_alias(NAME, a).run_id for a in client.get_registered_model(NAME).aliases}
    assert by_alias["eps-1"] == real1  # 3 > 1: the DP-generator synth model does not fit eps 1
    assert by_alias["eps-6"] == dp_synth  # 3 <= 6 and the best validation AUPRC there
    assert by_alias["eps-inf"] == plain_synth  # every model competes without a budget
    assert plain_synth not in {by_alias["eps-1"], by_alias["eps-6"], by_alias["champion"]}
    v6 = client.get_model_version_by_alias(NAME, "eps-6")
    assert float(v6.tags["epsilon_total"]) <= 6.0


def _params(experiment: str) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["model"].update(pretrained_weights=None, mode="full")  # no pretrain stage here
    raw["experiment"] = experiment
    raw["promote"].update(model_name=NAME, max_epsilon=6.0)
    return raw


def test_only_the_pipelines_current_models_compete(store, model_dir):
    """A run of an earlier pipeline execution (still FINISHED, better validation) neither wins
    an alias over the current models nor keeps the one it held; `--all-runs` restores it."""
    import mlflow
    from typer.testing import CliRunner

    from mammodp.cli import app

    exp = "test-promote-scope"
    old = train_run(exp, "6", 0.90, model_dir=model_dir)  # earlier code/data: its folder was overwritten
    out, report = store / "metrics" / "promote.json", store / "reports" / "promote.json"
    assert promote.run(cfg(exp), out=out, report=report)["aliases"]["eps-6"]["run_id"] == old
    current = train_run(exp, "6", 0.70, model_dir=model_dir)
    models = store / "models" / "classifier"
    (models / "real-6" / "seed=0").mkdir(parents=True)
    (models / "real-6" / "seed=0" / "meta.json").write_text(json.dumps({"run_id": current}))

    record = promote.run(cfg(exp), out=out, report=report, models=models)
    client = mlflow.MlflowClient()
    assert client.get_model_version_by_alias(NAME, "eps-6").run_id == current
    assert client.get_model_version_by_alias(NAME, "champion").run_id == current
    assert record["candidates"] == 1 and json.loads(out.read_text())["other_runs"] == 1
    assert "1 other finished train run(s)" in record["scope"]

    # The CLI defaults to models/classifier (here: the store's folder, the working directory).
    (store / "params.yaml").write_text(yaml.safe_dump(_params(exp)))
    res = CliRunner().invoke(app, ["promote", "--params", str(store / "params.yaml"), "--all-runs"])
    assert res.exit_code == 0, res.output
    assert client.get_model_version_by_alias(NAME, "eps-6").run_id == old
    res = CliRunner().invoke(app, ["promote", "--params", str(store / "params.yaml")])
    assert res.exit_code == 0, res.output
    assert client.get_model_version_by_alias(NAME, "eps-6").run_id == current

    empty = store / "nothing"
    empty.mkdir()
    with pytest.raises(DataError, match="no trained classifiers to promote"):
        promote.run(cfg(exp), out=out, report=report, models=empty)
