"""Seed 004's InceptionV3 transfer model (frozen base, GAP → Dense 64 → softmax), for OCT.

Inputs are scaled to [-1, 1], the preprocessing the InceptionV3 ImageNet weights expect (the
seed used 1/255, which shifts every activation of a frozen base). InceptionV3's stem needs at
least 75 px; 299 px is its native size and the seed's.
"""

from __future__ import annotations

import keras
from keras import layers

from medimg.models.layers import (
    check_bool,
    check_positive_int,
    classification_head,
    symmetric_rescaling,
)
from medimg.models.registry import register_model
from medimg.models.weights import freeze, imagenet_base


@register_model(
    "inception_v3",
    default_size=299,
    optimizer="adam",
    learning_rate=1e-3,
    schedule="constant",
    pretrained=True,
    min_size=75,
    augmentation=False,
)
def inception_v3(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    weights: str = "none",
    freeze_base: bool = True,
    dense_units: int = 64,
) -> keras.Model:
    """Seed 004 InceptionV3 (ImageNet) frozen base + GAP and a 64-unit dense head.

    Params: `weights` ("none" | "imagenet" | path to the notop .h5), `freeze_base` (seed: true),
    `dense_units` (64).
    """
    freeze_base = check_bool("inception_v3", "freeze_base", freeze_base)
    dense_units = check_positive_int("inception_v3", "dense_units", dense_units)
    inputs = keras.Input(shape=input_shape, name="image")
    x = symmetric_rescaling()(inputs)
    base = imagenet_base("inception_v3", keras.applications.InceptionV3, x, input_shape, weights)
    if freeze_base:
        freeze(base, weights=weights, name="inception_v3")
    x = layers.GlobalAveragePooling2D(name="head_gap")(base.output)
    x = layers.Dense(dense_units, activation="relu", name="head_fc")(x)
    outputs = classification_head(x, num_classes)
    return keras.Model(inputs, outputs, name="inception_v3")
