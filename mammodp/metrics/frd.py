"""Fréchet Radiomics Distance (FRD) through the `frd-score` package (pyradiomics, offline).

FRD fits Gaussians to normalised radiomics features of two image sets and takes their
Fréchet distance. Two versions exist in frd-score: v0 (the one behind Study A's table:
original-image features of 8 classes, joint min-max normalisation to [0, 7.4567]) and v1
(adds LoG and wavelet images, z-scores against the first set, and reports log(d^2)).

Radiomics features are extracted once per image (`radiomics_features`) with frd-score's own
extractor and per-image routine, and every pair of subsets is then scored from the cached
features with frd-score's own normalisation and Fréchet functions (`frd_from_features`) —
the same numbers as `frd_score.compute_frd` on the same files (checked by a test), without
re-extracting each image for every subset, pair and class.

Images are scored as 8-bit PNGs (Study A's patches were 8-bit; pyradiomics' default bin width
of 25 grey levels assumes that range) with a full-image mask whose corner pixel is 0:
pyradiomics rejects a mask with a single label value ("No labels found"), which is what
REFERENCE.md means by "v0 needs a mask with at least one labelled region".

Install (the PyPI pyradiomics 3.1.0 does not build; 3.0.1 does, against the installed numpy):
    pip install numpy && pip install --no-build-isolation pyradiomics==3.0.1 && pip install frd-score==1.0.1
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from importlib import metadata
from pathlib import Path

import numpy as np

VERSIONS = ("v0", "v1")
INSTALL_HINT = ("pip install numpy && pip install --no-build-isolation pyradiomics==3.0.1 "
                "&& pip install frd-score==1.0.1")

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _quiet_root_logger():
    """frd-score reports every constant feature through the root logger at INFO; hush it."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        root.setLevel(level)


def frd_status() -> tuple[bool, str]:
    """(usable, description): package versions when frd-score and pyradiomics import, else why not."""
    try:
        import frd_score.frd  # noqa: F401  (imports cv2 and SimpleITK too)
        import radiomics  # noqa: F401
    except ImportError as exc:
        return False, f"FRD skipped: frd-score or pyradiomics is not importable ({exc}); install: {INSTALL_HINT}"
    return True, f"frd-score {metadata.version('frd-score')}, pyradiomics {metadata.version('pyradiomics')}"


def _check_version(version: str) -> None:
    if version not in VERSIONS:
        raise ValueError(f"unknown FRD version {version!r}; known: {list(VERSIONS)}")


def radiomics_features(images: np.ndarray, version: str = "v0", *, progress: bool = False,
                       workers: int = 1) -> np.ndarray:
    """Radiomics feature vectors of greyscale images, as frd-score extracts them.

    Args:
        images: (N, H, W) or (N, 1, H, W) floats in [0, 1].
        version: `v0` or `v1` (frd-score's feature sets).
        progress: show a tqdm bar.
        workers: processes sharing the images (`mammodp.runtime.map_chunks`); per-image
            features, so the result does not depend on it.

    Returns:
        float64 (N, F) (F = 102 for v0 on 2-D images).

    Raises:
        ValueError: unknown version or images that are not 2-D.
        ImportError: frd-score or pyradiomics is missing (see `frd_status`).
    """
    from PIL import Image
    from tqdm import tqdm

    _check_version(version)
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"images must be (N, H, W) or (N, 1, H, W), got shape {np.shape(images)}")
    if workers > 1 and len(x) > 1:
        import functools

        from mammodp.runtime import map_chunks

        parts = map_chunks(functools.partial(radiomics_features, version=version), x, workers,
                           desc=f"radiomics {version}" if progress else None, unit="img")
        return np.concatenate(parts)
    import frd_score.frd as frd
    import radiomics

    # pyradiomics warns on every image (e.g. "GLCM is symmetrical"): keep only its errors.
    radiomics.setVerbosity(logging.ERROR)
    logging.getLogger("radiomics").setLevel(logging.ERROR)
    extractor = frd.get_feature_extractor(frd_version=version, image_dim=2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="frd-") as tmp:
        mask_path = Path(tmp) / "mask.png"
        mask = np.ones(x.shape[1:], dtype=np.uint8)
        mask[0, 0] = 0  # two label values, or pyradiomics finds "no labels"
        Image.fromarray(mask).save(mask_path)
        for i in tqdm(range(len(x)), desc=f"radiomics {version}", unit="img", disable=not progress):
            img_path = Path(tmp) / f"{i:06d}.png"
            Image.fromarray(np.round(np.clip(x[i], 0, 1) * 255).astype(np.uint8)).save(img_path)
            result = frd.process_image_mask_pair((str(img_path), str(mask_path)), feature_extractor=extractor,
                                                 frd_version=version)
            if result is None:  # frd-score skips masks with <= 1 voxel; ours has H*W - 1
                raise ValueError(f"radiomics extraction skipped image {i} (mask too small)")
            rows.append(result[0])
            img_path.unlink()
    return np.asarray(rows, dtype=np.float64)


def frd_from_features(features_a: np.ndarray, features_b: np.ndarray, version: str = "v0") -> float:
    """FRD between two sets from their radiomics features, with frd-score's normalisation.

    v0: both sets min-max normalised over their union to frd-score's v0 range, then the
    Fréchet distance. v1: NaN rows dropped, z-scores against set A, columns with NaN/inf
    dropped, then log of the Fréchet distance (-inf when it is 0).

    Raises:
        ValueError: unknown version, mismatched feature sizes, or fewer than 2 rows per set.
    """
    import frd_score.frd as frd

    _check_version(version)
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature arrays must be (N, F) with the same F, got {a.shape} and {b.shape}")
    with _quiet_root_logger():
        na, nb = _normalise(a, b, version)
    if len(na) < 2 or len(nb) < 2:
        raise ValueError(f"each set needs at least 2 images, got {len(na)} and {len(nb)}")
    d = float(frd.calculate_frechet_distance(na.mean(0), np.cov(na, rowvar=False),
                                             nb.mean(0), np.cov(nb, rowvar=False)))
    if version == "v1":
        return math.log(d) if d > 0 else float("-inf")
    return d


def _normalise(a: np.ndarray, b: np.ndarray, version: str) -> tuple[np.ndarray, np.ndarray]:
    """frd-score's per-version normalisation of two feature sets (see `frd_from_features`)."""
    import frd_score.frd as frd

    if version == "v0":
        lo, hi = frd.V0_DEFAULT_NORM_RANGE
        joint = np.concatenate([a, b])
        na = frd.min_max_normalize(a, lo, hi, base_distribution=joint)
        nb = frd.min_max_normalize(b, lo, hi, base_distribution=joint)
    else:
        a = a[~np.isnan(a).any(axis=1)].astype(np.float32)
        b = b[~np.isnan(b).any(axis=1)].astype(np.float32)
        lo, hi = frd.V1_DEFAULT_NORM_RANGE
        with np.errstate(divide="ignore", invalid="ignore"):
            na = frd.z_score_normalize(a, lo, hi, base_distribution=a, replace_nan=False, handle_std_zero=False)
            nb = frd.z_score_normalize(b, lo, hi, base_distribution=a, replace_nan=False, handle_std_zero=False)
        keep = np.isfinite(na).all(axis=0) & np.isfinite(nb).all(axis=0)
        na, nb = na[:, keep], nb[:, keep]
    return na, nb
