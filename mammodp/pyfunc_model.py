"""The MLflow pyfunc wrapper around a saved classifier (imported only where MLflow is present).

`mlflow models serve -m models:/mammodp-classifier@champion --env-manager local` loads this
class from the installed package; the weights and meta travel as the `model_dir` artifact.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from mammodp.serving import epsilon_text, load_classifier, predict_proba, request_to_patches


class MammoClassifier(mlflow.pyfunc.PythonModel):
    """decode -> crop/resize -> model -> `p_malignant`, `label`, `epsilon` per row."""

    def load_context(self, context):
        self.model, self.meta = load_classifier(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):
        patches = request_to_patches(model_input, self.meta)
        p = predict_proba(self.model, patches)
        thr = float(self.meta.get("threshold", 0.5))
        return pd.DataFrame({
            "p_malignant": p.astype(float),
            "label": (p >= thr).astype(int),
            "epsilon": [epsilon_text(self.meta.get("epsilon"))] * len(p),
        })


def log_classifier(model_dir: str | Path, example_patch: np.ndarray, name: str = "model"):
    """Log a saved classifier as a pyfunc model with signature and input example.

    The input is a DataFrame with a base64 `image` column (PNG or DICOM bytes); any number
    of rows (the batch dimension is dynamic).
    """
    import base64
    import io

    from mlflow.models import infer_signature
    from PIL import Image

    from mammodp.data.imageio import to_uint16

    buf = io.BytesIO()
    Image.fromarray(to_uint16(example_patch)).save(buf, format="PNG")
    example = pd.DataFrame({"image": [base64.b64encode(buf.getvalue()).decode("ascii")]})
    out = pd.DataFrame({"p_malignant": [0.5], "label": [1], "epsilon": ["inf"]})
    signature = infer_signature(example, out)
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=MammoClassifier(),
        artifacts={"model_dir": str(model_dir)},
        signature=signature,
        input_example=example,
    )
