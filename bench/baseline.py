"""Benchmark of the radiomics-linear baseline on a fresh phantom drawn with a plan's params.

    python bench/baseline.py [--params pipelines/demo.yaml] [--work /tmp/mammodp-baseline-bench]

Draws the phantom, prepares it, extracts the radiomics features (time per patch), trains the
baseline at every budget of `train.epsilons` and prints internal (CBIS test) and external
(BCDR) AUROC / AUPRC with their 95% CIs, as `mammodp evaluate` computes them. MLflow goes to
a store inside the work folder. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=Path, default=ROOT / "pipelines/demo.yaml")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mammodp-baseline-bench"))
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    p = yaml.safe_load(args.params.read_text())
    p["data"].update(raw_dir=str(work / "raw"), cbis_dir=str(work / "raw/cbis-ddsm"), bcdr_dir=str(work / "raw/bcdr"),
                     prepared_dir=str(work / "prepared"), synthetic_dir=str(work / "synthetic"))
    p["experiment"] = "bench-baseline"
    (work / "params.yaml").write_text(yaml.safe_dump(p))
    os.chdir(work)

    from mammodp.baseline import load_baseline
    from mammodp.config import format_epsilon, load_config
    from mammodp.inference import predict_proba
    from mammodp.metrics.classification import evaluate_predictions
    from mammodp.stages import evaluate, features, phantom, prepare, train_baseline

    cfg = load_config(work / "params.yaml")
    t = {}
    t0 = time.perf_counter()
    if not (work / "prepared/bcdr/manifest.parquet").is_file():
        phantom.run(cfg, out=work / "raw")
        prepare.run(cfg, source="cbis-ddsm", root=work / "raw/cbis-ddsm", out=work / "prepared/cbis")
        prepare.run(cfg, source="bcdr", root=work / "raw/bcdr", out=work / "prepared/bcdr")
    if cfg.baseline.scaler_source == "public" and not (work / "public/prepared").is_dir():
        phantom.run_public(cfg, out=work / "public")
    t["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    numbers = features.run(cfg, out=work / "features", metrics_out=work / "metrics/features.json",
                           public=work / "public")
    t["features"] = time.perf_counter() - t0
    tables, _ = evaluate._tables(cfg)
    inputs = evaluate._baseline_inputs(tables, work / "features")
    rows = []
    for eps in cfg.train.epsilons:
        name = f"radiomics-linear-{format_epsilon(eps)}"
        t0 = time.perf_counter()
        train_baseline.run(cfg, epsilon=eps, out=work / "models" / name, metrics_out=work / f"metrics/{name}.json",
                           report_out=work / f"reports/{name}.json", features=work / "features")
        t[f"train eps={format_epsilon(eps)}"] = time.perf_counter() - t0
        for seed in cfg.train.seeds:
            model, meta = load_baseline(work / "models" / name / f"seed={seed}")
            for split in ("internal", "external"):
                m = evaluate_predictions(tables[split].labels, predict_proba(model, inputs[split]),
                                         threshold=meta["threshold"], n_boot=cfg.evaluate.bootstrap, ci=cfg.evaluate.ci,
                                         seed=seed, groups=tables[split].frame["patient_id"].astype(str).to_numpy())
                rows.append((format_epsilon(eps), seed, split, m, meta["epsilon"]))
    print(f"\nplan {cfg.plan}: patches {dict((k, v) for k, v in numbers.items() if k.endswith('patches'))}, "
          f"{int(numbers['features'])} features, {numbers['seconds_per_patch'] * 1000:.0f} ms per patch "
          f"(patch {cfg.prepare.patch_size} px)")
    print(f"scaler statistics: {cfg.baseline.scaler_source}")
    for eps, seed, split, m, spent in rows:
        spent = float(spent)  # meta.json writes inf as "inf"
        spent_txt = "inf" if math.isinf(spent) else f"{spent:.3f}"
        print(f"radiomics-linear eps={eps:>3} (spent {spent_txt}) seed={seed} {split:>8}: "
              f"AUROC {m['auroc']:.3f} [{m['auroc_ci_low']:.3f}, {m['auroc_ci_high']:.3f}]  "
              f"AUPRC {m['auprc']:.3f} [{m['auprc_ci_low']:.3f}, {m['auprc_ci_high']:.3f}]  n={m.get('n', '?')}")
    print("wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))


if __name__ == "__main__":
    main()
