"""Request decoding in-process: the served preprocessing equals the training preprocessing."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mammodp.data.dicom import read_dicom
from mammodp.data.imageio import load_patch, save_patch, to_uint16
from mammodp.data.patches import crop_square
from mammodp.errors import ServingError
from mammodp.serving import decode_image_bytes, parse_roi, request_to_patches

META = {"patch_size": 32, "margin": 4, "min_size": 16}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(to_uint16(arr)).save(buf, format="PNG")
    return buf.getvalue()


def test_stored_patch_round_trips_bit_identical(tmp_path):
    """A patch PNG as `prepare` stores it is served exactly as training loads it."""
    rng = np.random.default_rng(0)
    save_patch(tmp_path / "p.png", rng.uniform(0.1, 0.9, (32, 32)))
    expected = load_patch(tmp_path / "p.png")
    got = request_to_patches(pd.DataFrame({"image": [b64((tmp_path / "p.png").read_bytes())]}), META)
    assert got.shape == (1, 1, 32, 32) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0, 0], expected)


def test_full_png_with_roi_is_cropped_like_prepare():
    rng = np.random.default_rng(1)
    raw = (rng.uniform(0.2, 0.7, (120, 90)) * 65535).astype(np.uint16)
    got = request_to_patches(pd.DataFrame({"image": [b64(png_bytes(raw))], "roi": [[20, 30, 50, 70]]}), META)
    scaled = (raw - raw.min()) / float(raw.max() - raw.min())  # prepare min-max scales the whole image
    expected = crop_square(scaled.astype(np.float32), (20, 30, 50, 70), margin=4, min_size=16, patch_size=32)
    np.testing.assert_allclose(got[0, 0], expected, atol=1e-6)


def test_dicom_full_image_with_roi_uses_the_one_decoder(tmp_path, make_dicom):
    rng = np.random.default_rng(2)
    path = make_dicom(tmp_path / "mammo.dcm", rng.integers(0, 4000, (100, 80), dtype=np.uint16),
                      photometric="MONOCHROME1")
    expected = crop_square(read_dicom(path), (10, 10, 40, 50), margin=4, min_size=16, patch_size=32)
    frame = pd.DataFrame({"image": [b64(path.read_bytes())], "roi": [json.dumps([10, 10, 40, 50])]})
    np.testing.assert_allclose(request_to_patches(frame, META)[0, 0], expected, atol=1e-6)


def test_pixels_and_tensor_routes_resize_to_the_patch_size():
    rng = np.random.default_rng(3)
    patch = rng.uniform(0, 1, (48, 48)).astype(np.float32)
    by_col = request_to_patches(pd.DataFrame({"pixels": [patch.tolist()]}), META)
    by_tensor = request_to_patches(patch[None, None], META)
    assert by_col.shape == by_tensor.shape == (1, 1, 32, 32)
    np.testing.assert_array_equal(by_col, by_tensor)


def test_rows_mix_patches_and_full_images():
    rng = np.random.default_rng(4)
    frame = pd.DataFrame({
        "image": [b64(png_bytes(rng.uniform(0, 1, (32, 32)))), b64(png_bytes(rng.uniform(0, 1, (64, 64))))],
        "roi": [None, [5, 5, 20, 20]],
    })
    assert request_to_patches(frame, META).shape == (2, 1, 32, 32)


@pytest.mark.parametrize(("frame", "message"), [
    (pd.DataFrame({"foo": [1]}), "needs an `image` column"),
    (pd.DataFrame({"image": ["%%% not base64"]}), "row 0: image: is not valid base64"),
    (pd.DataFrame({"image": [b64(b"hello, not an image")]}), "row 0: image: is not a readable PNG"),
    (pd.DataFrame({"image": [b64(b"\0" * 128 + b"DICM" + b"\1" * 40)]}), "row 0: image: is not a readable DICOM"),
    (pd.DataFrame({"image": [b64(png_bytes(np.zeros((40, 40))))], "roi": [[1, 2, 3]]}), "roi: must be 4 integers"),
    (pd.DataFrame({"image": [b64(png_bytes(np.zeros((40, 40))))], "roi": [[90, 90, 99, 99]]}), "lies outside"),
    (pd.DataFrame({"pixels": [[0.1, 0.2, 0.3]]}), "must be a 2-D patch"),
    (pd.DataFrame({"pixels": [[[0.1, 2.0], [0.3, 0.4]]]}), "values must lie in [0, 1]"),
    (pd.DataFrame({"pixels": [[[0.1, 0.2], [0.3]]]}), "rectangular"),
    (pd.DataFrame({"image": [None], "pixels": [None]}), "holds neither"),
])
def test_bad_requests_raise_serving_error_with_the_row(frame, message):
    with pytest.raises(ServingError) as err:
        request_to_patches(frame, META)
    assert message in str(err.value)


def test_bad_tensor_shape_is_rejected():
    with pytest.raises(ServingError, match=r"\(N, 1, H, W\)"):
        request_to_patches(np.zeros((2, 3, 8, 8), np.float32), META)


def test_roi_parsing():
    assert parse_roi(None) is None and parse_roi(float("nan")) is None and parse_roi("") is None
    assert tuple(parse_roi("[1, 2, 3, 4]")) == (1, 2, 3, 4)
    assert tuple(parse_roi(np.array([1, 2, 3, 4]))) == (1, 2, 3, 4)
    for bad in ("[4, 2, 3, 4]", "[1.5, 2, 3, 4]", "{", [1, 2]):
        with pytest.raises(ServingError):
            parse_roi(bad)


def test_empty_bytes_are_rejected():
    with pytest.raises(ServingError, match="empty"):
        decode_image_bytes(b"")
