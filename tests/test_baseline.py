"""The radiomics-linear baseline: deterministic features, DP through the one engine with the Swin
runs' settings and accountant, standardisation from public data only, evaluated like every regime."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from mammodp.config import load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A small easy phantom, prepared (cbis + bcdr), with its radiomics features extracted."""
    from mammodp.stages import features, phantom, prepare

    root = tmp_path_factory.mktemp("baseline")
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["phantom"].update(cbis_train_patients=50, cbis_test_patients=16, bcdr_patients=8, image_height=256,
                        image_width=160, mass_radius=[7.0, 14.0], difficulty=0.0)
    p["prepare"].update(patch_size=32, margin=8, min_size=24, workers=1)
    p["data"].update(raw_dir=str(root / "raw"), cbis_dir=str(root / "raw/cbis-ddsm"), bcdr_dir=str(root / "raw/bcdr"),
                     prepared_dir=str(root / "prepared"), synthetic_dir=str(root / "synthetic"))
    p["train"].update(epsilons=[1, "inf"], seeds=[0])
    p["model"].update(pretrained_weights=None, mode="full")  # no pretrain stage here
    p["pretrain"].update(train_patients=16, test_patients=4)  # the public set: its own seed and patients
    p["baseline"].update(epochs=6, batch_size=16, scaler_source="public", public_patches=32)
    p["evaluate"].update(bootstrap=20)
    p["experiment"] = "test-baseline"
    (root / "params.yaml").write_text(yaml.safe_dump(p))
    cfg = load_config(root / "params.yaml")
    phantom.run(cfg, out=root / "raw")
    prepare.run(cfg, source="cbis-ddsm", root=root / "raw/cbis-ddsm", out=root / "prepared/cbis")
    prepare.run(cfg, source="bcdr", root=root / "raw/bcdr", out=root / "prepared/bcdr")
    phantom.run_public(cfg, out=root / "public")
    t0 = time.perf_counter()
    numbers = features.run(cfg, out=root / "features", metrics_out=root / "metrics/features.json",
                           public=root / "public")
    print(f"features: {numbers} in {time.perf_counter() - t0:.1f} s")
    return root


@pytest.fixture()
def env(project, monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project}/mlflow.db")
    return load_config(project / "params.yaml")


def _train(env, project, eps, tag="", features=None):
    from mammodp.config import format_epsilon
    from mammodp.stages import train_baseline

    name = f"radiomics-linear-{format_epsilon(eps)}{tag}"
    return train_baseline.run(env, epsilon=eps, out=project / "models/baseline" / name,
                              metrics_out=project / f"metrics/{name}.json", report_out=project / f"reports/{name}.json",
                              features=features or project / "features")


# --------------------------------------------------------------------------- features


def test_features_are_deterministic_and_per_patch(project):
    """Same patches -> bit-identical features, whatever the order or company of the patches;
    and the stage's cached table equals a fresh extraction."""
    from mammodp.baseline import feature_columns, lesion_mask, radiomics_features
    from mammodp.data.datasets import PatchTable

    cfg = load_config(project / "params.yaml")
    table = PatchTable.load(project / "prepared/cbis/manifest.parquet", splits=["test"])
    imgs = table.images[:6]
    a, names = radiomics_features(imgs, cfg.baseline.features, cfg.baseline.bin_count)
    b, names_b = radiomics_features(imgs[::-1].copy(), cfg.baseline.features, cfg.baseline.bin_count)
    c, _ = radiomics_features(imgs[2:3], cfg.baseline.features, cfg.baseline.bin_count)
    assert names == names_b and len(names) == a.shape[1] > 50
    assert np.array_equal(a, b[::-1]) and np.array_equal(a[2:3], c)
    # Shared among processes (baseline.workers): the same rows, in order.
    d, names_d = radiomics_features(imgs, cfg.baseline.features, cfg.baseline.bin_count, workers=2)
    assert names_d == names and np.array_equal(d, a)
    assert np.isfinite(a).all()
    assert any("shape2D" in n for n in names) and any("glcm" in n for n in names)
    # The shape features see a real lesion mask: masses of different sizes give different areas.
    area = a[:, names.index("original_shape2D_PixelSurface")]
    assert np.unique(area).size > 1
    assert all(0 < lesion_mask(im[0]).sum() < im[0].size for im in imgs)

    cached = pd.read_parquet(project / "features/cbis.parquet")
    rows = cached.set_index("sample_id").loc[table.frame["sample_id"].astype(str)[:6]]
    assert np.array_equal(rows[feature_columns(cached)].to_numpy(np.float64), a)
    numbers = json.loads((project / "metrics/features.json").read_text())
    assert all(isinstance(v, (int, float)) for v in numbers.values()) and numbers["seconds_per_patch"] > 0


# --------------------------------------------------------------------------- privacy


def test_dp_variant_goes_through_make_private_with_the_swin_settings(env, project, monkeypatch):
    """The DP cell calls the one `make_private` with the private training records, the target
    epsilon and the Swin runs' dp.* settings; its recorded epsilon is what an independent Opacus
    accountant gives for the recorded (sigma, q, steps); its record has the Swin runs' schema."""
    import mammodp.privacy.engine as engine
    from mammodp.data.datasets import PatchTable
    from mammodp.stages import train as swin_train
    from mammodp.training import privacy_record

    calls = []
    real = engine.make_private

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "make_private", spy)
    summary = _train(env, project, 1.0)
    private_calls = [c for c in calls if math.isfinite(c["target_epsilon"])]
    assert len(private_calls) == 1
    call = private_calls[0]
    train = PatchTable.load(project / "prepared/cbis/manifest.parquet", splits=["train"])
    assert np.array_equal(np.asarray(call["record_ids"]), train.record_ids(env.dp.privacy_unit))
    assert call["target_epsilon"] == 1.0
    swin = swin_train.fit_spec(env, 1.0, 0)  # what a Swin `real` cell at eps 1 hands the engine
    for key in ("delta", "max_grad_norm", "accountant", "privacy_unit", "per_sample_method", "grad_chunk"):
        assert call[key] == getattr(swin, key), key
    assert call["expected_batch_size"] == env.baseline.batch_size

    # The saved model's privacy record: accounted by the Swin runs' accountant, within budget.
    from mammodp.baseline import load_baseline
    from mammodp.privacy.accountant import make_accountant

    model, meta = load_baseline(project / "models/baseline/radiomics-linear-1/seed=0")
    rec = meta["privacy"]
    assert rec["private"] and rec["trained_on_private"] and rec["steps"] > 0
    assert rec["accountant_requested"] == env.dp.accountant
    acc = make_accountant(rec["accountant"])
    for _ in range(rec["steps"]):
        acc.step(noise_multiplier=rec["noise_multiplier"], sample_rate=rec["sample_rate"])
    assert acc.epsilon(env.dp.delta) == pytest.approx(rec["epsilon"], rel=1e-6)
    assert 0 < rec["epsilon"] <= 1.0 + 1e-9 and summary["runs"][0]["within_budget"]
    assert rec["sample_rate"] == pytest.approx(env.baseline.batch_size / len(train))
    # Same schema as every run's record (training.privacy_record over the engine's summary).
    lin = torch.nn.Linear(2, 2)
    probe = real(lin, torch.optim.SGD(lin.parameters(), lr=0.1), record_ids=np.arange(4), expected_batch_size=2,
                 target_epsilon=1.0, delta=1e-4, epochs=1, max_grad_norm=1.0)
    assert set(rec) == set(privacy_record(probe, train))
    # The stored DP model is the logistic form (class-0 row zero), like the non-private one.
    assert torch.count_nonzero(model.linear.weight[0]) == 0 and float(model.linear.bias[0]) == 0.0


def test_standardisation_uses_public_statistics_only(env, project, tmp_path):
    """The scaler equals the public set's statistics, does not move when the private training
    features change, and private or synthetic rows as its source are refused."""
    from mammodp.baseline import check_public, feature_columns, load_baseline
    from mammodp.errors import PrivacyError
    from mammodp.stages import train_baseline

    _train(env, project, math.inf)
    model, meta = load_baseline(project / "models/baseline/radiomics-linear-inf/seed=0")
    cbis = pd.read_parquet(project / "features/cbis.parquet")
    cols = feature_columns(cbis)
    public_table = pd.read_parquet(project / "features/public.parquet")
    assert len(public_table) == env.baseline.public_patches
    assert not set(public_table["patient_id"]) & set(cbis["patient_id"])  # disjoint patients
    public = public_table[cols].to_numpy(np.float64)
    std = public.std(0)
    std = np.where(std > 1e-12, std, 1.0)
    assert np.allclose(model.mean.numpy(), public.mean(0), rtol=1e-6, atol=1e-6)
    assert np.allclose(model.std.numpy(), std, rtol=1e-6, atol=1e-6)
    assert "PUBLIC" in meta["scaler_statistics"] and meta["scaler_source"] == "public"

    # Perturb every private (train + val) feature: the model changes, its scaler must not.
    moved = cbis.copy()
    private = moved["split"].isin(["train", "val"])
    rng = np.random.default_rng(0)
    moved.loc[private, cols] = moved.loc[private, cols].to_numpy() * 3.0 + rng.normal(0, 5, (int(private.sum()), len(cols)))
    feats = tmp_path / "features"
    feats.mkdir()
    moved.to_parquet(feats / "cbis.parquet", index=False)
    for name in ("bcdr", "public"):
        (feats / f"{name}.parquet").write_bytes((project / f"features/{name}.parquet").read_bytes())
    _train(env, project, math.inf, tag="-moved", features=feats)
    model2, _ = load_baseline(project / "models/baseline/radiomics-linear-inf-moved/seed=0")
    assert torch.equal(model2.mean, model.mean) and torch.equal(model2.std, model.std)
    assert not torch.equal(model2.linear.weight, model.linear.weight)  # the private data did reach the fit

    # A private source is refused, naming the setting.
    train_rows = cbis[cbis["split"] == "train"]
    with pytest.raises(PrivacyError, match="scaler_source"):
        check_public(train_rows, train_rows, "cbis-train")
    with pytest.raises(PrivacyError, match="synthetic"):
        check_public(train_rows.assign(split="test", source="synthetic", patient_id="x", sample_id="y"),
                     train_rows, "synthetic")
    with pytest.raises(PrivacyError, match="patient"):  # a "public" set that shares a private patient
        check_public(train_rows.head(3).assign(split="test", sample_id=["a", "b", "c"]), train_rows, "leaky")
    # and through the stage: a "public" set that holds private patches fails before any training.
    pd.concat([public_table, cbis[cbis["split"] == "train"].head(2)]).to_parquet(feats / "public.parquet", index=False)
    with pytest.raises(PrivacyError, match="shares"):
        train_baseline.public_scaler(env, feats, cbis[cbis["split"].isin(["train", "val"])])
    # The plan without a public set takes the label-free CBIS test split, and nothing private.
    import dataclasses

    other = dataclasses.replace(env, baseline=dataclasses.replace(env.baseline, scaler_source="cbis-test"))
    scaler = train_baseline.public_scaler(other, project / "features", cbis[cbis["split"].isin(["train", "val"])])
    test_rows = cbis[cbis["split"] == "test"][cols].to_numpy(np.float64)
    assert scaler.n == len(test_rows) and np.allclose(scaler.mean, test_rows.mean(0))


# --------------------------------------------------------------------------- tracking, evaluation, promotion


def test_baseline_is_tracked_evaluated_and_skipped_by_promotion(env, project, runs_in):
    """Both budgets are MLflow train runs with the privacy tags; the non-private baseline beats
    chance on the easy phantom; evaluation rows and metrics files include the regime."""
    import mlflow

    from mammodp.stages import evaluate, promote

    s_inf = _train(env, project, math.inf)
    s_dp = _train(env, project, 1.0)
    run = mlflow.get_run(s_dp["runs"][0]["run_id"])
    tags = run.data.tags
    assert tags["stage"] == "train" and tags["regime"] == "radiomics-linear" and tags["epsilon"] == "1"
    assert tags["within_budget"] == "true" and tags["private_data_without_dp"] == "false"
    assert float(tags["epsilon_total"]) <= 1.0 and "PUBLIC" in tags["scaler_statistics"]
    assert run.data.params["accountant"] in ("prv", "rdp")
    assert mlflow.get_run(s_inf["runs"][0]["run_id"]).data.tags["private_data_without_dp"] == "true"
    assert s_inf["val_auprc_mean"] > 0.8, s_inf

    # `mammodp evaluate` over a grid of `real` (one quick Swin epoch per budget) and the baseline:
    # the baseline gets rows, metrics files and plot points like the Swin regime.
    import dataclasses

    from mammodp.stages import train as swin_train

    cfg = dataclasses.replace(env, train=dataclasses.replace(env.train, synthetic_regimes=(), synth_regime=False, epochs=1))
    for eps in (1.0, math.inf):
        swin_train.run(cfg, regime="real", epsilon=eps, out=project / f"models/classifier/real-{'inf' if math.isinf(eps) else '1'}",
                       metrics_out=project / "metrics/swin.json", report_out=project / "reports/swin.json")
    summary = evaluate.run(cfg, models=project / "models/classifier", out=project / "metrics/eval",
                           plots=project / "plots/eval", report=project / "reports/eval",
                           baselines=project / "models/baseline", features=project / "features")
    assert summary["n_runs"] == 4
    rows = [r for r in summary["privacy_utility"] if r["regime"] == "radiomics-linear"]
    assert {(str(r["epsilon"]), r["split"]) for r in rows} >= {("1.0", "internal"), ("inf", "internal"),
                                                              ("1.0", "external"), ("inf", "external")}
    for split in ("internal", "external"):
        cell = json.loads((project / f"metrics/eval/{split}/radiomics-linear.json").read_text())
        assert set(cell) == {"eps=1", "eps=inf"} and {"auroc", "auroc_lo", "auroc_hi"} <= set(cell["eps=inf"])
        print(f"radiomics-linear {split}: {cell}")
    assert json.loads((project / "metrics/eval/internal/radiomics-linear.json").read_text())["eps=inf"]["auroc"] > 0.75
    run_file = project / "reports/eval/runs/radiomics-linear-inf-seed=0.json"
    assert json.loads(run_file.read_text())["fairness"]  # subgroup metrics like every run
    assert "radiomics-linear" in set(pd.read_csv(project / "plots/eval/privacy_utility.csv")["regime"])

    # Promotion skips the baseline with its reason (no servable model), not an error.
    candidates, skipped, _ = promote.collect_candidates(env.experiment)
    assert not [c for c in candidates if c.tags.get("regime") == "radiomics-linear"]
    assert any("radiomics-linear" in s["reason"] for s in skipped)
