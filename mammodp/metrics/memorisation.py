"""Memorisation check: are synthetic images suspiciously close to training images?

For each synthetic image, the distance to its nearest training image is compared with the
same nearest-training-image distance of HELD-OUT real images (never trained on): a held-out
image is a fresh draw from the same population, so its distances show how close two
different real patches naturally get. A synthetic image closer to some training image than
the `percentile`-th percentile (default 1st) of that baseline is flagged as a likely copy.

Distance: per-pixel RMS difference (L2 / sqrt(D)) after downsampling both images to
`size` x `size` px (area averaging), so that noise and sub-pixel shifts matter less than
structure. Training images enter with their horizontal, vertical and 180-degree flips,
because the GAN trains on flipped copies and may reproduce a flipped original.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class MemorisationResult:
    """Nearest-neighbour distances and the verdict.

    Attributes:
        synthetic_distance: (N,) distance of each synthetic image to its nearest training image.
        synthetic_nearest: (N,) index of that training image.
        baseline_distance: (M,) the same distance for each held-out real image.
        threshold: the `percentile`-th percentile of `baseline_distance`.
        percentile: the percentile used.
        flagged: (N,) bool, synthetic_distance < threshold.
    """

    synthetic_distance: np.ndarray
    synthetic_nearest: np.ndarray
    baseline_distance: np.ndarray
    threshold: float
    percentile: float
    flagged: np.ndarray

    @property
    def fraction(self) -> float:
        """Fraction of synthetic images closer than the baseline threshold."""
        return float(self.flagged.mean()) if len(self.flagged) else float("nan")

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (no per-image arrays)."""

        def stats(d: np.ndarray) -> dict[str, float]:
            return {"min": float(d.min()), "p01": float(np.percentile(d, 1)),
                    "median": float(np.median(d)), "mean": float(d.mean())}

        return {
            "fraction_below_threshold": self.fraction,
            "n_flagged": int(self.flagged.sum()),
            "n_synthetic": int(len(self.synthetic_distance)),
            "n_baseline": int(len(self.baseline_distance)),
            "percentile": self.percentile,
            "threshold": float(self.threshold),
            "synthetic_nn_distance": stats(self.synthetic_distance),
            "baseline_nn_distance": stats(self.baseline_distance),
        }


def _prepare(images: np.ndarray, size: int):
    """(N, H, W) or (N, 1, H, W) in [0, 1] -> (N, 1, size, size) float32 tensor."""
    import torch
    from torch.nn import functional as F

    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"images must be (N, H, W) or (N, 1, H, W), got shape {np.shape(images)}")
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.shape[-2:] != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return t


def nearest_neighbours(queries: np.ndarray, reference: np.ndarray, *, size: int = 32, flips: bool = True,
                       chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Distance from each query image to its nearest reference image (see module doc).

    Args:
        queries: (N, [1,] H, W) images in [0, 1].
        reference: (M, [1,] H', W') images in [0, 1].
        size: side both are downsampled to.
        flips: also match the reference's horizontal / vertical / both flips.
        chunk: queries per distance block (bounds memory at chunk x 4M floats).

    Returns:
        (distances (N,), nearest reference index (N,)), distances as per-pixel RMS.
    """
    import torch

    q = _prepare(queries, size)
    r = _prepare(reference, size)
    if len(q) == 0 or len(r) == 0:
        raise ValueError(f"need at least one query and one reference image, got {len(q)} and {len(r)}")
    m = len(r)
    variants = [r, r.flip(-1), r.flip(-2), r.flip(-1).flip(-2)] if flips else [r]
    ref = torch.cat(variants).reshape(len(variants) * m, -1)
    qf = q.reshape(len(q), -1)
    dist, idx = [], []
    for i in range(0, len(qf), chunk):
        d = torch.cdist(qf[i : i + chunk].double(), ref.double())
        best = d.min(dim=1)
        dist.append(best.values)
        idx.append(best.indices % m)  # a flipped variant points back to its original
    scale = np.sqrt(qf.shape[1])
    return torch.cat(dist).numpy() / scale, torch.cat(idx).numpy().astype(np.int64)


def memorisation_check(synthetic: np.ndarray, train: np.ndarray, heldout: np.ndarray, *,
                       percentile: float = 1.0, size: int = 32) -> MemorisationResult:
    """Flag synthetic images closer to a training image than held-out real images get.

    Args:
        synthetic: (N, [1,] H, W) synthetic images in [0, 1].
        train: (M, [1,] H, W) the generator's training images.
        heldout: (K, [1,] H, W) real images the generator never saw (e.g. the val split).
        percentile: baseline percentile used as the threshold (1 = the paper-style 1st).
        size: downsampled side for the distance.

    Raises:
        ValueError: an empty set or a percentile outside (0, 100).
    """
    if not 0 < percentile < 100:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")
    d_syn, nearest = nearest_neighbours(synthetic, train, size=size)
    d_base, _ = nearest_neighbours(heldout, train, size=size)
    threshold = float(np.percentile(d_base, percentile))
    return MemorisationResult(
        synthetic_distance=d_syn, synthetic_nearest=nearest, baseline_distance=d_base,
        threshold=threshold, percentile=float(percentile), flagged=d_syn < threshold,
    )


def closest_pairs_figure(synthetic: np.ndarray, train: np.ndarray, result: MemorisationResult, k: int = 8,
                         *, show_train: bool = True):
    """Figure (matplotlib, no pyplot): the k synthetic images closest to a training image,
    each above its nearest training image, titled with the distance (red = flagged).

    With `show_train=False` the training images are withheld (their panels say so): the
    figure then shows no private patch and can be shared.
    """
    from matplotlib.figure import Figure

    syn = np.asarray(synthetic, dtype=np.float32).reshape(len(synthetic), *np.shape(synthetic)[-2:])
    tr = np.asarray(train, dtype=np.float32).reshape(len(train), *np.shape(train)[-2:])
    order = np.argsort(result.synthetic_distance)[: max(1, min(k, len(syn)))]
    fig = Figure(figsize=(1.5 * len(order), 3.6), layout="constrained")
    axes = fig.subplots(2, len(order), squeeze=False)
    for col, i in enumerate(order):
        top, bottom = axes[0, col], axes[1, col]
        top.imshow(syn[i], cmap="gray", vmin=0, vmax=1)
        if show_train:
            bottom.imshow(tr[result.synthetic_nearest[i]], cmap="gray", vmin=0, vmax=1)
        else:
            bottom.text(0.5, 0.5, "withheld", ha="center", va="center", fontsize=7, transform=bottom.transAxes)
        top.set_title(f"d={result.synthetic_distance[i]:.3f}", fontsize=8,
                      color="red" if result.flagged[i] else "black")
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("synthetic")
    axes[1, 0].set_ylabel("nearest train" if show_train else "train (withheld)")
    fig.suptitle(f"Closest synthetic/training pairs (threshold {result.threshold:.3f} = "
                 f"p{result.percentile:g} of held-out real)", fontsize=9)
    return fig


def distance_histogram_figure(result: MemorisationResult):
    """Figure: nearest-training-image distances, synthetic vs held-out real, with the threshold."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.5), layout="constrained")
    ax = fig.subplots()
    both = np.concatenate([result.synthetic_distance, result.baseline_distance])
    bins = np.linspace(0.0, float(both.max()) * 1.02 + 1e-9, 40)
    ax.hist(result.baseline_distance, bins=bins, alpha=0.6, density=True, label="held-out real -> train")
    ax.hist(result.synthetic_distance, bins=bins, alpha=0.6, density=True, label="synthetic -> train")
    ax.axvline(result.threshold, color="red", linestyle="--", label=f"p{result.percentile:g} threshold")
    ax.set_xlabel("distance to nearest training image (per-pixel RMS)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return fig
