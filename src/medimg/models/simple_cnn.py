"""Seed 001's basic CNN: the from-scratch baseline every other model has to beat.

Kept exactly as published (Flatten into two 512-unit dense layers, 15,102,529 parameters at
125 px) so its reported overfitting (train 99.9% vs val 95.6%) can be reproduced and compared;
the Flatten makes the parameter count depend on the input size, as in the original.
"""

from __future__ import annotations

import keras
from keras import layers

from medimg.models.layers import (
    check_fraction,
    check_positive_int,
    classification_head,
    unit_rescaling,
)
from medimg.models.registry import register_model


@register_model(
    "simple_cnn",
    default_size=125,
    optimizer="adam",
    learning_rate=1e-3,
    schedule="plateau",
    augmentation=False,
)
def simple_cnn(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    dropout: float = 0.3,
    dense_units: int = 512,
) -> keras.Model:
    """Seed 001 basic CNN: conv 32-64-128 + maxpool, Flatten, 2x dense 512 with dropout.

    Params: `dropout` after each dense layer (0.3 in the seed), `dense_units` per dense layer.
    """
    dropout = check_fraction("simple_cnn", "dropout", dropout)
    dense_units = check_positive_int("simple_cnn", "dense_units", dense_units)
    inputs = keras.Input(shape=input_shape, name="image")
    x = unit_rescaling()(inputs)
    for i, filters in enumerate((32, 64, 128), start=1):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"conv{i}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = layers.Flatten(name="flatten")(x)
    for i in (1, 2):
        x = layers.Dense(dense_units, activation="relu", name=f"fc{i}")(x)
        x = layers.Dropout(dropout, name=f"dropout{i}")(x)
    outputs = classification_head(x, num_classes)
    return keras.Model(inputs, outputs, name="simple_cnn")
