"""Pixels → probabilities → labels: the one scoring path.

The evaluate stage, `medimg predict`, `medimg explain`, `medimg export` and the served model
all score through these functions, so a threshold or output convention cannot drift between
them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medimg.analysis.calibration import apply_temperature
from medimg.analysis.metrics import predicted_labels
from medimg.data.images import MAX_PIXELS, batch_for, decode_input, resize_batch
from medimg.errors import MedimgError

DEFAULT_THRESHOLD = 0.5


def model_size(model: Any) -> int:
    """The square input size the model was built for (its `(None, S, S, 3)` input)."""
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[1] is None or shape[1] != shape[2]:
        raise MedimgError(f"model {model.name!r} has no fixed square image input: {shape}")
    return int(shape[1])


def dihedral_views(images: np.ndarray) -> list[np.ndarray]:
    """The 8 flips and 90° rotations of (N, H, W, C) square images: a cell has no up or left."""
    x = np.asarray(images)
    views = [np.rot90(x, k, axes=(1, 2)) for k in range(4)]
    return views + [np.rot90(x[:, :, ::-1], k, axes=(1, 2)) for k in range(4)]


def _model_outputs(
    model: Any, images: np.ndarray, batch: int, embeddings: list[np.ndarray] | None = None
) -> np.ndarray:
    """The model's probabilities for `images`, `batch` at a time. A model with a second output
    (`medimg.models.loading.with_embedding`) gives its embeddings too: they go to `embeddings`
    when a list is given, else nowhere."""
    parts = []
    for i in range(0, len(images), batch):
        out = model.predict_on_batch(np.ascontiguousarray(images[i : i + batch], np.float32))
        if isinstance(out, list | tuple):
            out, features = out[0], out[1]
            if embeddings is not None:
                embeddings.append(np.asarray(features, np.float32))
        parts.append(np.asarray(out))
    out = np.concatenate(parts).astype(np.float64)
    return out[:, 0] if out.ndim == 2 and out.shape[1] == 1 else out


def probabilities(
    model: Any,
    images: np.ndarray,
    batch: int | None = None,
    tta: bool = False,
    temperature: float = 1.0,
    embeddings: list[np.ndarray] | None = None,
) -> np.ndarray:
    """(N,) positive-class probabilities (sigmoid) or (N, K) (softmax), as float64.

    `tta`: the mean over the 8 dihedral views (8x the cost); `temperature`: the calibration
    fitted on validation (`medimg.analysis.calibration`), applied after the mean.
    `predict_on_batch` on slices of `batch` images (default: `batch_for`, by pixels): `predict`
    builds a tf.data pipeline per call, which costs more than a batch of small cells, and
    slicing bounds memory on a whole split. `embeddings`: with a two-output model, receives
    the (N, D) embeddings of the images as given (the first view under TTA), batch by batch.
    """
    if len(images) == 0:
        return np.zeros((0,), np.float64)
    batch = batch or batch_for(images)
    views = dihedral_views(images) if tta else [images]
    out = np.mean(
        [
            _model_outputs(model, v, batch, embeddings if k == 0 else None)
            for k, v in enumerate(views)
        ],
        axis=0,
    )
    return apply_temperature(out, temperature)


def check_classes(model: Any, classes: Sequence[str]) -> list[str]:
    """The class names, checked against the model's output units (1 sigmoid = 2 classes)."""
    units = int(model.outputs[0].shape[-1])
    expected = 2 if units == 1 else units
    if len(classes) != expected:
        raise MedimgError(
            f"model has {units} output unit(s) ({expected} classes) but the class list has "
            f"{len(classes)}: {list(classes)}; check validate.classes in params.yaml"
        )
    return list(classes)


def result_frame(probs: np.ndarray, classes: Sequence[str], threshold: float) -> pd.DataFrame:
    """Per image: predicted class, its probability, and p_<class> (the positive one if binary).

    Binary: positive when p >= threshold, and `probability` is the predicted class's (p or
    1 - p); multi-class: argmax, and `threshold` does not apply (NaN).
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1:
        positive = probs >= threshold
        frame = pd.DataFrame(
            {
                "class": np.where(positive, classes[1], classes[0]),
                "probability": np.where(positive, probs, 1.0 - probs),
                f"p_{classes[1]}": probs,
            }
        )
        frame["threshold"] = float(threshold)
        return frame
    pred = predicted_labels(probs) if len(probs) else np.zeros(0, int)
    frame = pd.DataFrame(
        {"class": [classes[i] for i in pred], "probability": probs.max(axis=1, initial=0.0)}
    )
    for i, name in enumerate(classes):
        frame[f"p_{name}"] = probs[:, i]
    frame["threshold"] = np.nan
    return frame


def score_request(
    model: Any,
    model_input: Any,
    classes: Sequence[str],
    size: int,
    threshold: float,
    max_pixels: int = MAX_PIXELS,
    tta: bool = False,
    temperature: float = 1.0,
    decoded: list[np.ndarray] | None = None,
    embeddings: list[np.ndarray] | None = None,
) -> pd.DataFrame:
    """The served model's whole `predict`: decode (pixel-bounded) → model → result rows.

    `decoded`: a list that receives each image at its original size, as decoded, before the
    resize (the served model's request log measures them without decoding twice);
    `embeddings`: with a two-output `model`, receives the embedding batches (see
    `probabilities`).
    """
    originals = decode_input(model_input, max_pixels)
    if decoded is not None:
        decoded.extend(originals)
    x = resize_batch(originals, size)
    probs = probabilities(model, x, tta=tta, temperature=temperature, embeddings=embeddings)
    return result_frame(probs, classes, threshold)


# ---------------------------------------------------------------------------- model loading


@dataclass(frozen=True)
class Classifier:
    """A loaded model and what decides its output: class names, input size, threshold."""

    model: Any
    classes: list[str]
    size: int
    threshold: float
    info: dict[str, Any] = field(default_factory=dict)
    tta: bool = False
    temperature: float = 1.0

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """This model's probabilities, with its TTA and temperature: what every command shows."""
        return probabilities(self.model, images, tta=self.tta, temperature=self.temperature)

    @property
    def label(self) -> str:
        """`malaria-classifier v3`, `run 1a2b3c4d` or the file name, for titles and names."""
        info = self.info
        if info.get("name") and info.get("version"):
            return f"{info['name']} v{info['version']}"
        if info.get("run_id"):
            return f"run {info['run_id'][:8]}"
        return Path(info.get("keras_path", "model")).stem


def pick_threshold(override: float | None, info: dict[str, Any]) -> float:
    """The decision threshold: an explicit one, else the registry's operating threshold, else
    the served model's own, else 0.5; a value outside [0, 1] is a usage error."""
    for value in (override, info.get("operating_threshold"), info.get("threshold")):
        if value is not None:
            value = float(value)
            if not 0.0 <= value <= 1.0:
                raise MedimgError(f"threshold must be in [0, 1], got {value}", exit_code=2)
            return value
    return DEFAULT_THRESHOLD
