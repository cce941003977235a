"""Logging the served classifier: `medimg.pyfunc_classifier` as MLflow "models from code", with
the medimg package beside it and the scoring settings the evaluate stage chose.

Kept apart from `pyfunc_classifier.py`, which MLflow executes on load (importing it registers a
model); the MLflow calls themselves are `medimg.tracking`'s.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medimg import tracking
from medimg.data.images import MAX_PIXELS, png_request


@dataclass(frozen=True)
class ServingConfig:
    """What the served model needs besides its weights: the same for every scoring path."""

    classes: list[str]
    image_size: int
    threshold: float = 0.5
    tta: bool = False
    temperature: float = 1.0
    max_image_pixels: int = MAX_PIXELS  # the archive reader's bound (dataset.limits)
    # a smear is called infected when its share of called cells reaches this (None: any
    # called cell); chosen on val patients by evaluate, read by `medimg predict --by-patient`
    patient_threshold: float | None = None
    # the request log (MEDIMG_REQUEST_LOG) also keeps each scored image, as PNG, for relabeling
    # (`monitoring.keep_images`; MEDIMG_REQUEST_LOG_KEEP_IMAGES overrides it where served)
    keep_images: bool = False


REFERENCE_ARTIFACT = "monitoring_reference"  # the served model's drift reference (JSON)


def log_classifier(
    keras_file: Path,
    config: ServingConfig,
    example: np.ndarray | None,
    *,
    run_id: str,
    reference: Path | None = None,
) -> tuple[str, str]:
    """Log the pyfunc `classifier` into run `run_id` (the architecture's training run) on the
    configured store; returns (model URI, model id). `reference`: the monitoring reference
    (`medimg.monitoring.profile`), stored with the model as artifact `monitoring_reference`,
    so the served model and `medimg monitor` read the one the version was evaluated with."""
    code = Path(importlib.util.find_spec("medimg.pyfunc_classifier").origin)  # not imported
    artifacts = {"keras_model": keras_file}
    if reference is not None:
        artifacts[REFERENCE_ARTIFACT] = reference
    with tracking.run(run_id=run_id):
        return tracking.log_code_model(
            model_code=code,
            code_paths=[code.parent],
            artifacts=artifacts,
            config=asdict(config),
            signature_params={"threshold": config.threshold},
            input_example=png_request(example) if example is not None else None,
        )
