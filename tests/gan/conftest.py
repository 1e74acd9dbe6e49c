"""Fixtures for the GAN pathway: tiny real manifests (CBIS-like and BCDR-like) and a tiny config.

Images are 16 x 16 16-bit PNGs: benign patches hold a dim blob, malignant ones a brighter,
smaller blob, on a noisy background, so the classes differ and every patch has spread.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mammodp.config import (Config, DataConfig, GanConfig, GanDPConfig, PrepareConfig, SynthesizeConfig,
                            SynthQualityConfig)
from mammodp.data.imageio import save_patch

SIZE = 16


def blob(rng: np.random.Generator, label: int, size: int = SIZE) -> np.ndarray:
    """A noisy patch with a class-dependent blob, values in [0, 1]."""
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
    r = size * (0.18 if label else 0.3)
    amp = 0.45 if label else 0.3
    img = 0.3 + amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)) + rng.normal(0, 0.04, (size, size))
    return np.clip(img, 0, 1)


def write_manifest(root: Path, splits: dict[str, int], source: str, seed: int) -> Path:
    """Write `n` patches per split (alternating labels, one patient each) and a manifest."""
    rng = np.random.default_rng(seed)
    rows = []
    for split, n in splits.items():
        for i in range(n):
            label = i % 2
            sid = f"{source}-{split}-{i:03d}"
            save_patch(root / "patches" / f"{sid}.png", blob(rng, label))
            rows.append(dict(sample_id=sid, patient_id=f"{source}-P{split}{i:03d}", split=split, label=label,
                             pathology="MALIGNANT" if label else "BENIGN", image_path=f"patches/{sid}.png",
                             source=source, breast_density=1 + i % 4, age=50.0 + i, view="CC",
                             laterality="LEFT", assessment=3, subtlety=3))
    df = pd.DataFrame(rows)
    df["breast_density"] = df["breast_density"].astype("Int64")
    df["assessment"] = df["assessment"].astype("Int64")
    df["subtlety"] = df["subtlety"].astype("Int64")
    path = root / "manifest.parquet"
    df.to_parquet(path, index=False)
    return path


@pytest.fixture
def gan_project(tmp_path, monkeypatch):
    """A temp working folder with prepared CBIS/BCDR manifests, a temp MLflow store and a tiny config."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    write_manifest(tmp_path / "data/prepared/cbis", {"train": 16, "val": 8, "test": 4}, "cbis-ddsm", seed=0)
    write_manifest(tmp_path / "data/prepared/bcdr", {"external": 10}, "bcdr", seed=1)
    cfg = Config(
        experiment="test-gan",
        data=DataConfig(prepared_dir="data/prepared", synthetic_dir="data/synthetic"),
        prepare=PrepareConfig(patch_size=SIZE),
        # image_size 16 is below params' 64/128 choice; the library takes any power of two >= 16.
        gan=GanConfig(image_size=SIZE, latent_dim=8, width=4, epochs=2, batch_size=4, lr=2e-4,
                      checkpoint_every=1, sample_every=1, device="cpu", cpu_threads=1,
                      dp=GanDPConfig(enabled=False, epsilon=8.0, delta=1e-3, accountant="rdp")),
        synthesize=SynthesizeConfig(n_per_class=6, seed=3),
        synth_quality=SynthQualityConfig(subsets=2, subset_size=4, inception_weights=None, seed=0),
    )
    return tmp_path, cfg


@pytest.fixture
def public_set(gan_project):
    """Writes a tiny public set laid out as `mammodp phantom --public` does (`data/public/prepared`);
    `source` sets the patient ids (`cbis-ddsm` reuses the private set's). Returns the folder name."""
    root, _ = gan_project

    def write(source: str = "phantom-public") -> str:
        write_manifest(root / "data/public/prepared", {"train": 12, "val": 4, "test": 4}, source, seed=5)
        return "data/public"

    return write
