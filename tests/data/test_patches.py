"""Patch geometry: the lesion sits at the patch centre, also at the image border."""

from __future__ import annotations

import numpy as np
import pytest

from mammodp.data.patches import BBox, crop_square, extract_patch, lesion_bboxes, square_window
from mammodp.errors import DataError

H, W = 120, 90


def disk(cy: float, cx: float, r: float, shape=(H, W)) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def centroid(patch: np.ndarray) -> tuple[float, float]:
    w = patch.astype(np.float64)
    yy, xx = np.mgrid[: w.shape[0], : w.shape[1]]
    return float((w * yy).sum() / w.sum()), float((w * xx).sum() / w.sum())


@pytest.mark.parametrize(
    "cy, cx",
    [
        (60.0, 45.0),  # middle
        (6.0, 45.0),  # top border
        (113.0, 45.0),  # bottom border
        (60.0, 5.0),  # left border
        (60.0, 84.0),  # right border
        (6.0, 6.0),  # top-left corner (where the reference code shifted crops)
        (113.0, 84.0),  # bottom-right corner
    ],
)
def test_lesion_centroid_is_at_patch_centre(cy, cx):
    mask = disk(cy, cx, 5.0)
    image = mask.astype(np.float32)  # bright lesion on black: the patch centroid is the lesion's
    (patch,) = extract_patch(image, mask, margin=10, min_size=40, patch_size=32)
    assert patch.shape == (32, 32) and patch.dtype == np.float32
    py, px = centroid(patch)
    assert abs(py - 15.5) <= 1.0 and abs(px - 15.5) <= 1.0


def test_off_image_part_is_padded_not_shifted():
    image = np.ones((H, W), np.float32)
    patch = crop_square(image, BBox(0, 0, 10, 10), margin=10, min_size=30, patch_size=30)
    # The 30 px window centred on the box starts 10 px above/left of the image: zero padding.
    assert patch[:8, :].max() == 0.0 and patch[:, :8].max() == 0.0
    assert patch[12:, 12:].min() == 1.0


def test_square_window_size_and_centre():
    win = square_window(BBox(10, 20, 30, 60), margin=5, min_size=16)  # w 20, h 40
    assert win.x1 - win.x0 == win.y1 - win.y0 == 50
    assert (win.x0 + win.x1) / 2 == 20 and (win.y0 + win.y1) / 2 == 40
    small = square_window(BBox(10, 10, 12, 12), margin=1, min_size=32)
    assert small.x1 - small.x0 == 32 and (small.x0 + small.x1) / 2 == 11


def test_bbox_order_is_x_then_y():
    image = np.zeros((H, W), np.float32)
    image[100:110, 10:20] = 1.0  # rows 100-109, columns 10-19
    patch = crop_square(image, (10, 100, 20, 110), margin=0, min_size=10, patch_size=10)
    assert patch.min() == pytest.approx(1.0)


def test_closing_merges_a_split_outline_and_specks_are_ignored():
    mask = np.zeros((H, W), bool)
    mask[40:60, 30:40] = True
    mask[40:60, 42:52] = True  # a 2 px gap: one lesion after closing
    mask[5, 5] = True  # annotation speck
    assert lesion_bboxes(mask) == [BBox(30, 40, 52, 60)]
    assert len(lesion_bboxes(mask, per_region=True)) == 2  # the speck and the closed lesion
    assert len(extract_patch(mask.astype(np.float32), mask, margin=2, min_size=8, patch_size=16, per_region=True)) == 2


def test_closing_keeps_lesions_touching_the_border():
    mask = np.zeros((H, W), bool)
    mask[0:10, 0:10] = True
    assert lesion_bboxes(mask) == [BBox(0, 0, 10, 10)]


def test_downscaling_is_antialiased():
    stripes = np.zeros((128, 128), np.float32)
    stripes[:, ::2] = 1.0  # 1 px stripes alias to pure black or white without a low-pass filter
    patch = crop_square(stripes, BBox(0, 0, 128, 128), margin=0, min_size=1, patch_size=16)
    assert np.allclose(patch, 0.5, atol=0.05)


def test_empty_mask_and_shape_mismatch_raise():
    image = np.zeros((H, W), np.float32)
    with pytest.raises(DataError, match="empty"):
        extract_patch(image, np.zeros((H, W), bool), margin=1, min_size=8, patch_size=16)
    with pytest.raises(DataError, match="shape"):
        extract_patch(image, np.zeros((H, W + 1), bool), margin=1, min_size=8, patch_size=16)
