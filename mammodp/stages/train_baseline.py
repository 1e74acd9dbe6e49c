"""Stage `train_baseline`: one budget of the classical baseline `radiomics-linear`, over the seeds.

Reads the radiomics features of `mammodp features` (never the patches), standardises them
with statistics of the public set `baseline.scaler_source` (checked: no private record), and
trains a logistic regression:
- epsilon = inf: scikit-learn's L2 logistic regression (`baseline.C`);
- finite epsilon: DP-SGD on the same linear model through `mammodp.training.fit`, so through
  `make_private` with the Swin runs' `dp.*` settings (delta, clipping norm, accountant, privacy
  unit, per-sample route), Poisson sampling at `baseline.batch_size`, `baseline.epochs`.
Each seed is one MLflow run tagged like every train run (stage `train`, regime, epsilon,
delta, privacy record, `within_budget`, `epsilon_total`) plus `model_kind=radiomics-linear`
and `scaler_statistics` (which data the standardisation came from). Models are saved to
`out/seed=S/` (the `save_classifier` layout, meta `kind: radiomics-linear`) for `evaluate`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from mammodp.config import Config, flatten, format_epsilon
from mammodp.errors import ConfigError, DataError
from mammodp.io import atomic_dir, write_json

log = logging.getLogger(__name__)

PHYSICAL_BATCH = 4096  # feature rows per forward pass: tiny inputs, any value gives the same result

PRIVACY_NOTE = (
    "epsilon covers the real CBIS training patches used by DP-SGD (privacy unit as tagged), accounted "
    "over Poisson sampling at the recorded sample rate, steps and noise. Feature standardisation uses "
    "statistics of a PUBLIC set only (tag scaler_statistics), so it spends no budget. Not covered: the "
    "validation split read every epoch for model selection and the threshold; the per-epoch train_loss "
    "diagnostic. epsilon = inf: scikit-learn logistic regression on the private records without DP."
)


def read_features(cfg_features: Path, name: str) -> pd.DataFrame:
    p = Path(cfg_features) / f"{name}.parquet"
    if not p.is_file():
        raise DataError("feature table not found; run `mammodp features` first", path=p)
    return pd.read_parquet(p)


def public_scaler(cfg: Config, features_dir: Path, private: pd.DataFrame):
    """The Standardiser of `baseline.scaler_source`, checked to hold no private record."""
    from mammodp.baseline import PRIVATE_SPLITS, PUBLIC_SOURCES, check_public, feature_columns, fit_standardiser

    source = cfg.baseline.scaler_source
    if source not in PUBLIC_SOURCES:
        raise ConfigError(f"unknown public set {source!r}; known: {', '.join(PUBLIC_SOURCES)}",
                          field="baseline.scaler_source")
    name, split = PUBLIC_SOURCES[source]
    table = read_features(features_dir, name)
    rows = table if split is None else table[table["split"].astype(str) == split]
    check_public(rows, private, source, private_splits=PRIVATE_SPLITS if name == "cbis" else ())
    return fit_standardiser(rows[feature_columns(rows)].to_numpy(np.float64), source)


def fit_spec(cfg: Config, epsilon: float, seed: int):
    """The baseline's FitSpec: its own optimiser settings, the Swin runs' dp.* settings."""
    from mammodp.training import FitSpec

    b, dp = cfg.baseline, cfg.dp
    return FitSpec(epochs=b.epochs, lr=b.lr, weight_decay=b.weight_decay, batch_size=b.batch_size,
                   physical_batch_size=PHYSICAL_BATCH, label_smoothing=0.0, flip=False, amp=False, seed=seed,
                   epsilon=epsilon, delta=dp.delta, max_grad_norm=dp.max_grad_norm, accountant=dp.accountant,
                   privacy_unit=dp.privacy_unit, grad_chunk=dp.grad_chunk, per_sample_method=dp.per_sample_method,
                   reproducible_noise=dp.reproducible_noise)


def run(cfg: Config, epsilon: float, seeds=None, out: Path | None = None, metrics_out: Path | None = None,
        report_out: Path | None = None, features: Path = Path("data/features")) -> dict:
    """Train `radiomics-linear` at one budget for every seed; write models, metrics and report."""
    from mammodp.baseline import FEATURE_PREFIX, REGIME, feature_columns, feature_table, features_for
    from mammodp.data.datasets import read_manifest_table
    from mammodp.data.manifest import manifest_path

    eps_txt = format_epsilon(epsilon)
    out = Path(out or Path("models/baseline") / f"{REGIME}-{eps_txt}")
    metrics_out = Path(metrics_out or Path("metrics/train") / f"{REGIME}-{eps_txt}.json")
    report_out = Path(report_out or Path("reports/train") / f"{REGIME}-{eps_txt}.json")
    manifest = manifest_path(cfg.data.prepared_dir, "cbis")
    frame = read_manifest_table(manifest)
    cbis = read_features(features, "cbis")
    tables = {}
    for split in ("train", "val"):
        rows = frame[frame["split"] == split].reset_index(drop=True)
        if len(rows) == 0:
            raise DataError(f"the manifest has no {split} split", path=manifest)
        tables[split] = feature_table(features_for(cbis, rows, Path(features) / "cbis.parquet"), rows)
    private = pd.concat([tables["train"].frame, tables["val"].frame])
    scaler = public_scaler(cfg, Path(features), private)
    names = [c[len(FEATURE_PREFIX):] for c in feature_columns(cbis)]

    results = []
    with atomic_dir(out) as tmp:
        for seed in list(seeds or cfg.train.seeds):
            results.append(_train_seed(cfg, epsilon, seed, tables["train"], tables["val"], scaler, names, manifest,
                                       tmp / f"seed={seed}"))
    summary = {"regime": REGIME, "epsilon_target": epsilon, "delta": cfg.dp.delta, "privacy_unit": cfg.dp.privacy_unit,
               "runs": results, "val_auprc_mean": float(np.nanmean([r["val_auprc"] for r in results])),
               "epsilon_spent_max": max(r["epsilon"] for r in results), "privacy_note": PRIVACY_NOTE,
               "scaler_statistics": scaler.describe(), "synthetic_privacy": "none"}
    write_json(report_out, summary)
    write_json(metrics_out, cell_metrics(summary))
    spent = summary["epsilon_spent_max"]
    print(f"train {REGIME} eps={eps_txt}: val AUPRC {summary['val_auprc_mean']:.3f}, epsilon spent "
          f"{format_epsilon(spent) if math.isinf(spent) else round(spent, 3)} (target {eps_txt}) -> {out}")
    return summary


def cell_metrics(summary: dict) -> dict[str, float]:
    """The same columns as a Swin cell's `metrics/train/*.json` (numbers only)."""
    runs = summary["runs"]
    out = {
        "val_auprc": summary["val_auprc_mean"],
        "val_auprc_std": float(np.std([r["val_auprc"] for r in runs])) if len(runs) > 1 else 0.0,
        "private": int(math.isfinite(summary["epsilon_target"])),
        "epsilon_target": summary["epsilon_target"], "epsilon": summary["epsilon_spent_max"],
        "within_budget": int(all(r["within_budget"] for r in runs)),
        "noise_multiplier": float(np.mean([r["noise_multiplier"] or 0.0 for r in runs])),
        "sample_rate": float(np.mean([r["sample_rate"] for r in runs])),
        "steps": int(max(r["steps"] for r in runs)),
        "best_epoch": float(np.mean([r["best_epoch"] for r in runs])), "n_seeds": len(runs),
    }
    return {k: v for k, v in out.items() if isinstance(v, int) or math.isfinite(v)}


def _train_seed(cfg: Config, epsilon: float, seed: int, train, val, scaler, names: list[str], manifest: Path,
                model_dir: Path) -> dict:
    import mlflow
    import torch

    from mammodp import tracking
    from mammodp.baseline import MODEL_KIND, REGIME, create_linear, fit_logistic, to_logistic
    from mammodp.inference import predict_proba, save_classifier
    from mammodp.metrics.classification import choose_threshold, classification_metrics
    from mammodp.privacy.compose import end_to_end
    from mammodp.privacy.engine import make_private
    from mammodp.runtime import seed_everything
    from mammodp.training import fit, privacy_record

    seed_everything(seed)
    eps_txt = format_epsilon(epsilon)
    spec = fit_spec(cfg, epsilon, seed)
    model = create_linear(scaler)
    tags = {"regime": REGIME, "model_kind": MODEL_KIND, "epsilon": eps_txt, "delta": cfg.dp.delta, "seed": seed,
            "privacy_unit": cfg.dp.privacy_unit, "model_selection": "validation split (touched every epoch)",
            "private_data_without_dp": str(math.isinf(epsilon)).lower(), "synthetic_privacy": "none",
            "scaler_statistics": scaler.describe(), "scaler_source": scaler.source,
            "manifest_hash": tracking.manifest_hash(manifest)}
    params = {**{f"baseline.{k}": v for k, v in flatten(cfg.baseline).items()}, **flatten(cfg.dp, "dp")}
    with tracking.start_run(cfg.experiment, "train", name=tracking.run_name("train", REGIME, epsilon, seed),
                            tags=tags, params=params,
                            description=f"{REGIME} at target epsilon {eps_txt}, seed {seed}. {PRIVACY_NOTE}") as run:
        tracking.log_dataset(train.frame, manifest, "cbis-train", "training")
        tracking.log_dataset(val.frame, manifest, "cbis-val", "validation")
        if spec.private:
            res = fit(model, spec, private=train, public=None, val=val, device=torch.device("cpu"), progress=False,
                      desc=f"{REGIME} seed={seed}",
                      on_epoch=lambda r: tracking.log_metrics({k: r[k] for k in ("epsilon", "train_loss", "val_auprc")},
                                                              step=r["epoch"]))
            model.load_state_dict(res.best_state)
            to_logistic(model)  # the stored model: the same logistic form as the non-private one
            privacy, best_epoch, val_probs = dict(res.privacy), res.best_epoch, res.val_probs
        else:
            fit_logistic(model, train, cfg.baseline.C, seed)
            # The privacy record of every run, from the engine's non-private mode: epsilon inf, no steps.
            engine = make_private(model, torch.optim.SGD(model.parameters(), lr=0.0),
                                  record_ids=train.record_ids(cfg.dp.privacy_unit),
                                  expected_batch_size=min(spec.batch_size, len(np.unique(train.record_ids(cfg.dp.privacy_unit)))),
                                  target_epsilon=math.inf, delta=cfg.dp.delta, epochs=1,
                                  max_grad_norm=cfg.dp.max_grad_norm, privacy_unit=cfg.dp.privacy_unit)
            privacy, best_epoch = privacy_record(engine, train), 0
            privacy["fit"] = "scikit-learn LogisticRegression (lbfgs, full batch)"
            val_probs = predict_proba(model, val.images)
        spent = float(privacy["epsilon"])
        private = math.isfinite(epsilon) and bool(privacy.get("private"))
        e2e = end_to_end(privacy if private else None, delta=cfg.dp.delta, privacy_unit=cfg.dp.privacy_unit,
                         accountant=cfg.dp.accountant, real_without_dp=not private)
        thr = choose_threshold(val.labels, val_probs, method=cfg.evaluate.threshold, fixed=cfg.evaluate.fixed_threshold)
        val_metrics = classification_metrics(val.labels, val_probs, threshold=thr)
        within = e2e.within(epsilon)
        meta = {"kind": MODEL_KIND, "n_features": int(len(scaler.mean)),
                "feature_names": list(names),
                "features": list(cfg.baseline.features), "bin_count": cfg.baseline.bin_count,
                "scaler_source": scaler.source, "scaler_n": scaler.n, "scaler_statistics": scaler.describe(),
                "regime": REGIME, "seed": seed, "epsilon_target": epsilon, "epsilon": spent, "delta": cfg.dp.delta,
                "threshold": thr, "best_epoch": best_epoch, "run_id": run.info.run_id, "privacy": privacy,
                "privacy_note": PRIVACY_NOTE, "synthetic_privacy": "none",
                "epsilon_total": e2e.text if e2e.epsilon_total is None else e2e.epsilon_total,
                "epsilon_total_method": e2e.method, "epsilon_total_status": e2e.status,
                "epsilon_total_statement": e2e.statement()}
        save_classifier(model, meta, model_dir)
        mlflow.log_params({
            "noise_multiplier": privacy.get("noise_multiplier", 0.0), "sample_rate": privacy.get("sample_rate"),
            "steps": privacy.get("steps", 0), "delta": cfg.dp.delta, "max_grad_norm": spec.max_grad_norm,
            "accountant": privacy.get("accountant", "none"), "privacy_unit": cfg.dp.privacy_unit,
            "accountant_fallback": privacy.get("accountant_fallback", False), "threshold": thr})
        mlflow.set_tags({"within_budget": str(within).lower(), "epsilon_total": e2e.text,
                         "epsilon_total_method": e2e.method, "epsilon_total_status": e2e.status})
        if e2e.epsilon_total is not None:
            tracking.log_metrics({"epsilon_total": e2e.epsilon_total})
        val_auprc = float(val_metrics["auprc"])
        tracking.log_metrics({f"final_val_{k}": v for k, v in val_metrics.items() if isinstance(v, (int, float))})
        tracking.log_metrics({"best_val_auprc": val_auprc, "best_epoch": best_epoch})
        if math.isfinite(spent):
            mlflow.log_metric("epsilon", spent)
        mlflow.log_dict(meta, "privacy/meta.json")
        mlflow.log_text(PRIVACY_NOTE + "\n\n" + scaler.describe() + "\n\nEnd to end: " + e2e.statement() + "\n",
                        "privacy/what_epsilon_covers.txt")
        if not within:
            log.warning("run %s spent epsilon %.3f above its target %s", run.info.run_id, spent, eps_txt)
        return {"seed": seed, "run_id": run.info.run_id, "val_auprc": val_auprc, "epsilon": spent,
                "epsilon_total": e2e.text, "within_budget": within, "best_epoch": best_epoch, "threshold": thr,
                "model_dir": model_dir.name, **{k: privacy.get(k) for k in
                ("noise_multiplier", "sample_rate", "steps", "accountant", "accountant_fallback")}}
