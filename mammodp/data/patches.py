"""The one patch extractor, used by `mammodp prepare` and by serving alike.

Geometry (REFERENCE, without its top-left clamp bug): the lesion mask is morphologically
closed; a lesion's bounding box gets `margin` px on every side, is made square (at least
`min_size` px) and CENTRED on the box; where the square runs off the image it is padded
with 0 (the mammogram's background) instead of being shifted, so the lesion stays at the
patch centre even at the image border. The square is resized with antialiasing to
`patch_size`. No augmentation here.

Boxes are `BBox(x0, y0, x1, y1)` in pixel indices (x = column, y = row), half-open like
PIL's boxes: `image[y0:y1, x0:x1]` is the lesion box. Serving requests use the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage

from mammodp.errors import DataError


class BBox(NamedTuple):
    """Half-open pixel box: columns `x0:x1`, rows `y0:y1`."""

    x0: int
    y0: int
    x1: int
    y1: int


@dataclass
class ImagePatches:
    """What an importer cut from one source image (returned across processes)."""

    rows: list[dict] = field(default_factory=list)  # manifest fields per patch, no image_path yet
    patches: list[np.ndarray] = field(default_factory=list)  # float32 (patch_size, patch_size)
    warnings: list[str] = field(default_factory=list)  # logged by the caller, in order
    skipped: list[dict] = field(default_factory=list)  # {"file", "reason", "sample_ids"}


@dataclass(frozen=True)
class PatchGeometry:
    """Crop settings (from `PrepareConfig`), in source-image pixels except `patch_size`."""

    margin: int
    min_size: int
    patch_size: int


def _check_image(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise DataError(f"expected a 2-D greyscale image, got shape {img.shape}")
    return img


def close_mask(mask: np.ndarray, closing: int = 5) -> np.ndarray:
    """Morphological closing with a `closing` x `closing` square.

    The mask is padded first: scipy erodes from a zero border, which would otherwise eat
    lesions touching the image edge.
    """
    m = np.asarray(mask, dtype=bool)
    if closing <= 1:
        return m.copy()
    pad = closing
    padded = np.pad(m, pad, mode="constant")
    closed = ndimage.binary_closing(padded, structure=np.ones((closing, closing), dtype=bool))
    return closed[pad:-pad, pad:-pad]


def lesion_bboxes(mask: np.ndarray, *, per_region: bool = False, closing: int = 5) -> list[BBox]:
    """Bounding boxes of a lesion mask after closing.

    Args:
        mask: 2-D boolean lesion mask.
        per_region: True gives one box per connected region (the reference code's "each
            contour"); False gives one box around the lesion, i.e. around every region at
            least 5% the area of the largest (specks of annotation noise are ignored).
        closing: side of the square structuring element, px.

    Returns:
        Boxes sorted by (x0, y0) ([] for an empty mask).
    """
    closed = close_mask(mask, closing)
    labels, n = ndimage.label(closed)
    if n == 0:
        return []
    slices = ndimage.find_objects(labels)
    areas = ndimage.sum_labels(closed, labels, index=np.arange(1, n + 1))
    boxes = [BBox(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in slices]
    if per_region:
        return sorted(boxes)
    keep = [b for b, a in zip(boxes, areas) if a >= 0.05 * float(np.max(areas))]
    return [
        BBox(
            min(b.x0 for b in keep),
            min(b.y0 for b in keep),
            max(b.x1 for b in keep),
            max(b.y1 for b in keep),
        )
    ]


def square_window(bbox: BBox, *, margin: int, min_size: int) -> BBox:
    """The square crop window centred on `bbox` (may extend beyond the image).

    Side = max(box height + 2 margin, box width + 2 margin, min_size). The centre matches
    the box centre exactly when side and box size have the same parity, else within 0.5 px.
    """
    w, h = bbox.x1 - bbox.x0, bbox.y1 - bbox.y0
    if h <= 0 or w <= 0:
        raise DataError(f"empty bounding box {tuple(bbox)} (expected x0 < x1, y0 < y1)")
    side = max(h + 2 * margin, w + 2 * margin, min_size)
    cx, cy = (bbox.x0 + bbox.x1) / 2.0, (bbox.y0 + bbox.y1) / 2.0
    x0 = int(math.floor(cx - side / 2.0 + 0.5))
    y0 = int(math.floor(cy - side / 2.0 + 0.5))
    return BBox(x0, y0, x0 + side, y0 + side)


def resize_patch(image: np.ndarray, size: int) -> np.ndarray:
    """Antialiased resize of a float image to `size` x `size` (PIL triangle filter: no ringing)."""
    img = np.ascontiguousarray(image, dtype=np.float32)
    if img.shape == (size, size):
        return img.copy()
    # Pillow widens the filter support by the scale factor when shrinking: antialiased.
    out = Image.fromarray(img).resize((size, size), resample=Image.Resampling.BILINEAR)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def crop_square(
    image: np.ndarray, bbox: BBox | tuple[int, int, int, int], *, margin: int, min_size: int, patch_size: int
) -> np.ndarray:
    """Crop the square around a lesion box, pad with 0 off the image, resize to `patch_size`.

    Args:
        image: 2-D float image in [0, 1] (the whole mammogram).
        bbox: lesion box `(x0, y0, x1, y1)`, half-open pixel indices (x = column).
        margin: px added on every side of the box.
        min_size: smallest side of the square, px.
        patch_size: side of the returned patch, px.

    Returns:
        float32 (patch_size, patch_size) in [0, 1], the box centre at the patch centre.
    """
    img = _check_image(image)
    box = BBox(*map(int, bbox))
    H, W = img.shape
    if box.x1 <= 0 or box.y1 <= 0 or box.x0 >= W or box.y0 >= H:
        raise DataError(f"bounding box {tuple(box)} (x0, y0, x1, y1) lies outside the {H}x{W} image")
    win = square_window(box, margin=margin, min_size=min_size)
    side = win.x1 - win.x0
    # Off-image parts of the square stay 0 (background): padding, never shifting the window.
    canvas = np.zeros((side, side), dtype=np.float32)
    r0, r1 = max(win.y0, 0), min(win.y1, H)
    c0, c1 = max(win.x0, 0), min(win.x1, W)
    canvas[r0 - win.y0 : r1 - win.y0, c0 - win.x0 : c1 - win.x0] = img[r0:r1, c0:c1]
    return resize_patch(canvas, patch_size)


def extract_patch(
    image: np.ndarray,
    mask: np.ndarray,
    *,
    margin: int,
    min_size: int,
    patch_size: int,
    per_region: bool = False,
    closing: int = 5,
) -> list[np.ndarray]:
    """Patches of a lesion given its mask.

    Args:
        image: 2-D float image in [0, 1].
        mask: boolean mask of the same shape.
        margin: px added on every side of the box.
        min_size: smallest square side, px.
        patch_size: output side, px.
        per_region: one patch per connected region (True) or one per lesion (False, what
            `prepare` uses: one patch per annotated abnormality).
        closing: structuring element side for the morphological closing, px.

    Returns:
        float32 patches (patch_size, patch_size) in [0, 1].

    Raises:
        DataError: shapes differ or the mask is empty.
    """
    img = _check_image(image)
    m = np.asarray(mask, dtype=bool)
    if m.shape != img.shape:
        raise DataError(f"mask shape {m.shape} differs from image shape {img.shape}")
    boxes = lesion_bboxes(m, per_region=per_region, closing=closing)
    if not boxes:
        raise DataError("lesion mask is empty")
    return [crop_square(img, b, margin=margin, min_size=min_size, patch_size=patch_size) for b in boxes]


__all__ = [
    "BBox",
    "PatchGeometry",
    "ImagePatches",
    "close_mask",
    "lesion_bboxes",
    "square_window",
    "resize_patch",
    "crop_square",
    "extract_patch",
]
