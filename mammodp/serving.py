"""Saved classifiers and the one inference path: training, evaluation, tuning and serving.

A saved classifier is a folder with `weights.pt` (state dict) and `meta.json` (preset, mode,
patch geometry, threshold, epsilon...). `predict_proba` is the only function that runs the
model on patches. Serving requests are turned into patches here, with the same pieces that
`mammodp prepare` uses, so that a served image meets exactly the preprocessing of training:

- decoding: `mammodp.data.dicom.read_dicom` for DICOM (min-max of the whole image), the
  BCDR reader `mammodp.data.bcdr.read_image` for a full non-DICOM mammogram (min-max of the
  whole image) and `mammodp.data.imageio.load_patch` for a stored-style PNG patch;
- cropping: `mammodp.data.patches.crop_square` (square around the box, margin, min size,
  zero padding off the image), with the geometry saved in `meta.json` at training time;
- resizing: `mammodp.data.patches.resize_patch`;
- normalisation: inside the model (`mammodp.models.swin`), fed patches in [0, 1].

Nothing here imports MLflow: `mammodp.pyfunc_model` wraps this for `mlflow models serve`.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

MODEL_META = "meta.json"
MODEL_WEIGHTS = "weights.pt"

# Request columns (see `request_to_patches`).
IMAGE_COL = "image"  # base64 PNG or DICOM bytes: a patch, or a full mammogram with `roi`
ROI_COL = "roi"  # [x0, y0, x1, y1] lesion box in the full image's pixels (list or JSON text)
PIXELS_COL = "pixels"  # a patch as a 2-D float array in [0, 1]: the tensor route

# DICOM Part 10 files carry "DICM" after a 128-byte preamble.
_DICOM_MAGIC_OFFSET = 128


def save_classifier(model, meta: dict[str, Any], out_dir: str | Path) -> Path:
    """Write a classifier's weights and metadata (preset, mode, patch size, epsilon...) to a folder.

    Args:
        model: the trained classifier (its state dict is saved).
        meta: JSON-serialisable facts needed to rebuild and describe it; must hold `preset`,
            `mode` and `patch_size` (and `margin`, `min_size` for serving full mammograms).
        out_dir: folder to write `weights.pt` and `meta.json` into.

    Returns:
        The folder.
    """
    import torch

    from mammodp.io import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, out / MODEL_WEIGHTS)
    write_json(out / MODEL_META, meta)
    return out


def load_classifier(model_dir: str | Path):
    """Rebuild a classifier saved by `save_classifier`.

    Args:
        model_dir: folder holding `meta.json` and `weights.pt`.

    Returns:
        (model in eval mode on the CPU, meta dict).

    Raises:
        DataError: the folder is not a saved classifier.
    """
    import torch

    from mammodp.errors import DataError
    from mammodp.models.swin import create_classifier

    d = Path(model_dir)
    if not (d / MODEL_META).is_file() or not (d / MODEL_WEIGHTS).is_file():
        raise DataError("not a saved mammodp classifier (needs meta.json and weights.pt)", path=d)
    meta = json.loads((d / MODEL_META).read_text())
    model = create_classifier(meta["preset"], pretrained_weights=None, mode=meta["mode"])
    model.load_state_dict(torch.load(d / MODEL_WEIGHTS, map_location="cpu", weights_only=True))
    model.eval()
    return model, meta


def predict_proba(model, images: np.ndarray, batch_size: int = 256, device: str = "cpu") -> np.ndarray:
    """P(malignant) for patches (N, 1, H, W) float32 in [0, 1]: the one inference path.

    Args:
        model: a classifier from `mammodp.models.swin.create_classifier`.
        images: (N, 1, H, W) float32 in [0, 1].
        batch_size: patches per forward pass.
        device: torch device the model lives on.

    Returns:
        (N,) float32 probabilities of the malignant class.
    """
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.as_tensor(images[i : i + batch_size], dtype=torch.float32, device=device)
            out.append(torch.softmax(model(x).float(), dim=1)[:, 1].cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def epsilon_text(eps: float | str | None) -> str:
    """Epsilon as served: a number, or `inf` for a non-private model (`unknown` if absent)."""
    if eps is None:
        return "unknown"
    if isinstance(eps, str):
        return eps
    return "inf" if math.isinf(eps) else f"{eps:.4g}"


# --------------------------------------------------------------------------- decoding


def _bare(exc: Exception) -> str:
    """A domain error's message without its (temporary) file prefix."""
    text = str(exc)
    path = getattr(exc, "path", None)
    return text.removeprefix(f"{path}: ") if path else text


def is_dicom(data: bytes) -> bool:
    """True for DICOM Part 10 bytes (`DICM` after the 128-byte preamble)."""
    return data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM"


def decode_image_bytes(data: bytes, *, full_image: bool = False) -> np.ndarray:
    """Decode PNG (8/16-bit; any greyscale format PIL reads) or DICOM bytes to float32 [0, 1] (H, W).

    The project's own readers do the work (they take paths, so the bytes go through a
    temporary file): DICOM through `read_dicom`, which min-max scales the whole image as
    `prepare` does; a full non-DICOM mammogram (`full_image`) through the BCDR reader, also
    min-max of the whole image; a non-DICOM patch through `load_patch`, the reader training
    used for the stored patches (bit-depth scaling, no min-max, so a stored patch comes back
    bit-identical).

    Args:
        data: the raw file bytes.
        full_image: the bytes are a whole mammogram that will be cropped with an ROI.

    Returns:
        float32 (H, W) in [0, 1].

    Raises:
        ServingError: the bytes are not a readable greyscale PNG or DICOM.
    """
    from mammodp.errors import MammoDPError, ServingError

    if not data:
        raise ServingError("is empty", field=IMAGE_COL)
    dicom = is_dicom(data)
    with tempfile.TemporaryDirectory(prefix="mammodp-serve-") as tmp:
        path = Path(tmp) / ("image.dcm" if dicom else "image.png")
        path.write_bytes(data)
        try:
            if dicom:
                from mammodp.data.dicom import read_dicom

                img = read_dicom(path)
            elif full_image:
                from mammodp.data.bcdr import read_image

                img = read_image(path)
            else:
                from mammodp.data.imageio import load_patch

                img = load_patch(path)
        except MammoDPError as exc:
            kind = "DICOM" if dicom else "PNG"
            reason = _bare(exc).replace(str(path), "the image")  # the temp path means nothing to a client
            raise ServingError(f"is not a readable {kind} ({reason}); send base64 PNG or DICOM bytes",
                               field=IMAGE_COL) from exc
    if img.ndim != 2:
        raise ServingError(f"must be a 2-D greyscale image, got shape {img.shape}", field=IMAGE_COL)
    return img


def decode_base64(text: Any) -> bytes:
    """Base64 text (whitespace and a `data:...;base64,` prefix tolerated) to bytes.

    Raises:
        ServingError: not a string or not valid base64.
    """
    from mammodp.errors import ServingError

    if not isinstance(text, str):
        raise ServingError(f"must be a base64 string, got {type(text).__name__}", field=IMAGE_COL)
    s = text.strip()
    if s.startswith("data:") and "," in s:
        s = s.split(",", 1)[1]
    s = "".join(s.split())  # `base64` wraps lines at 76 characters by default
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ServingError(f"is not valid base64 ({exc})", field=IMAGE_COL) from exc


def parse_roi(value: Any):
    """An `roi` cell to a `BBox`, or None when the cell is empty (a patch, not a full image).

    Accepts a list/tuple/array of 4 integers `[x0, y0, x1, y1]` (half-open pixel box, x =
    column) or the same as JSON text.

    Raises:
        ServingError: anything else.
    """
    from mammodp.data.patches import BBox
    from mammodp.errors import ServingError

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ServingError(f"is not JSON [x0, y0, x1, y1]: {value[:60]!r}", field=ROI_COL) from exc
    try:
        box = [float(v) for v in np.asarray(value, dtype=object).reshape(-1)]
    except (TypeError, ValueError) as exc:
        raise ServingError("must be 4 numbers [x0, y0, x1, y1]", field=ROI_COL) from exc
    if len(box) != 4 or not all(math.isfinite(v) and v == int(v) for v in box):
        raise ServingError(f"must be 4 integers [x0, y0, x1, y1], got {box}", field=ROI_COL)
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 <= x0 or y1 <= y0:
        raise ServingError(f"must satisfy x0 < x1 and y0 < y1, got {[x0, y0, x1, y1]}", field=ROI_COL)
    return BBox(x0, y0, x1, y1)


def check_patch_array(value: Any, what: str = PIXELS_COL) -> np.ndarray:
    """A patch given as numbers to float32 (H, W) in [0, 1]; (1, H, W) is squeezed.

    Raises:
        ServingError: ragged, not numeric, not 2-D, not finite or outside [0, 1].
    """
    from mammodp.errors import ServingError

    try:
        arr = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ServingError("must be a rectangular 2-D array of numbers", field=what) from exc
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ServingError(f"must be a 2-D patch (H, W) or (1, H, W), got shape {arr.shape}", field=what)
    if not np.isfinite(arr).all():
        raise ServingError("holds non-finite values", field=what)
    if arr.min() < 0.0 or arr.max() > 1.0:
        raise ServingError(f"values must lie in [0, 1], got [{arr.min():.4g}, {arr.max():.4g}]", field=what)
    return arr


def image_to_patch(image: np.ndarray, meta: dict, roi=None) -> np.ndarray:
    """The shared crop/resize: a decoded image (+ optional lesion box) to a model-size patch.

    With `roi`, the image is a full mammogram and the patch is cut exactly as `prepare` cuts
    it (`crop_square` with the margin and minimum size the model was trained with). Without
    it, the image is already a patch and is only resized (antialiased) to the patch size.

    Args:
        image: float32 (H, W) in [0, 1].
        meta: the saved classifier's meta (`patch_size`, `margin`, `min_size`).
        roi: a `BBox` in the image's pixels, or None.

    Returns:
        float32 (patch_size, patch_size) in [0, 1].

    Raises:
        ServingError: the box lies outside the image.
    """
    from mammodp.data.patches import crop_square, resize_patch
    from mammodp.errors import DataError, ServingError

    size = int(meta["patch_size"])
    if roi is None:
        return resize_patch(image, size)
    try:
        return crop_square(image, roi, margin=int(meta.get("margin", 0)), min_size=int(meta.get("min_size", 1)),
                           patch_size=size)
    except DataError as exc:
        raise ServingError(str(exc), field=ROI_COL) from exc


def _present(value: Any) -> bool:
    """False for the missing cells pandas makes when a row lacks a column."""
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return True


def request_to_patches(model_input: Any, meta: dict) -> np.ndarray:
    """Turn a request into model-size patches (N, 1, P, P) float32 in [0, 1].

    Accepted inputs:
    - a DataFrame, one patch per row, with either
      - `image`: base64 PNG or DICOM bytes of a patch, or of a full mammogram together with
        `roi` = [x0, y0, x1, y1] (list or JSON text), which is cropped like `prepare` does; or
      - `pixels`: the patch itself as a 2-D float array in [0, 1] (the tensor route);
    - an array (N, 1, H, W) or (N, H, W) of floats in [0, 1] (in-process callers).
    Patches of another size are resized to the model's patch size.

    Args:
        model_input: the request.
        meta: the saved classifier's meta.

    Returns:
        float32 (N, 1, P, P).

    Raises:
        ServingError: a missing column, undecodable image, bad box or wrong shape, with the
            row number.
    """
    import pandas as pd

    from mammodp.errors import ServingError

    size = int(meta["patch_size"])
    if isinstance(model_input, pd.DataFrame):
        cols = set(model_input.columns)
        if IMAGE_COL not in cols and PIXELS_COL not in cols:
            got = ", ".join(map(str, model_input.columns)) or "none"
            raise ServingError(f"request needs an `{IMAGE_COL}` column (base64 PNG or DICOM) or a `{PIXELS_COL}` "
                               f"column (2-D float patch in [0, 1]); got columns: {got}", field=IMAGE_COL)
        out = []
        for i, row in enumerate(model_input.to_dict(orient="records")):
            image, pixels, roi = row.get(IMAGE_COL), row.get(PIXELS_COL), row.get(ROI_COL)
            try:
                if _present(image):
                    box = parse_roi(roi)
                    img = decode_image_bytes(decode_base64(image), full_image=box is not None)
                    patch = image_to_patch(img, meta, box)
                elif _present(pixels):
                    patch = image_to_patch(check_patch_array(pixels), meta)
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
    patches = [image_to_patch(check_patch_array(a[0], "inputs"), meta)[None] for a in arr]
    return np.stack(patches).astype(np.float32) if patches else np.zeros((0, 1, size, size), np.float32)


__all__ = [
    "MODEL_META",
    "MODEL_WEIGHTS",
    "IMAGE_COL",
    "ROI_COL",
    "PIXELS_COL",
    "save_classifier",
    "load_classifier",
    "predict_proba",
    "epsilon_text",
    "is_dicom",
    "decode_image_bytes",
    "decode_base64",
    "parse_roi",
    "check_patch_array",
    "image_to_patch",
    "request_to_patches",
]
