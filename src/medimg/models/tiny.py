"""The smallest model that exercises the whole pipeline, for fast tests and smoke runs.

One 8-filter conv, global pooling and the standard head: a few hundred parameters, so a
training/evaluation/export test finishes in seconds on a shared CPU while still going through
in-model rescaling, the float32 head and `.keras` round trips.
"""

from __future__ import annotations

import keras
from keras import layers

from medimg.models.layers import check_positive_int, classification_head, unit_rescaling
from medimg.models.registry import register_model


@register_model("tiny", default_size=32, optimizer="adam", learning_rate=1e-3, schedule="constant")
def tiny(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    filters: int = 8,
) -> keras.Model:
    """Test model: one 3x3 conv (8 filters), global average pooling, head.

    Params: `filters` (8).
    """
    filters = check_positive_int("tiny", "filters", filters)
    inputs = keras.Input(shape=input_shape, name="image")
    x = unit_rescaling()(inputs)
    x = layers.Conv2D(filters, 3, padding="same", activation="relu", name="conv")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = classification_head(x, num_classes)
    return keras.Model(inputs, outputs, name="tiny")
