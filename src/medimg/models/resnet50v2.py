"""Seed 003's ResNet50V2 transfer model (head: AvgPool 4x4 → Flatten → 128 → Dropout 0.5).

The seed's head is the PyImageSearch transfer recipe, which freezes the base; so does this
builder by default (`freeze_base`). AveragePooling 4x4 equals global pooling at the seed's
128 px (4x4 final map) and keeps more spatial detail at larger sizes; below 128 px the map is
smaller than 4x4, so the pool shrinks to fit instead of failing. Inputs are scaled to [-1, 1],
the preprocessing the ResNetV2 ImageNet weights expect.
"""

from __future__ import annotations

import keras
from keras import layers

from medimg.models.layers import (
    check_bool,
    check_fraction,
    check_positive_int,
    classification_head,
    symmetric_rescaling,
)
from medimg.models.registry import register_model
from medimg.models.weights import freeze, imagenet_base


@register_model(
    "resnet50v2",
    default_size=128,
    optimizer="adam",
    learning_rate=1e-3,
    schedule="constant",
    pretrained=True,
)
def resnet50v2(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    weights: str = "none",
    freeze_base: bool = True,
    dense_units: int = 128,
    dropout: float = 0.5,
) -> keras.Model:
    """Seed 003 ResNet50V2 (ImageNet) base + AvgPool 4x4, dense 128, dropout 0.5 head.

    Params: `weights` ("none" | "imagenet" | path to the notop .h5), `freeze_base` (seed: true),
    `dense_units` (128), `dropout` (0.5).
    """
    freeze_base = check_bool("resnet50v2", "freeze_base", freeze_base)
    dense_units = check_positive_int("resnet50v2", "dense_units", dense_units)
    dropout = check_fraction("resnet50v2", "dropout", dropout)
    inputs = keras.Input(shape=input_shape, name="image")
    x = symmetric_rescaling()(inputs)
    base = imagenet_base("resnet50v2", keras.applications.ResNet50V2, x, input_shape, weights)
    if freeze_base:
        freeze(base, weights=weights, name="resnet50v2")
    feat_h, feat_w = base.output.shape[1:3]
    pool = (min(4, feat_h), min(4, feat_w))
    x = layers.AveragePooling2D(pool_size=pool, name="head_pool")(base.output)
    x = layers.Flatten(name="head_flatten")(x)
    x = layers.Dense(dense_units, activation="relu", name="head_fc")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = classification_head(x, num_classes)
    return keras.Model(inputs, outputs, name="resnet50v2")
