"""The served classifier: MLflow's "model from code" script for `mlflow models serve`.

`mammodp.pyfunc_model.log_classifier` logs this FILE (not a pickled object): at serve time
MLflow runs it, and it hands MLflow the `MammoClassifier` below. So the training stages that
log models import neither this module nor the request parser (`mammodp.serving`): an edit to
request parsing reruns no training, and a logged model runs no pickled code when loaded.

Request format (JSON body of `POST /invocations`), one patch per row:
- `{"dataframe_records": [{"image": "<base64 PNG or DICOM>"}]}`: a patch;
- `{"dataframe_records": [{"image": "<base64 full mammogram>", "roi": [x0, y0, x1, y1]}]}`:
  cropped around the box exactly as `mammodp prepare` crops;
- `{"dataframe_split": {"columns": ["pixels"], "data": [[patch_2d], ...]}}`: the tensor
  route, each patch a 2-D list of floats in [0, 1].
A request with neither `image` nor `pixels`, an undecodable image, a bad box, a wrong shape or
anything over the model's limits is answered 400 with a message naming the row and field.
Response per row: `p_malignant`, `label` (1 = malignant, at the threshold chosen on the
validation split) and `epsilon` (the end-to-end epsilon as text: the classifier's composed with
its synthetic data's generator, `not_covered` where no epsilon covers the model, `inf` if
non-private).
"""

from __future__ import annotations

import mlflow.exceptions
import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd

from mammodp.inference import epsilon_text, load_classifier, predict_proba
from mammodp.privacy.compose import served_epsilon
from mammodp.serving import request_to_patches


class RequestRejected(mlflow.exceptions.MlflowException):
    """A client fault (HTTP 400) whose reply is exactly our message.

    MLflow's scoring server rewrites a model's `MlflowException` message to
    `Failed to predict data '<the request DataFrame>' ...`, which echoes the start of every
    payload (base64 image bytes included) back to the client. This exception keeps the first
    message it was given, so no reply repeats the request.
    """

    def __init__(self, message: str):
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._own_message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_own_message"):
            self._own_message = value


class MammoClassifier(mlflow.pyfunc.PythonModel):
    """decode -> crop/resize -> model -> `p_malignant`, `label`, `epsilon` per row."""

    def load_context(self, context):
        """Rebuild the classifier from the `model_dir` artifact."""
        self.model, self.meta = load_classifier(context.artifacts["model_dir"])

    def predict(self, context, model_input, params=None):
        """Score a request; client faults become `INVALID_PARAMETER_VALUE` (HTTP 400).

        Args:
            context: MLflow's context (unused after loading).
            model_input: DataFrame with `image` [+ `roi`] or `pixels`, or a patch array.
            params: unused.

        Returns:
            DataFrame with `p_malignant` (float), `label` (int), `epsilon` (text).
        """
        from mammodp.errors import MammoDPError
        from mammodp.runtime import release_free_memory

        try:
            try:
                patches = request_to_patches(model_input, self.meta)
            except MammoDPError as exc:
                raise RequestRejected(f"bad request: {exc}") from None
            p = predict_proba(self.model, patches)
            del patches
        finally:
            # A full mammogram decoded and cropped frees ~100-300 MB; give it back to the OS
            # so the server's resident size stays flat from request to request.
            release_free_memory()
        thr = float(self.meta.get("threshold", 0.5))
        return pd.DataFrame({
            "p_malignant": p.astype(np.float64),
            "label": (p >= thr).astype(np.int64),
            # End to end: the total over the classifier and its generator, or `not_covered`.
            "epsilon": [epsilon_text(served_epsilon(self.meta))] * len(p),
        })



mlflow.models.set_model(MammoClassifier())
