"""HTTP request parsing for the served classifier: columns, base64, boxes, limits, 4xx messages.

A request (the DataFrame MLflow's scoring server hands the pyfunc, or an array in-process)
becomes model-size patches here; decoding, cropping and prediction are the one inference
path of `mammodp.inference`. Every client fault is a `ServingError` naming the row, the field
and, for sizes, the limit; no reply echoes the payload (not even a few bytes of it).

Limits (`ServeLimits`, from the `serve` entry of the model's `meta.json`, written at training
time from params `serve.*`) are checked BEFORE anything is decoded, from the base64 length
and the image's own header (PNG IHDR, DICOM Rows/Columns/NumberOfFrames, or PIL's lazy open
for other formats), so a small compressed bomb never reaches the decoder:
- `max_rows`: patches per request;
- `max_image_pixels`: rows x columns (x frames) of one image, and of one `pixels` patch;
  the encoded bytes are bounded by 4 bytes per allowed pixel (+1 MiB of header);
- `max_roi_side`: the larger side of an `roi` box, in pixels (the crop square grows with it).

Nothing here imports MLflow: `mammodp.pyfunc_model` wraps this for `mlflow models serve`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import re
import struct
from dataclasses import fields
from typing import Any

import numpy as np

from mammodp.config import ServeConfig as ServeLimits  # one definition of the limits and their defaults
from mammodp.errors import DataError, MammoDPError, ServingError
from mammodp.inference import (
    IMAGE_COL,
    INPUT_COLUMNS,
    PIXELS_COL,
    ROI_COL,
    decode_image_bytes,
    image_to_patch,
    is_dicom,
)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HEADER_SLACK_BYTES = 1 << 20  # DICOM headers and PNG ancillary chunks on top of the pixels
_BYTES_PER_PIXEL = 4  # the most an uncompressed greyscale image needs (32-bit); 16-bit needs 2


def limits_of(meta: dict) -> ServeLimits:
    """The limits a saved classifier was trained with (`meta["serve"]`; params' defaults if absent)."""
    saved = meta.get("serve") or {}
    known = {f.name: int(saved[f.name]) for f in fields(ServeLimits) if f.name in saved}
    return ServeLimits(**known)


def max_image_bytes(limits: ServeLimits) -> int:
    """Largest decoded byte string one `image` cell may carry."""
    return _BYTES_PER_PIXEL * limits.max_image_pixels + _HEADER_SLACK_BYTES


def _scrub(text: str, limit: int = 160) -> str:
    """A decoder's reason without anything it quoted from the payload (bytes, strings, reprs)."""
    text = re.sub(r"b?'[^']*'|b?\"[^\"]*\"|<[^>]*>", "...", str(text))
    text = "".join(ch if ch.isprintable() else " " for ch in text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- cells


def decode_base64(text: Any, limits: ServeLimits | None = None) -> bytes:
    """Base64 text (whitespace and a `data:...;base64,` prefix tolerated) to bytes.

    Raises:
        ServingError: not a string, not valid base64, or more bytes than the limits allow
            (checked from the text's length, before decoding).
    """
    if not isinstance(text, str):
        raise ServingError(f"must be a base64 string, got {type(text).__name__}", field=IMAGE_COL)
    s = text.strip()
    if s.startswith("data:") and "," in s:
        s = s.split(",", 1)[1]
    if limits is not None:
        n_bytes = len(s) * 3 // 4  # an upper bound: whitespace only shrinks it
        if n_bytes > max_image_bytes(limits):
            raise ServingError(
                f"carries about {n_bytes:,} bytes, above this model's limit of {max_image_bytes(limits):,} bytes "
                f"({_BYTES_PER_PIXEL} per pixel of serve.max_image_pixels = {limits.max_image_pixels:,})",
                field=IMAGE_COL)
    s = "".join(s.split())  # `base64` wraps lines at 76 characters by default
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServingError(f"is not valid base64 ({_scrub(exc)})", field=IMAGE_COL) from exc


def parse_roi(value: Any, limits: ServeLimits | None = None):
    """An `roi` cell to a `BBox`, or None when the cell is empty (a patch, not a full image).

    Accepts a list/tuple/array of 4 integers `[x0, y0, x1, y1]` (half-open pixel box, x =
    column) or the same as JSON text.

    Raises:
        ServingError: anything else, or a box side above `limits.max_roi_side`.
    """
    from mammodp.data.patches import BBox

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        if len(value) > 200:
            raise ServingError("is not a box [x0, y0, x1, y1] (too long)", field=ROI_COL)
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ServingError("is not JSON [x0, y0, x1, y1]", field=ROI_COL) from exc
    try:
        flat = np.asarray(value, dtype=object).reshape(-1)
        if flat.size != 4:
            raise ServingError(f"must be 4 integers [x0, y0, x1, y1], got {flat.size} values", field=ROI_COL)
        box = [float(v) for v in flat]
    except (TypeError, ValueError, OverflowError) as exc:
        raise ServingError("must be 4 numbers [x0, y0, x1, y1]", field=ROI_COL) from exc
    if not all(math.isfinite(v) and v == int(v) for v in box):
        raise ServingError(f"must be 4 integers [x0, y0, x1, y1], got {box}", field=ROI_COL)
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ServingError(f"must satisfy x0 < x1 and y0 < y1, got {[x0, y0, x1, y1]}", field=ROI_COL)
    if limits is not None and max(x1 - x0, y1 - y0) > limits.max_roi_side:
        raise ServingError(f"box of {x1 - x0}x{y1 - y0} px has a side above this model's limit of "
                           f"{limits.max_roi_side} px (serve.max_roi_side)", field=ROI_COL)
    return BBox(x0, y0, x1, y1)


def check_patch_array(value: Any, what: str = PIXELS_COL, limits: ServeLimits | None = None) -> np.ndarray:
    """A patch given as numbers to float32 (H, W) in [0, 1]; (1, H, W) is squeezed.

    Raises:
        ServingError: ragged, not numeric, not 2-D, too large, not finite or outside [0, 1].
    """
    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ServingError("must be a rectangular 2-D array of numbers", field=what) from exc
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ServingError(f"must be a 2-D patch (H, W) or (1, H, W), got shape {arr.shape}", field=what)
    if limits is not None and arr.size > limits.max_image_pixels:
        raise ServingError(f"{arr.shape[0]}x{arr.shape[1]} = {arr.size:,} pixels is above this model's limit of "
                           f"{limits.max_image_pixels:,} pixels (serve.max_image_pixels)", field=what)
    if not np.isfinite(arr).all():
        raise ServingError("holds non-finite values", field=what)
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise ServingError(f"values must lie in [0, 1], got [{arr.min():.4g}, {arr.max():.4g}]", field=what)
    return arr


# --------------------------------------------------------------------------- image sizes


def image_size(data: bytes) -> tuple[int, int, int]:
    """(rows, columns, frames) of PNG, DICOM or other PIL-readable bytes, from the header only.

    Raises:
        ServingError: the header is unreadable (not PNG, DICOM or an image format PIL knows).
    """
    if is_dicom(data):
        from mammodp.data.dicom import read_header

        try:
            h = read_header(io.BytesIO(data))
        except MammoDPError as exc:
            raise ServingError(f"is not a readable DICOM ({_scrub(_reason(exc))})", field=IMAGE_COL) from exc
        return h.rows, h.columns, h.frames * h.samples_per_pixel
    if data[:8] == _PNG_SIGNATURE and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return height, width, 1
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # lazy: reads the header, decodes nothing
            width, height = im.size
            frames = int(getattr(im, "n_frames", 1) or 1)
    except Image.DecompressionBombError as exc:
        raise ServingError(f"is a decompression bomb ({_scrub(exc)})", field=IMAGE_COL) from exc
    except (OSError, ValueError, SyntaxError, struct.error) as exc:
        raise ServingError("is not a readable PNG (PIL cannot identify the image); send base64 PNG or DICOM bytes",
                           field=IMAGE_COL) from exc
    return height, width, frames


def _reason(exc: MammoDPError) -> str:
    text = str(exc)
    for prefix in (exc.path, exc.field):
        if prefix is not None and text.startswith(f"{prefix}: "):
            return text[len(prefix) + 2 :]
    return text


def check_image_size(data: bytes, limits: ServeLimits, box=None) -> tuple[int, int]:
    """Refuse an image (and its box) over the limits before it is decoded; returns (rows, columns).

    Raises:
        ServingError: more pixels than `limits.max_image_pixels`, or a box outside the image.
    """
    rows, cols, frames = image_size(data)
    pixels = rows * cols * max(frames, 1)
    if pixels > limits.max_image_pixels:
        more = f" x {frames} frames" if frames > 1 else ""
        raise ServingError(f"{rows}x{cols}{more} = {pixels:,} pixels is above this model's limit of "
                           f"{limits.max_image_pixels:,} pixels (serve.max_image_pixels)", field=IMAGE_COL)
    if box is not None and (box.x1 <= 0 or box.y1 <= 0 or box.x0 >= cols or box.y0 >= rows):
        raise ServingError(f"bounding box {tuple(box)} (x0, y0, x1, y1) lies outside the {rows}x{cols} image",
                           field=ROI_COL)
    return rows, cols


def decode_image(data: bytes, limits: ServeLimits, box=None) -> np.ndarray:
    """Checked decode of an `image` cell's bytes: sizes first, then the one decoder.

    Raises:
        ServingError: empty, over a limit, or undecodable (without echoing the bytes).
    """
    from PIL import Image

    if not data:
        raise ServingError("is empty", field=IMAGE_COL)
    check_image_size(data, limits, box)
    try:
        img = decode_image_bytes(data, full_image=box is not None)
    except Image.DecompressionBombError as exc:
        raise ServingError(f"decodes to more pixels than allowed ({_scrub(exc)}; serve.max_image_pixels = "
                           f"{limits.max_image_pixels:,})", field=IMAGE_COL) from exc
    except DataError as exc:
        raise ServingError(f"{_scrub(str(exc), 300)}; send base64 PNG or DICOM bytes", field=IMAGE_COL) from exc
    if img.size > limits.max_image_pixels:  # the header lied: refuse what slipped through
        raise ServingError(f"decoded to {img.shape[0]}x{img.shape[1]} pixels, above this model's limit of "
                           f"{limits.max_image_pixels:,} pixels (serve.max_image_pixels)", field=IMAGE_COL)
    return img


# --------------------------------------------------------------------------- requests


def _present(value: Any) -> bool:
    """False for the missing cells pandas makes when a row lacks a column."""
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return True


def _to_patch(img: np.ndarray, meta: dict, box=None) -> np.ndarray:
    try:
        return image_to_patch(img, meta, box)
    except DataError as exc:
        raise ServingError(str(exc), field=ROI_COL) from exc


def request_to_patches(model_input: Any, meta: dict) -> np.ndarray:
    """Turn a request into model-size patches (N, 1, P, P) float32 in [0, 1].

    Accepted inputs:
    - a DataFrame, one patch per row, with either
      - `image`: base64 PNG or DICOM bytes of a patch, or of a full mammogram together with
        `roi` = [x0, y0, x1, y1] (list or JSON text), which is cropped like `prepare` does; or
      - `pixels`: the patch itself as a 2-D float array in [0, 1] (the tensor route);
    - an array (N, 1, H, W) or (N, H, W) of floats in [0, 1] (in-process callers).
    Patches of another size are resized to the model's patch size. The model's limits
    (`limits_of(meta)`) are checked before anything is decoded.

    Args:
        model_input: the request.
        meta: the saved classifier's meta.

    Returns:
        float32 (N, 1, P, P).

    Raises:
        ServingError: too many rows, a missing column, an image or box over a limit, an
            undecodable image, a bad box or a wrong shape, naming the row and field.
    """
    import pandas as pd

    size = int(meta["patch_size"])
    limits = limits_of(meta)
    n_rows = len(model_input) if hasattr(model_input, "__len__") else 0
    if n_rows > limits.max_rows:
        raise ServingError(f"request has {n_rows} rows, above this model's limit of {limits.max_rows} rows per "
                           "request (serve.max_rows); send them in several requests", field="rows")
    if isinstance(model_input, pd.DataFrame):
        cols = [str(c) for c in model_input.columns]
        if IMAGE_COL not in cols and PIXELS_COL not in cols:
            got = ", ".join(cols) or "none that this model reads"
            raise ServingError(
                f"request needs an `{IMAGE_COL}` column (base64 PNG or DICOM) or a `{PIXELS_COL}` column "
                f"(2-D float patch in [0, 1]); the model's columns are {', '.join(INPUT_COLUMNS)} and a column "
                f"with any other name is dropped by MLflow's schema before the model sees it (got: {got})",
                field=IMAGE_COL)
        out = []
        for i, row in enumerate(model_input.to_dict(orient="records")):
            image, pixels, roi = row.get(IMAGE_COL), row.get(PIXELS_COL), row.get(ROI_COL)
            try:
                if _present(image):
                    box = parse_roi(roi, limits)
                    img = decode_image(decode_base64(image, limits), limits, box)
                    patch = _to_patch(img, meta, box)
                elif _present(pixels):
                    patch = _to_patch(check_patch_array(pixels, limits=limits), meta)
                else:
                    raise ServingError(f"holds neither `{IMAGE_COL}` nor `{PIXELS_COL}`")
            except ServingError as exc:
                raise ServingError(f"row {i}: {exc}") from exc
            out.append(patch[None].astype(np.float32))
        return np.stack(out) if out else np.zeros((0, 1, size, size), np.float32)

    try:
        arr = np.asarray(model_input, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ServingError("must be a rectangular float array", field="inputs") from exc
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1] != 1:
        raise ServingError(f"a tensor of patches must be (N, 1, H, W) or (N, H, W), got {arr.shape}", field="inputs")
    if len(arr) > limits.max_rows:
        raise ServingError(f"request has {len(arr)} patches, above this model's limit of {limits.max_rows} "
                           "(serve.max_rows)", field="inputs")
    patches = [_to_patch(check_patch_array(a[0], "inputs", limits), meta)[None] for a in arr]
    return np.stack(patches).astype(np.float32) if patches else np.zeros((0, 1, size, size), np.float32)


__all__ = [
    "ServeLimits",
    "limits_of",
    "max_image_bytes",
    "decode_base64",
    "parse_roi",
    "check_patch_array",
    "image_size",
    "check_image_size",
    "decode_image",
    "request_to_patches",
]
