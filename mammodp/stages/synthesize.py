"""`mammodp synthesize`: write a versioned synthetic set from a trained MCGAN.

Reads the generator saved by `train-gan` (`generator.pt` + `gan.json` in GENERATOR), draws
`synthesize.n_per_class` images per class from a CPU random stream seeded with
`synthesize.seed`, resizes them to `prepare.patch_size` (so synthetic and real patches have
one shape) and writes 16-bit PNGs plus `manifest.parquet` / `manifest.csv` with the real
manifests' columns, `split=train`, `source=synthetic`, and the provenance columns
`generator_run_id`, `generator_epsilon` (a number as text, or `non-private`) and
`generator_trained_on`. `generator_privacy.json` copies the generator's privacy record
(`gan.json` `privacy`: DP or not, privacy unit, delta, accountant history), which
`mammodp train` composes with the classifier's own (end-to-end epsilon). The folder is a DVC
output: the same generator and seed give the same set (generation runs on the CPU, so on
any machine).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mammodp.config import Config, flatten
from mammodp.data.manifest import manifest_path
from mammodp.errors import DataError

log = logging.getLogger(__name__)

PATHOLOGY = {0: "BENIGN", 1: "MALIGNANT"}
PREFIX = {0: "b", 1: "m"}
BATCH = 256  # images per generator forward pass


def read_generator_info(generator: Path) -> dict[str, Any]:
    """The provenance record `gan.json` beside the generator."""
    path = Path(generator) / "gan.json"
    if not path.is_file():
        raise DataError("generator record not found (run `mammodp train-gan` first)", path=path)
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"unreadable generator record: {exc}", path=path) from exc
    for key in ("run_id", "epsilon", "trained_on"):
        if key not in info:
            raise DataError(f"generator record lacks {key!r}", path=path)
    return info


def epsilon_text(eps: Any) -> str:
    """`generator_epsilon` column: the number as text (`9.99`), or `non-private`."""
    if isinstance(eps, str):
        return eps
    return f"{float(eps):.6g}"


def generator_privacy(info: dict[str, Any]) -> dict[str, Any]:
    """The generator's privacy record as the synthetic set carries it (`generator_privacy.json`)."""
    record = dict(info.get("privacy") or {})
    record.setdefault("dp", not (isinstance(info["epsilon"], str) and info["epsilon"] == "non-private"))
    trained = info["trained_on"]
    return {**record, "generator_run_id": str(info["run_id"]),
            "trained_on": trained.get("text", "") if isinstance(trained, dict) else str(trained)}


def synthetic_frame(n_per_class: int, info: dict[str, Any]) -> pd.DataFrame:
    """Manifest rows (without images) in label order: benign first, then malignant."""
    rows = []
    k = 0
    for label in (0, 1):
        for i in range(n_per_class):
            k += 1
            sid = f"synth-{PREFIX[label]}-{i + 1:05d}"
            rows.append({
                "sample_id": sid,
                # A synthetic image is not a patient: one id each, so patient-level logic
                # (splits, privacy units) never groups synthetic images together.
                "patient_id": f"synthetic-{k:05d}",
                "split": "train",
                "label": label,
                "pathology": PATHOLOGY[label],
                "image_path": f"patches/{sid}.png",
                "source": "synthetic",
            })
    df = pd.DataFrame(rows)
    # Attributes are unknown for synthetic images: typed nulls, the real manifests' dtypes.
    df["breast_density"] = pd.array([None] * len(df), dtype="Int64")
    df["age"] = np.full(len(df), np.nan, dtype=np.float64)
    df["view"] = pd.array([None] * len(df), dtype="string")
    df["laterality"] = pd.array([None] * len(df), dtype="string")
    df["assessment"] = pd.array([None] * len(df), dtype="Int64")
    df["subtlety"] = pd.array([None] * len(df), dtype="Int64")
    trained = info["trained_on"]
    df["generator_run_id"] = str(info["run_id"])
    df["generator_epsilon"] = epsilon_text(info["epsilon"])
    df["generator_trained_on"] = trained.get("text", json.dumps(trained)) if isinstance(trained, dict) else str(trained)
    df["label"] = df["label"].astype("int64")
    text = ["sample_id", "patient_id", "split", "pathology", "image_path", "source",
            "generator_run_id", "generator_epsilon", "generator_trained_on"]
    df[text] = df[text].astype("string")  # the real manifests' string dtype
    return df


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """(N, 1, S, S) -> (N, size, size), area-averaged when shrinking, bilinear when growing."""
    import torch
    from torch.nn import functional as F

    if images.shape[-1] == size:
        return images[:, 0]
    x = torch.from_numpy(images)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=size < images.shape[-1],
                      align_corners=False)
    return x.clamp(0.0, 1.0).numpy()[:, 0]


def run(cfg: Config, generator: Path = Path("models/mcgan"), out: Path = Path("data/synthetic")) -> pd.DataFrame:
    """Write the synthetic set to OUT (atomically) and return its manifest.

    Raises:
        DataError: the generator record is missing or incomplete.
        WeightsError: the generator checkpoint is missing or unreadable.
    """
    import torch
    from tqdm import tqdm

    from mammodp import tracking
    from mammodp.data.imageio import save_patch
    from mammodp.io import atomic_dir, write_json
    from mammodp.models import mcgan

    s = cfg.synthesize
    generator = Path(generator)
    info = read_generator_info(generator)
    # CPU always: the set must be the same bytes wherever it is regenerated (GPU kernels differ
    # in the last bits), and sampling is cheap next to training.
    G, _ = mcgan.load_generator(generator / "generator.pt", device="cpu")
    df = synthetic_frame(s.n_per_class, info)
    labels = df["label"].to_numpy()
    # One stream for the whole set: image k depends only on (weights, seed, k).
    z = torch.randn(len(df), G.spec.latent_dim, generator=torch.Generator().manual_seed(s.seed))
    size = cfg.prepare.patch_size
    tags = {"generator_run_id": info["run_id"], "generator_epsilon": epsilon_text(info["epsilon"]),
            "generator_trained_on": df["generator_trained_on"].iloc[0], "seed": s.seed}
    with tracking.start_run(cfg.experiment, "synthesize", name=tracking.run_name("synthesize", seed=s.seed),
                            tags=tags, params={f"synthesize.{k}": v for k, v in flatten(s).items()}
                            | {"prepare.patch_size": size}):
        with atomic_dir(out) as tmp:
            (tmp / "patches").mkdir()
            for start in tqdm(range(0, len(df), BATCH), desc="synthesize", unit="batch"):
                imgs = mcgan.sample(G, labels[start:start + BATCH], z=z[start:start + BATCH])
                for j, img in enumerate(resize(imgs, size)):
                    save_patch(tmp / df["image_path"].iloc[start + j], img)
            df.to_parquet(manifest_path(tmp), index=False)
            df.to_csv(tmp / "manifest.csv", index=False)
            write_json(tmp / "generator_privacy.json", generator_privacy(info))
        tracking.log_metrics({"n_images": len(df), "n_per_class": s.n_per_class})
    log.info("synthesize: %d images (%d per class, generator %s, epsilon %s) -> %s", len(df), s.n_per_class,
             info["run_id"], epsilon_text(info["epsilon"]), out)
    return df
