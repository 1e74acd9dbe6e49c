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
from mammodp.serving import decode_image, limits_of, parse_roi, request_to_patches

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
        decode_image(b"", limits_of({}))


# --------------------------------------------------------------------------- limits (checked before decoding)

LIMITED = {**META, "serve": {"max_image_pixels": 10_000, "max_roi_side": 50, "max_rows": 3}}


def png_header_only(width: int, height: int) -> bytes:
    """PNG bytes whose header claims width x height (the pixel data is a few rows only)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1) * 4))
            + chunk(b"IEND", b""))


def test_limits_come_from_the_model_meta_with_params_defaults():
    from mammodp.config import ServeConfig

    assert limits_of(LIMITED).max_rows == 3 and limits_of(LIMITED).max_image_pixels == 10_000
    assert limits_of(META) == ServeConfig()  # a model saved before the limits existed


@pytest.mark.parametrize(("frame", "message"), [
    (pd.DataFrame({"image": [b64(png_header_only(200, 100))]}), "row 0: image: 100x200 = 20,000 pixels is above"),
    (pd.DataFrame({"pixels": [np.zeros((101, 100)).tolist()]}), "row 0: pixels: 101x100 = 10,100 pixels is above"),
    (pd.DataFrame({"image": [b64(png_bytes(np.zeros((20, 20))))], "roi": [[0, 0, 51, 10]]}),
     "row 0: roi: box of 51x10 px has a side above this model's limit of 50 px (serve.max_roi_side)"),
    (pd.DataFrame({"image": [b64(png_bytes(np.zeros((20, 20))))], "roi": [[0, 0, 2e9, 2e9]]}), "serve.max_roi_side"),
    (pd.DataFrame({"pixels": [np.zeros((4, 4)).tolist()] * 4}), "4 rows, above this model's limit of 3 rows"),
    (pd.DataFrame({"image": ["A" * 2_000_000]}), "bytes, above this model's limit"),
])
def test_requests_over_a_limit_name_the_row_field_and_limit(frame, message):
    with pytest.raises(ServingError) as err:
        request_to_patches(frame, LIMITED)
    assert message in str(err.value)


def test_a_bomb_is_refused_from_its_header_without_decoding(monkeypatch):
    import mammodp.serving as serving

    def never(*args, **kwargs):
        raise AssertionError("decoded an image over the limit")

    monkeypatch.setattr(serving, "decode_image_bytes", never)
    with pytest.raises(ServingError, match="serve.max_image_pixels"):
        request_to_patches(pd.DataFrame({"image": [b64(png_header_only(20000, 20000))]}), META)


def test_a_multi_frame_dicom_counts_every_frame(tmp_path, make_dicom):
    from pydicom import dcmread

    path = make_dicom(tmp_path / "f.dcm", np.zeros((50, 50), np.uint16))
    ds = dcmread(path)
    ds.NumberOfFrames = 5  # 5 x 2500 pixels > 10,000: refused from the header
    ds.save_as(path)
    with pytest.raises(ServingError, match=r"50x50 x 5 frames = 12,500 pixels is above"):
        request_to_patches(pd.DataFrame({"image": [b64(path.read_bytes())]}), LIMITED)


def test_pils_decompression_bomb_error_is_a_4xx_not_a_crash():
    """Under a generous model limit, PIL's own bomb guard still fires: it becomes a ServingError."""
    generous = {**META, "serve": {"max_image_pixels": 10**9, "max_roi_side": 4096, "max_rows": 4}}
    with pytest.raises(ServingError, match="decodes to more pixels than allowed"):
        request_to_patches(pd.DataFrame({"image": [b64(png_header_only(20000, 20000))]}), generous)


def test_a_box_outside_the_image_is_refused_from_the_header():
    with pytest.raises(ServingError, match=r"row 0: roi: .* lies outside the 100x200 image"):
        request_to_patches(pd.DataFrame({"image": [b64(png_header_only(200, 100))], "roi": [[300, 0, 310, 10]]}),
                           META)


def test_messages_never_echo_the_payload():
    secret = b64(b"SECRET-PATIENT-BYTES " * 20)
    for frame in (pd.DataFrame({"image": [secret]}), pd.DataFrame({"image": [secret], "roi": ["{" + secret]}),
                  pd.DataFrame({"image": ["%" + secret]})):
        with pytest.raises(ServingError) as err:
            request_to_patches(frame, META)
        assert secret[:12] not in str(err.value) and "SECRET" not in str(err.value), str(err.value)


def test_wrong_columns_are_explained():
    with pytest.raises(ServingError) as err:
        request_to_patches(pd.DataFrame(index=[0]), META)  # what MLflow hands over after dropping `img`
    msg = str(err.value)
    assert "image, roi, pixels" in msg and "dropped" in msg and "got columns: none" not in msg
