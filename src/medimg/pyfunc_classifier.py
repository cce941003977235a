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
image is recorded there (`medimg.monitoring.request_log`: properties, hash, embedding
components, answer; the pixels only with `keep_images`), off the request path; unset, nothing
is recorded. The version's monitoring reference (`monitoring_reference` artifact) gives the
embedding's principal components; `medimg monitor` compares the log with the same file.
"""

from __future__ import annotations

from pathlib import Path
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
        self.scorer = self.model  # with logging and an embedding reference: two outputs
        try:  # never a reason not to load: a log that cannot start is off
            self.request_log, self.scorer = self._start_log(context, config)
        except Exception:
            self.request_log, self.scorer = None, self.model
        self.warmed_up = self._warm_up()

    def _start_log(self, context: Any, config: dict[str, Any]) -> tuple[Any, Any]:
        """(request log or None, the model to score with). With MEDIMG_REQUEST_LOG set, the
        log starts with the version's monitoring reference (artifact `monitoring_reference`,
        when the version has one) so it can log each request's embedding components; the
        model then scores with its embedding as a second output (the same forward pass)."""
        import json

        from medimg.models.loading import with_embedding
        from medimg.monitoring.request_log import RequestLog

        artifacts = context.artifacts or {}
        path = artifacts.get("monitoring_reference")
        reference = json.loads(Path(path).read_text()) if path else None
        log = RequestLog.from_env(
            keep_images=bool(config.get("keep_images", False)),
            reference=reference,
            model_id=_model_id(artifacts.get("keras_model")),
        )
        if log is None:
            return None, self.model
        _flush_on_sigterm(log)
        if log.embedding is None:
            return log, self.model
        return log, with_embedding(self.model)

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
                    self.scorer,
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
        embeddings: list[Any] | None = [] if log is not None else None
        try:
            answer = score_request(
                getattr(self, "scorer", self.model),
                model_input,
                self.classes,
                self.size,
                threshold,
                self.max_pixels,
                self.tta,
                self.temperature,
                decoded=decoded,
                embeddings=embeddings,
            )
        except ImageInputError as err:  # the request, not the model, is wrong: HTTP 400
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
        if log is not None:
            # queued: hashed, measured and written off the request path; never raises
            log.log_request(decoded, answer, embeddings or None)
        return answer


def _flush_on_sigterm(log: Any) -> None:
    """Write the log's queued records when the server is stopped (SIGTERM), then stop as
    before. `atexit` is not enough: uvicorn, after its graceful shutdown, re-raises SIGTERM
    with the handler it found at start, and the default one ends the process without running
    atexit, losing up to `flush_seconds` of records. Installed at load, before uvicorn takes
    the signal, this handler is the one uvicorn restores and re-raises: it flushes, puts the
    previous handler back and hands the signal on. Only from the main thread (where MLflow's
    scoring server loads the model); elsewhere, atexit alone."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def flush_then_stop(signum: int, frame: Any) -> None:
        log.close()
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.raise_signal(signum)

    signal.signal(signal.SIGTERM, flush_then_stop)


def _model_id(keras_artifact: str | None) -> str | None:
    """The logged model's id, from the MLmodel file two levels above its artifacts (MLflow
    does not hand a pyfunc its own id); None when it cannot be read."""
    import yaml

    try:
        mlmodel = Path(str(keras_artifact)).parent.parent / "MLmodel"
        return str(yaml.safe_load(mlmodel.read_text())["model_id"])
    except Exception:
        return None


mlflow.models.set_model(MedimgClassifier())
