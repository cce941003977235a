"""The served classifier as an MLflow pyfunc: the registered `classifier`, logged as MLflow
"models from code" by `medimg.classifier_logging`.

MLflow runs this file when it loads the model (`mlflow.pyfunc.load_model`, `mlflow models
serve`); `set_model` at the bottom is what it looks for. The medimg package is logged beside
it (`code_paths`), so the model loads and predicts where medimg is not installed: the
environment needs only the pinned requirements (keras, tensorflow, pandas, pillow, pydantic).
Do not import this module from medimg: importing it registers a model with MLflow.

Input: base64 PNG/JPEG in a DataFrame (`image` column), or raw (N, H, W, 3) pixels, so no
input schema is set (one would reject the other kind); the `pd.DataFrame` hint tells MLflow
not to infer one. The request parameter `threshold` overrides the logged one. Decoding and
scoring are `medimg.scoring.score_request`, the path evaluate and `medimg predict` use.

Loading ends with a warm-up: black images scored through that path (`warmed_up`), so the
first request does not pay for tracing. With `MEDIMG_REQUEST_LOG` set to a folder, each scored
image is recorded there (`medimg.monitoring.request_log`: properties, hash, answer; never the
pixels), off the request path; unset, nothing is recorded.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel


class MedimgClassifier(PythonModel):
    """Keras image classifier: base64 images or pixel arrays in, class + probability out."""

    def load_context(self, context: Any) -> None:
        from medimg.data.images import MAX_PIXELS
        from medimg.models.loading import load_model

        self.model = load_model(context.artifacts["keras_model"])
        config = context.model_config or {}
        self.classes = list(config["classes"])
        self.size = int(config["image_size"])
        self.threshold = float(config.get("threshold", 0.5))
        self.max_pixels = int(config.get("max_image_pixels", MAX_PIXELS))
        self.tta = bool(config.get("tta", False))
        self.temperature = float(config.get("temperature", 1.0))
        self.request_log = None
        try:  # never a reason not to load: a log that cannot start is off
            from medimg.monitoring.request_log import RequestLog

            self.request_log = RequestLog.from_env()
        except Exception:
            self.request_log = None
        self.warmed_up = self._warm_up()

    def _warm_up(self) -> bool:
        """Score black images through the request path (with TTA if configured) so the first
        client requests do not pay for tracing: one image of the served size, then one of
        RAGGED_FROM distinct sizes (the ragged-resize graph a request of mixed cell sizes
        takes). Never fails the load: False, and the rest skipped, if anything goes wrong."""
        try:
            import numpy as np

            from medimg.data.images import RAGGED_FROM
            from medimg.scoring import score_request

            s = self.size
            requests = [
                np.zeros((1, s, s, 3), np.uint8),
                [np.zeros((s + i, s, 3), np.uint8) for i in range(RAGGED_FROM)],
            ]
            for request in requests:
                score_request(
                    self.model,
                    request,
                    self.classes,
                    s,
                    self.threshold,
                    self.max_pixels,
                    self.tta,
                    self.temperature,
                )
        except Exception:
            return False
        return True

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from medimg.data.images import ImageInputError
        from medimg.scoring import score_request

        threshold = float((params or {}).get("threshold", self.threshold))
        log = getattr(self, "request_log", None)
        decoded: list[Any] | None = [] if log is not None else None
        try:
            answer = score_request(
                self.model,
                model_input,
                self.classes,
                self.size,
                threshold,
                self.max_pixels,
                self.tta,
                self.temperature,
                decoded=decoded,
            )
        except ImageInputError as err:  # the request, not the model, is wrong: HTTP 400
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        if log is not None:
            log.log_request(decoded, answer)  # queued; written off the request path, never raises
        return answer


mlflow.models.set_model(MedimgClassifier())
