"""The MLflow pyfunc model that `mlflow models serve` runs.

Preprocessing lives inside the model: a request carries image bytes (PNG or DICOM patch, or
a full mammogram plus an `roi` box) or a float tensor of patches; the same decoder, patch
extractor and model normalisation as training turn it into logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

MODEL_META = "meta.json"
MODEL_WEIGHTS = "weights.pt"


def save_classifier(model, meta: dict[str, Any], out_dir: str | Path) -> Path:
    """Write a classifier's weights and metadata (preset, mode, patch size, epsilon...) to a folder.

    Args:
        model: the trained classifier (its state dict is saved).
        meta: JSON-serialisable facts needed to rebuild and describe it; must hold `preset`,
            `mode` and `patch_size`.
        out_dir: folder to write `weights.pt` and `meta.json` into.
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
    """Rebuild a classifier saved by `save_classifier`; returns (model in eval mode, meta)."""
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
    """P(malignant) for patches (N, 1, H, W) float32 in [0, 1]: the one inference path."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = torch.as_tensor(images[i : i + batch_size], dtype=torch.float32, device=device)
            out.append(torch.softmax(model(x).float(), dim=1)[:, 1].cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def epsilon_text(eps: float | str | None) -> str:
    """Epsilon as served: a number, or `inf` for a non-private model."""
    if eps is None:
        return "unknown"
    if isinstance(eps, str):
        return eps
    return "inf" if math.isinf(eps) else f"{eps:.4g}"


def decode_image_bytes(data: bytes) -> np.ndarray:
    """Decode PNG (8/16-bit) or DICOM bytes to a float32 image in [0, 1] (H, W)."""
    import tempfile

    from mammodp.data.imageio import load_patch
    from mammodp.errors import ServingError

    if data[128:132] == b"DICM" or data[:4] == b"DICM":
        from mammodp.data.dicom import read_dicom

        with tempfile.NamedTemporaryFile(suffix=".dcm") as f:
            f.write(data)
            f.flush()
            return read_dicom(f.name)
    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        f.write(data)
        f.flush()
        try:
            return load_patch(f.name)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the client's bad payload
            raise ServingError(f"image is neither a readable PNG nor DICOM: {exc}", field="image") from exc


def request_to_patches(model_input, meta: dict) -> np.ndarray:
    """Turn a request (DataFrame with `image` [+ `roi`], or an array) into (N, 1, P, P) patches."""
    import base64
    import binascii

    import pandas as pd

    from mammodp.data.patches import crop_square, resize_patch
    from mammodp.errors import ServingError

    size = int(meta["patch_size"])
    if isinstance(model_input, pd.DataFrame) and "image" in model_input.columns:
        out = []
        for i, row in enumerate(model_input.itertuples(index=False)):
            try:
                raw = base64.b64decode(str(row.image), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ServingError(f"row {i}: image is not valid base64", field="image") from exc
            img = decode_image_bytes(raw)
            roi = getattr(row, "roi", None)
            if roi is not None and not (isinstance(roi, float) and math.isnan(roi)):
                box = json.loads(roi) if isinstance(roi, str) else list(roi)
                if len(box) != 4:
                    raise ServingError(f"row {i}: roi must be [x0, y0, x1, y1]", field="roi")
                patch = crop_square(img, tuple(int(v) for v in box), margin=int(meta.get("margin", 0)),
                                    min_size=int(meta.get("min_size", 1)), patch_size=size)
            else:
                patch = resize_patch(img, size)
            out.append(patch[None].astype(np.float32))
        return np.stack(out) if out else np.zeros((0, 1, size, size), np.float32)
    arr = np.asarray(model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else model_input,
                     dtype=np.float32)
    if arr.ndim == 3:
        arr = arr[:, None]
    if arr.ndim != 4 or arr.shape[1] != 1:
        raise ServingError(f"tensor input must be (N, 1, H, W) or (N, H, W), got {arr.shape}", field="inputs")
    return arr
