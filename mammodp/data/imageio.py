"""Lossless patch storage: one way to write and read a patch.

Patches are single-channel 16-bit PNGs (uint16, full range used). `load_patch` returns
float32 in [0, 1] whatever the bit depth of the PNG (8-bit PNGs, e.g. BCDR-style or
externally produced synthetic sets, are read too).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mammodp.errors import DataError


def to_uint16(arr: np.ndarray) -> np.ndarray:
    """Map a float image in [0, 1] (or any integer image) to uint16 without clipping surprises."""
    a = np.asarray(arr)
    if a.dtype == np.uint16:
        return a
    if a.dtype == np.uint8:
        return a.astype(np.uint16) * 257
    a = np.clip(a.astype(np.float64), 0.0, 1.0)
    return np.round(a * 65535.0).astype(np.uint16)


def save_patch(path: str | Path, arr: np.ndarray) -> None:
    """Write a 2-D patch as a 16-bit greyscale PNG (deterministic bytes)."""
    a = to_uint16(arr)
    if a.ndim != 2:
        raise DataError(f"a patch must be 2-D, got shape {a.shape}", path=path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, format="PNG", optimize=False)


def load_patch(path: str | Path) -> np.ndarray:
    """Read a patch PNG (8- or 16-bit greyscale) as float32 in [0, 1], shape (H, W)."""
    p = Path(path)
    if not p.is_file():
        raise DataError("patch file not found", path=p)
    try:
        with Image.open(p) as im:
            a = np.asarray(im)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image: {exc}", path=p) from exc
    if a.ndim == 3:  # RGB(A) PNG from elsewhere: take luminance of the first 3 channels
        a = a[..., :3].mean(axis=-1)
        return (a / 255.0).astype(np.float32)
    if a.dtype == np.uint8:
        return (a.astype(np.float32) / 255.0)
    if a.dtype in (np.uint16, np.int32, np.uint32):  # PIL may hand I;16 back as int32
        return (a.astype(np.float32) / 65535.0)
    if a.dtype == bool:
        return a.astype(np.float32)
    raise DataError(f"unsupported pixel type {a.dtype}", path=p)
