"""Stage `evaluate`: every trained run on val, internal test (CBIS) and external test (BCDR).

Per run: metrics with bootstrap CIs (cluster bootstrap by patient) at the threshold chosen
on validation during training, PR/ROC curves, subgroup metrics and Study B's SPD. Across
runs: the privacy-utility curve (mean over seeds, per regime), the fairness chart and
Pearson's r between epsilon and SPD over the private runs. Test sets are only evaluated
here, never used for selection. The classical baseline `radiomics-linear` (models/baseline/)
is evaluated beside the Swin regimes on the radiomics features of the same patches.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from mammodp.config import SYNTH_CELL, Config, format_epsilon
from mammodp.data.datasets import PatchTable, read_manifest_table
from mammodp.data.manifest import manifest_path
from mammodp.errors import DataError
from mammodp.io import atomic_dir, write_json

log = logging.getLogger(__name__)

SPLITS = {"val": "validation", "internal": "CBIS test", "external": "BCDR"}


def _tables(cfg: Config) -> tuple[dict[str, PatchTable], dict[str, Path]]:
    """The evaluation tables by split key, and the manifest each one came from."""
    cbis, bcdr = manifest_path(cfg.data.prepared_dir, "cbis"), manifest_path(cfg.data.prepared_dir, "bcdr")
    sources = {"val": (cbis, "val"), "internal": (cbis, "test"), "external": (bcdr, "external")}
    frames = {p: read_manifest_table(p) for p in {m for m, _ in sources.values()}}
    tables = {k: PatchTable.from_frame(frames[m][frames[m]["split"] == split]) for k, (m, split) in sources.items()}
    return tables, {k: m for k, (m, _) in sources.items()}


# MLflow dataset names of the evaluation splits (training logs cbis-train / cbis-val itself).
DATASET_NAMES = {"internal": "cbis-test", "external": "bcdr-external"}


def cell_metrics(records: list[dict], split: str) -> dict[str, dict]:
    """`dvc metrics show` numbers of one regime on one split: `{eps=E: {auroc, auroc_lo, ...}}`.

    Means over seeds; CIs are the mean of the seeds' bootstrap bounds. One file per
    (split, regime) makes `dvc metrics show` a table with one row per regime.
    """
    out: dict[str, dict] = {}
    for eps in sorted({r["epsilon_target"] for r in records}):
        rs = [r["splits"][split] for r in records if r["epsilon_target"] == eps]
        cell = {}
        for key in ("auroc", "auroc_ci_low", "auroc_ci_high", "auprc", "auprc_ci_low", "auprc_ci_high"):
            vals = [float(m[key]) for m in rs if key in m and m[key] is not None and math.isfinite(float(m[key]))]
            if vals:
                cell[key.replace("_ci_low", "_lo").replace("_ci_high", "_hi")] = round(float(np.mean(vals)), 4)
        out[f"eps={format_epsilon(eps)}"] = cell
    return out


def _subgroups(frame: pd.DataFrame, probs: np.ndarray, cfg: Config) -> dict[str, pd.DataFrame]:
    """Per-attribute subgroup metrics with SPD (attributes absent from a source are skipped)."""
    from mammodp.metrics.fairness import age_bins, statistical_parity_difference, subgroup_metrics

    df = frame.copy()
    df["p_malignant"] = probs
    if "age" in df.columns:
        df["age_bin"] = age_bins(df["age"], cfg.evaluate.age_bins)
    out = {}
    for attr in cfg.evaluate.subgroups:
        if attr not in df.columns or df[attr].isna().all():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sub = subgroup_metrics(df, attr)
            for m in ("auroc", "auprc"):
                sub[f"spd_{m}"] = statistical_parity_difference(sub, m)
        out[attr] = sub
    return out


def _baseline_inputs(tables: dict[str, PatchTable], features: Path) -> dict[str, np.ndarray]:
    """The radiomics features of each evaluation split, row for row with its PatchTable."""
    from mammodp.baseline import features_for

    sets = {"val": "cbis", "internal": "cbis", "external": "bcdr"}
    out = {}
    for split, name in sets.items():
        p = Path(features) / f"{name}.parquet"
        if not p.is_file():
            raise DataError("feature table not found; run `mammodp features` first", path=p)
        feats = features_for(pd.read_parquet(p), tables[split].frame, p)
        out[split] = feats.astype(np.float32)[:, None, None, :]  # the baseline's (N, 1, 1, F) input
    return out


def run(cfg: Config, models: Path = Path("models/classifier"), out: Path = Path("metrics/eval"),
        plots: Path = Path("plots/eval"), report: Path = Path("reports/eval"),
        baselines: Path = Path("models/baseline"), features: Path = Path("data/features")) -> dict:
    """Evaluate the whole grid and log to MLflow.

    The classical baseline `radiomics-linear` (`baselines/radiomics-linear-E/seed=S`, one cell
    per budget of `train.epsilons`) is evaluated beside the Swin regimes, on the radiomics
    features of the same patches (`features`), with the same metrics, CIs, fairness and plots.

    Writes `out/{internal,external}/<regime>.json` (numbers only, for `dvc metrics show`),
    `report/` (per-run detail with fairness, the summary with correlations and notes) and
    `plots/` (privacy-utility and fairness CSVs for `dvc plots`, figures).
    """
    import mlflow
    from tqdm.auto import tqdm

    from mammodp import tracking
    from mammodp.metrics.classification import evaluate_predictions
    from mammodp.metrics.fairness import epsilon_spd_correlation
    from mammodp.metrics.plots import plot_fairness, plot_pr_roc, plot_privacy_utility
    from mammodp.inference import load_classifier, predict_proba
    from mammodp.baseline import REGIME as BASELINE, load_baseline
    from mammodp.privacy.compose import NOT_COVERED, served_epsilon

    tables, manifests = _tables(cfg)
    baseline_inputs = _baseline_inputs(tables, features)
    regimes = tuple(cfg.train.regimes) + (BASELINE,)
    # `synth` is one model for every budget (eps None here): evaluated once, reported at each.
    cells = [(r, e) for r in regimes for e in ((None,) if r == "synth" else cfg.train.epsilons)]
    run_dirs = []
    for regime, eps in cells:
        for seed in cfg.train.seeds:
            cell = SYNTH_CELL if eps is None else f"{regime}-{format_epsilon(eps)}"
            d = Path(baselines if regime == BASELINE else models) / cell / f"seed={seed}"
            if not (d / "meta.json").is_file():
                raise DataError("trained model missing; run its train stage first", path=d)
            run_dirs.append((regime, eps, seed, d))

    records, fairness_rows, curves_all = [], [], {}
    out, plots, report = Path(out), Path(plots), Path(report)
    with atomic_dir(report / "runs") as runs_tmp, atomic_dir(plots / "figures") as fig_tmp:
        for regime, eps, seed, d in tqdm(run_dirs, desc="evaluate"):
            model, meta = load_baseline(d) if regime == BASELINE else load_classifier(d)
            thr = float(meta["threshold"])
            every_budget = eps is None
            if every_budget:
                eps = math.inf
            per_run = {"regime": regime, "epsilon_target": eps, "epsilon": meta["epsilon"], "seed": seed,
                       "epsilon_total": served_epsilon(meta),  # end to end, or not_covered
                       "run_id": meta["run_id"], "threshold": thr, "splits": {}, "fairness": {}}
            curves = {}
            for split, table in tables.items():
                probs = predict_proba(model, baseline_inputs[split] if regime == BASELINE else table.images)
                m = evaluate_predictions(table.labels, probs, threshold=thr, n_boot=cfg.evaluate.bootstrap,
                                         ci=cfg.evaluate.ci, seed=seed,
                                         groups=table.frame["patient_id"].astype(str).to_numpy())
                per_run["splits"][split] = m
                curves[split] = (table.labels, probs)
                if split != "val":
                    for attr, sub in _subgroups(table.frame, probs, cfg).items():
                        per_run["fairness"].setdefault(split, {})[attr] = json.loads(sub.reset_index().to_json(orient="records"))
                        for g, row in sub.iterrows():
                            fairness_rows.append({"regime": regime, "epsilon": meta["epsilon"], "epsilon_target": eps,
                                                  "seed": seed, "split": split, "attribute": attr, "group": str(g),
                                                  **{k: row[k] for k in ("n", "auroc", "auprc", "spd_auroc", "spd_auprc")}})
            if every_budget:
                per_run["reported_at_budgets"] = [format_epsilon(e) for e in cfg.train.epsilons]
            name = f"{regime}-seed={seed}" if every_budget else f"{regime}-{format_epsilon(eps)}-seed={seed}"
            write_json(runs_tmp / f"{name}.json", per_run)
            fig = plot_pr_roc({SPLITS[k]: v for k, v in curves.items()})
            fig.savefig(fig_tmp / f"pr_roc_{name}.png", dpi=90)
            curves_all[name] = curves
            # Results go to the training run too, so the MLflow UI compares the grid in one table.
            with tracking.start_run(cfg.experiment, "train", run_id=meta["run_id"]):
                for split, name_ds in DATASET_NAMES.items():
                    tracking.log_dataset(tables[split].frame, manifests[split], name_ds, "test")
                for split, m in per_run["splits"].items():
                    tracking.log_metrics({f"{split}_{k}": v for k, v in m.items()})
                tracking.log_figure(fig, f"eval/pr_roc_{name}.png", saved=fig_tmp / f"pr_roc_{name}.png")
                mlflow.log_dict(per_run, "eval/metrics.json")
            if every_budget:  # the same model's figures at every budget of the curve and tables
                records.extend({**per_run, "epsilon_target": e} for e in cfg.train.epsilons)
            else:
                records.append(per_run)

        # Privacy-utility: mean over seeds per (regime, target epsilon, split).
        rows = []
        for r in records:
            for split in ("internal", "external", "val"):
                m = r["splits"][split]
                rows.append({"regime": r["regime"], "epsilon": r["epsilon_target"], "split": split,
                             "auprc": m["auprc"], "auroc": m["auroc"], "auprc_benign": m["auprc_benign"],
                             "ci_low": m.get("auprc_ci_low", np.nan), "ci_high": m.get("auprc_ci_high", np.nan),
                             "prevalence": m["prevalence"], "epsilon_spent": r["epsilon"],
                             "covered": r["epsilon_total"] != NOT_COVERED})
        pu = pd.DataFrame(rows)
        pu_mean = (pu.groupby(["regime", "epsilon", "split"], as_index=False)
                   .agg(auprc=("auprc", "mean"), auroc=("auroc", "mean"), auprc_benign=("auprc_benign", "mean"),
                        ci_low=("ci_low", "mean"), ci_high=("ci_high", "mean"), prevalence=("prevalence", "mean"),
                        epsilon_spent=("epsilon_spent", "max"), n_seeds=("auprc", "size"),
                        covered=("covered", "min")))
        finite = pu_mean["epsilon"][np.isfinite(pu_mean["epsilon"])]
        inf_x = float(finite.max() * 4) if len(finite) else 1.0
        pu_mean["epsilon_plot"] = [e if math.isfinite(e) else inf_x for e in pu_mean["epsilon"]]
        plot_df = pu_mean[pu_mean["split"] != "val"]
        fig_pu = plot_privacy_utility(plot_df)
        fig_pu.savefig(fig_tmp / "privacy_utility.png", dpi=100)

        fair = pd.DataFrame(fairness_rows)
        correlations = {}
        fig_fair = None
        if len(fair):
            for (split, attr, group), sub in fair.groupby(["split", "attribute", "group"]):
                key = f"{split}/{attr}/{group}"
                correlations[key] = epsilon_spd_correlation(sub.rename(columns={"spd_auroc": "spd"})[["epsilon", "spd"]])
            main = fair[(fair["split"] == "internal")]
            attr0 = main["attribute"].iloc[0] if len(main) else None
            if attr0 is not None:
                fdf = main[main["attribute"] == attr0].copy()
                fdf["run"] = [f"{r} (every budget)" if r == "synth" else f"{r} eps={format_epsilon(e)}"
                              for r, e in zip(fdf["regime"], fdf["epsilon_target"])]
                fdf = fdf.groupby(["run", "group"], as_index=False).agg(auroc=("auroc", "mean"), spd=("spd_auroc", "mean"))
                fig_fair = plot_fairness(fdf, "auroc", group_col="group", run_col="run", spd_col="spd")
                fig_fair.suptitle(f"Internal test AUROC by {attr0} (SPD annotated)")
                fig_fair.savefig(fig_tmp / "fairness.png", dpi=100)

    plots.mkdir(parents=True, exist_ok=True)
    pu_mean.to_csv(plots / "privacy_utility.csv", index=False)
    if len(fair):
        fair.to_csv(plots / "fairness.csv", index=False)
    summary = {
        "privacy_utility": pu_mean.to_dict(orient="records"),  # inf stays "inf" (to_json would write null)
        "epsilon_spd_pearson": correlations,
        "n_runs": len(records),  # rows per (regime, budget, seed): synth counts once per budget
        "n_models": len(run_dirs),
        "selection": "thresholds and checkpoints chosen on the validation split only",
        "privacy_note": "epsilon per run as recorded by its accountant; see each run's privacy/what_epsilon_covers.txt",
    }
    write_json(report / "summary.json", summary)
    with atomic_dir(out) as tmp:
        for split in ("internal", "external"):
            for regime in regimes:
                write_json(tmp / split / f"{regime}.json",
                           cell_metrics([r for r in records if r["regime"] == regime], split))
    with tracking.start_run(cfg.experiment, "evaluate", name="evaluate",
                            params={"bootstrap": cfg.evaluate.bootstrap, "n_runs": len(records)}):
        mlflow.log_artifact(str(plots / "privacy_utility.csv"), "plots")
        tracking.log_figure(fig_pu, "plots/privacy_utility.png", saved=plots / "figures" / "privacy_utility.png")
        if fig_fair is not None:
            tracking.log_figure(fig_fair, "plots/fairness.png", saved=plots / "figures" / "fairness.png")
        mlflow.log_dict(summary, "summary.json")
        for key, c in correlations.items():
            if c.get("r") is not None and math.isfinite(c["r"]):
                tracking.log_metrics({f"pearson_eps_spd/{key}".replace(" ", "_").replace("[", "").replace(")", "").replace(",", "-"): c["r"]})
    for r in records:
        if "reported_at_budgets" in r and r["epsilon_target"] != cfg.train.epsilons[0]:
            continue  # printed once
        i, e = r["splits"]["internal"], r["splits"]["external"]
        at = "every" if "reported_at_budgets" in r else format_epsilon(r["epsilon_target"])
        print(f"{r['regime']:>28} eps={at:>5} seed={r['seed']}: "
              f"AUPRC internal {i['auprc']:.3f} external {e['auprc']:.3f} | AUROC {i['auroc']:.3f} / {e['auroc']:.3f}")
    return summary
