"""Saved classifiers and the one inference path: training, evaluation, tuning and serving.

A saved classifier is a folder with `weights.pt` (state dict) and `meta.json` (preset, mode,
patch geometry, threshold, epsilon, serving limits...). `predict_proba` is the only function
that runs the model on patches. An image meets exactly the preprocessing of training:

- decoding (`decode_image_bytes`): `mammodp.data.dicom.read_dicom` for DICOM (min-max of the
  whole image), the BCDR reader `mammodp.data.bcdr.read_image` for a full non-DICOM mammogram
  (min-max of the whole image) and `mammodp.data.imageio.load_patch` for a stored-style PNG
  patch;
- cropping (`image_to_patch`): `mammodp.data.patches.crop_square` (square around the box,
  margin, min size, zero padding off the image), with the geometry saved in `meta.json` at
  training time; resizing: `mammodp.data.patches.resize_patch`;
- normalisation: inside the model (`mammodp.models.swin`), fed patches in [0, 1];
- prediction: `predict_proba`.

HTTP request parsing (base64, boxes, limits, 4xx messages) lives in `mammodp.serving`; this
module imports neither it nor MLflow, so an edit to the request parser reruns no training.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

MODEL_META = "meta.json"
MODEL_WEIGHTS = "weights.pt"

# The served model's input columns (its MLflow signature; parsed by `mammodp.serving`).
IMAGE_COL = "image"  # base64 PNG or DICOM bytes: a patch, or a full mammogram with `roi`
ROI_COL = "roi"  # [x0, y0, x1, y1] lesion box in the full image's pixels (list or JSON text)
PIXELS_COL = "pixels"  # a patch as a 2-D float array in [0, 1]: the tensor route
INPUT_COLUMNS = (IMAGE_COL, ROI_COL, PIXELS_COL)

# DICOM Part 10 files carry "DICM" after a 128-byte preamble.
_DICOM_MAGIC_OFFSET = 128


def save_classifier(model, meta: dict[str, Any], out_dir: str | Path) -> Path:
    """Write a classifier's weights and metadata (preset, mode, patch size, epsilon...) to a folder.

    Args:
        model: the trained classifier (its state dict is saved).
        meta: JSON-serialisable facts needed to rebuild and describe it; must hold `preset`,
            `mode` and `patch_size` (and `margin`, `min_size` for serving full mammograms,
            `serve` for the serving limits).
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


# --------------------------------------------------------------------------- decode, crop


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
    bit-identical). Sizes are NOT checked here: callers facing untrusted bytes check the
    header first (`mammodp.serving`).

    Args:
        data: the raw file bytes.
        full_image: the bytes are a whole mammogram that will be cropped with an ROI.

    Returns:
        float32 (H, W) in [0, 1].

    Raises:
        DataError: the bytes are empty or not a readable greyscale PNG or DICOM (the message
            says which, without the temporary file's name).
    """
    from mammodp.errors import DataError, MammoDPError

    if not data:
        raise DataError("is empty")
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
            raise DataError(f"is not a readable {kind} ({reason})") from exc
    if img.ndim != 2:
        raise DataError(f"must be a 2-D greyscale image, got shape {img.shape}")
    return img


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
        DataError: the box lies outside the image.
    """
    from mammodp.data.patches import crop_square, resize_patch

    size = int(meta["patch_size"])
    if roi is None:
        return resize_patch(image, size)
    return crop_square(image, roi, margin=int(meta.get("margin", 0)), min_size=int(meta.get("min_size", 1)),
                       patch_size=size)


__all__ = [
    "MODEL_META",
    "MODEL_WEIGHTS",
    "IMAGE_COL",
    "ROI_COL",
    "PIXELS_COL",
    "INPUT_COLUMNS",
    "save_classifier",
    "load_classifier",
    "predict_proba",
    "epsilon_text",
    "is_dicom",
    "decode_image_bytes",
    "image_to_patch",
]
