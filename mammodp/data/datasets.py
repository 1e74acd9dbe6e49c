"""Torch datasets over manifests.

`PatchTable` loads every patch of a manifest (or of some splits) into one float32 array
once: the phantom and the paper's patch sets (~1,700 patches of 128 px) fit in memory
easily, and DP-SGD's Poisson sampling needs random access by index anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from mammodp.data.imageio import load_patch
from mammodp.errors import DataError


def read_manifest_table(path: str | Path) -> pd.DataFrame:
    """Read a manifest (parquet or csv) and add `abs_path`: `image_path` resolved against its folder."""
    p = Path(path)
    if not p.is_file():
        raise DataError("manifest not found", path=p)
    df = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p)
    if "image_path" not in df.columns:
        raise DataError("manifest has no image_path column", path=p)
    base = p.parent.resolve()
    df = df.copy()
    df["abs_path"] = [
        str(ip) if Path(ip).is_absolute() else str(base / ip) for ip in df["image_path"].astype(str)
    ]
    return df


@dataclass
class PatchTable:
    """Patches of a manifest held in memory.

    Attributes:
        images: float32 (N, 1, H, W) in [0, 1].
        labels: int64 (N,), 1 = malignant.
        records: int64 (N,), privacy-record index per patch (patient or patch, see `record_ids`).
        frame: the manifest rows, in the same order.
    """

    images: np.ndarray
    labels: np.ndarray
    frame: pd.DataFrame

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> "PatchTable":
        """Load the patches of the rows of `df` (which must carry `abs_path`)."""
        if len(df) == 0:
            raise DataError("no patches selected from the manifest", field="split")
        arrays = [load_patch(p) for p in df["abs_path"]]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise DataError(f"patches have different shapes {sorted(shapes)}", path=df["abs_path"].iloc[0])
        images = np.stack(arrays)[:, None, :, :].astype(np.float32)
        labels = df["label"].to_numpy().astype(np.int64)
        return cls(images=images, labels=labels, frame=df.reset_index(drop=True))

    @classmethod
    def load(cls, manifest: str | Path, splits: Sequence[str] | None = None) -> "PatchTable":
        """Load a manifest's patches, optionally only the given splits."""
        df = read_manifest_table(manifest)
        if splits is not None:
            df = df[df["split"].isin(list(splits))]
            if len(df) == 0:
                raise DataError(f"manifest has no rows in splits {list(splits)}", path=manifest)
        return cls.from_frame(df)

    def __len__(self) -> int:
        return len(self.labels)

    def record_ids(self, unit: str) -> np.ndarray:
        """Index of the privacy record each patch belongs to: itself (`patch`) or its patient."""
        if unit == "patch":
            return np.arange(len(self), dtype=np.int64)
        if unit == "patient":
            codes, _ = pd.factorize(self.frame["patient_id"].astype(str))
            return codes.astype(np.int64)
        raise DataError(f"unknown privacy unit {unit!r} (known: patch, patient)", field="dp.privacy_unit")

    def tensors(self):
        """(images, labels) as torch tensors sharing memory with the arrays."""
        import torch

        return torch.from_numpy(self.images), torch.from_numpy(self.labels)


def random_flips(x, generator=None):
    """Random horizontal and vertical flips per sample (training-time augmentation only).

    Args:
        x: (B, C, H, W) tensor.
        generator: torch.Generator for reproducibility.
    """
    import torch

    h, v = flip_masks(x.shape[0], generator)
    return apply_flips(x, h, v)


def flip_masks(n: int, generator=None):
    """(horizontal, vertical) coin flips for n samples: bool tensors (n,)."""
    import torch

    h = torch.rand(n, generator=generator, device="cpu") < 0.5
    v = torch.rand(n, generator=generator, device="cpu") < 0.5
    return h, v


def apply_flips(x, h, v):
    """Flip each sample of x (B, C, H, W) where its h / v mask (B,) is set."""
    import torch

    x = torch.where(h.to(x.device)[:, None, None, None], x.flip(-1), x)
    return torch.where(v.to(x.device)[:, None, None, None], x.flip(-2), x)
