"""Logging a saved classifier as an MLflow pyfunc model (imported only where MLflow is present).

The model is logged "from code": the file `mammodp/served_model.py` (the pyfunc class and
request parsing) travels with it and runs at serve time; the weights and meta travel as the
`model_dir` artifact. `mlflow models serve -m models:/mammodp-classifier@champion
--env-manager local` serves it from the project's venv. Logging imports neither that file nor
`mammodp.serving`, so the training stages do not depend on request parsing.

Request format (JSON body of `POST /invocations`), one patch per row:
- `{"dataframe_records": [{"image": "<base64 PNG or DICOM>"}]}`: a patch;
- `{"dataframe_records": [{"image": "<base64 full mammogram>", "roi": [x0, y0, x1, y1]}]}`:
  cropped around the box exactly as `mammodp prepare` crops;
- `{"dataframe_split": {"columns": ["pixels"], "data": [[patch_2d], ...]}}`: the tensor
  route, each patch a 2-D list of floats in [0, 1].
The signature declares the three columns as optional, so that any one route validates; a
request with neither `image` nor `pixels`, an undecodable image, a bad box or a wrong shape
is answered 400 with a message (MLflow's scoring server maps `INVALID_PARAMETER_VALUE` to 400).
Response per row: `p_malignant`, `label` (1 = malignant, at the threshold chosen on the
validation split) and `epsilon` (the model's END-TO-END epsilon as text: its own DP-SGD composed
with its synthetic data's generator; `inf` if non-private, `not_covered` when no finite epsilon
covers its training data, e.g. synthetic data from a generator trained without DP).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from mammodp.inference import IMAGE_COL, PIXELS_COL, ROI_COL

SERVED_MODEL = Path(__file__).with_name("served_model.py")  # the model-from-code script

# Libraries the model needs at load time, pinned to what logged it. Given explicitly so that
# logging does not spawn a subprocess to infer them; mammodp itself is not on PyPI, hence
# `--env-manager local` (serve from the project's venv).
_REQUIREMENTS = ("mlflow", "torch", "timm", "numpy", "pandas", "pillow", "pydicom", "scipy")


def signature():
    """The model signature: three optional input columns, three output columns."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, DataType, Schema

    inputs = Schema([
        ColSpec(DataType.string, IMAGE_COL, required=False),
        # A box is a list or JSON text, and absent for patches: `any` lets rows differ.
        ColSpec(AnyType(), ROI_COL, required=False),
        # `any`, not Array(Array(double)): a wrongly typed patch then gets our 400 naming the
        # row and field, instead of MLflow's schema error.
        ColSpec(AnyType(), PIXELS_COL, required=False),
    ])
    outputs = Schema([
        ColSpec(DataType.double, "p_malignant"),
        ColSpec(DataType.long, "label"),
        ColSpec(DataType.string, "epsilon"),
    ])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in _REQUIREMENTS:
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def log_classifier(model_dir: str | Path, example_patch: np.ndarray, name: str = "model"):
    """Log a saved classifier as a pyfunc model with signature and input example.

    Call inside an active run. The input example is one patch as a base64 16-bit PNG in
    the `image` column (the batch dimension is dynamic: any number of rows).

    Args:
        model_dir: folder written by `mammodp.inference.save_classifier`.
        example_patch: (H, W) float patch in [0, 1] for the input example.
        name: the logged model's name within the run (`runs:/<id>/<name>`).

    Returns:
        MLflow's `ModelInfo`.
    """
    import base64
    import io

    from PIL import Image

    from mammodp.data.imageio import to_uint16

    buf = io.BytesIO()
    Image.fromarray(to_uint16(np.asarray(example_patch))).save(buf, format="PNG")
    example = pd.DataFrame({IMAGE_COL: [base64.b64encode(buf.getvalue()).decode("ascii")]})
    # MLflow suggests type hints on `predict` to infer a signature: the signature is given
    # explicitly, so that advice is dropped. (MLflow inserts its own "once" filter while
    # loading the model, ahead of any "ignore" filter, hence record and replay the others.)
    with warnings.catch_warnings(record=True) as caught:
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(SERVED_MODEL),
            artifacts={"model_dir": str(model_dir)},
            signature=signature(),
            input_example=example,
            pip_requirements=_pip_requirements(),
        )
    for w in caught:
        if "Add type hints to the `predict` method" not in str(w.message):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return info
