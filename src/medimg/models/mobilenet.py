"""MobileNetV3-Small: the off-the-shelf edge candidate compact_cnn is measured against.

~0.9M base parameters and hard-swish/SE blocks designed for phones; preprocessing (scale to
[-1, 1]) is built into the Keras model (`include_preprocessing=True`), so it takes raw pixels
like every zoo model. Trained end to end by default: at 128 px on stained cells the ImageNet
features need adapting, and the base is small enough to fine-tune cheaply.
"""

from __future__ import annotations

import keras
from keras import layers

from medimg.models.layers import check_bool, check_fraction, classification_head
from medimg.models.registry import register_model
from medimg.models.weights import freeze, imagenet_base


@register_model(
    "mobilenet_v3_small",
    default_size=128,
    optimizer="adam",
    learning_rate=1e-3,
    schedule="plateau",
    pretrained=True,
)
def mobilenet_v3_small(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    weights: str = "none",
    freeze_base: bool = False,
    dropout: float = 0.2,
) -> keras.Model:
    """MobileNetV3-Small (ImageNet) base + GAP, dropout 0.2 head; edge baseline.

    Params: `weights` ("none" | "imagenet" | path to the notop .h5), `freeze_base` (false),
    `dropout` (0.2).
    """
    freeze_base = check_bool("mobilenet_v3_small", "freeze_base", freeze_base)
    dropout = check_fraction("mobilenet_v3_small", "dropout", dropout)
    inputs = keras.Input(shape=input_shape, name="image")
    base = imagenet_base(
        "mobilenet_v3_small",
        keras.applications.MobileNetV3Small,
        inputs,
        input_shape,
        weights,
        include_preprocessing=True,
    )
    if freeze_base:
        freeze(base, weights=weights, name="mobilenet_v3_small")
    x = layers.GlobalAveragePooling2D(name="head_gap")(base.output)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = classification_head(x, num_classes)
    return keras.Model(inputs, outputs, name="mobilenet_v3_small")
