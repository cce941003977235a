"""Building blocks shared by the families: the output head, in-model preprocessing, checks.

Preprocessing lives inside the model so a saved `.keras` file is the whole deployable contract
(raw 0-255 RGB in, probabilities out) and serving code cannot drift from training code. Custom
layers are registered serializable so `load_model(..., safe_mode=True)` works; Lambda layers
would need `safe_mode=False`, i.e. executing pickled code from the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import layers, ops

from medimg.errors import ConfigError

# ImageNet BGR channel means used by VGG's original Caffe training (keras "caffe" mode).
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="medimg")
class CaffePreprocessing(layers.Layer):
    """RGB 0-255 → BGR minus the ImageNet mean: what VGG's ImageNet weights were trained on.

    keras.applications only offers this as a NumPy/TF function (`preprocess_input`), which would
    have to live outside the model or in a Lambda; as a weightless layer it serialises safely
    and adds no parameters (so the seed's parameter counts still hold). Channels-last only.
    """

    def __init__(self, mean: Sequence[float] = CAFFE_BGR_MEAN, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mean = tuple(float(m) for m in mean)

    def call(self, inputs: Any) -> Any:
        x = ops.flip(inputs, axis=-1)
        return x - ops.convert_to_tensor(self.mean, dtype=x.dtype)

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mean": list(self.mean)}


def unit_rescaling(name: str = "rescale") -> layers.Rescaling:
    """0-255 → 0-1, the seeds' `rescale=1/255`, for models trained from scratch."""
    return layers.Rescaling(1.0 / 255.0, name=name)


def symmetric_rescaling(name: str = "rescale") -> layers.Rescaling:
    """0-255 → [-1, 1], the "tf" mode ResNetV2 and InceptionV3 ImageNet weights expect."""
    return layers.Rescaling(1.0 / 127.5, offset=-1.0, name=name)


def classification_head(
    x: Any,
    num_classes: int,
    name: str = "predictions",
    kernel_regularizer: keras.regularizers.Regularizer | None = None,
) -> Any:
    """One sigmoid unit for 2 classes, else a softmax; always float32.

    A single sigmoid unit is what seed 001 used and what the thresholding/sensitivity code wants
    (one probability per image). float32 keeps the probabilities and the loss stable when the
    rest of the network runs under the mixed_float16 policy.
    """
    units, activation = (1, "sigmoid") if num_classes == 2 else (num_classes, "softmax")
    return layers.Dense(
        units,
        activation=activation,
        kernel_regularizer=kernel_regularizer,
        dtype="float32",
        name=name,
    )(x)


def check_fraction(model: str, param: str, value: Any, *, upper_inclusive: bool = False) -> float:
    """A dropout-like value in [0, 1) (or [0, 1]); ConfigError naming model and param."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and value >= 0.0 and (value <= 1.0 if upper_inclusive else value < 1.0)
    if not ok:
        bound = "1]" if upper_inclusive else "1)"
        raise ConfigError(f"{model}: {param} must be a number in [0, {bound}, got {value!r}")
    return float(value)


def check_positive_int(model: str, param: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{model}: {param} must be a positive integer, got {value!r}")
    return value


def check_non_negative(model: str, param: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{model}: {param} must be a number >= 0, got {value!r}")
    return float(value)


def check_bool(model: str, param: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{model}: {param} must be true or false, got {value!r}")
    return value


def regularizer(l2: float) -> keras.regularizers.Regularizer | None:
    """An L2 kernel regulariser, or None when 0 so models without it stay plain."""
    return keras.regularizers.L2(l2) if l2 > 0 else None
