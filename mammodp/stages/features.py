"""Stage `features`: radiomics features of every prepared patch, once (the baseline's input).

For each prepared set (`cbis`: train/val/test, `bcdr`: external) write
`<out>/<set>.parquet`: sample_id, patient_id, split, label, source and one `f:<name>` column per
pyradiomics feature (`mammodp.baseline.radiomics_features`, classes `baseline.features`, grey
levels `baseline.bin_count`). With `baseline.scaler_source: public`, also `<out>/public.parquet`
for `baseline.public_patches` patches (a fixed seeded draw) of the public phantom set
(`<public>/prepared/manifest.parquet`, `mammodp phantom --public`): the standardisation's data. Every budget of `radiomics-linear` and the evaluation read these
files: the features do not depend on the budget, so they are computed once. A numbers-only
metrics file gives counts and the extraction time per patch.
"""

from __future__ import annotations

import time
from pathlib import Path

from mammodp.config import Config
from mammodp.data.datasets import PatchTable, read_manifest_table
from mammodp.data.manifest import manifest_path
from mammodp.errors import DataError
from mammodp.io import atomic_dir, write_json

SETS = ("cbis", "bcdr")


def public_rows(cfg: Config, public: Path):
    """The public phantom set's rows the scaler is fitted on (all, or a fixed draw of
    `baseline.public_patches`), and their manifest.

    Raises:
        DataError: no public set under `public` (`mammodp phantom --public`; with
            `pretrain.enabled: false` there is none: choose another `baseline.scaler_source`).
    """
    import numpy as np

    manifest = manifest_path(Path(public) / "prepared")
    if not manifest.is_file():
        raise DataError("no public set (run `mammodp phantom --public`; with pretrain.enabled false there is "
                        "none: set baseline.scaler_source to cbis-test)", path=manifest)
    df = read_manifest_table(manifest)
    k = cfg.baseline.public_patches
    if 0 < k < len(df):
        df = df.iloc[np.sort(np.random.default_rng(0).choice(len(df), size=k, replace=False))]
    return df, manifest


def run(cfg: Config, out: Path = Path("data/features"), metrics_out: Path = Path("metrics/features.json"),
        public: Path = Path("data/public")) -> dict:
    """Extract the features of every prepared set (and of the public set); log one MLflow run."""
    from mammodp import tracking
    from mammodp.baseline import feature_frame, radiomics_features

    b = cfg.baseline
    numbers: dict[str, float] = {}
    total_n, total_s = 0, 0.0
    frames = {name: read_manifest_table(manifest_path(cfg.data.prepared_dir, name)) for name in SETS}
    if b.scaler_source == "public":
        frames["public"], _ = public_rows(cfg, public)
    with atomic_dir(Path(out)) as tmp:
        for name, frame in frames.items():
            table = PatchTable.from_frame(frame)
            t0 = time.perf_counter()
            feats, names = radiomics_features(table.images, b.features, b.bin_count, progress=True,
                                              workers=b.workers)
            seconds = time.perf_counter() - t0
            feature_frame(table.frame, feats, names).to_parquet(tmp / f"{name}.parquet", index=False)
            numbers[f"{name}/patches"] = len(table)
            total_n, total_s = total_n + len(table), total_s + seconds
            numbers["features"] = len(names)
    numbers["seconds_per_patch"] = round(total_s / max(total_n, 1), 4)
    write_json(Path(metrics_out), numbers)
    with tracking.start_run(cfg.experiment, "features", name="features",
                            params={"baseline.features": ",".join(b.features), "baseline.bin_count": b.bin_count},
                            description="Radiomics features of every prepared patch (lesion mask segmented "
                                        "from the patch), computed once for the radiomics-linear baseline."):
        tracking.log_metrics({k.replace("/", "_"): float(v) for k, v in numbers.items()})
    print(f"features: {int(numbers['features'])} radiomics features of {total_n} patches, "
          f"{numbers['seconds_per_patch'] * 1000:.0f} ms per patch -> {out}")
    return numbers
