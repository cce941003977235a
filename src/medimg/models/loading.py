"""Loading a saved medimg model: the one way evaluate, the commands and the served model do it."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_model(path: str | Path) -> Any:
    """A medimg `.keras` file, loaded with safe_mode (no arbitrary code from the file).

    Importing `medimg.models` registers the custom layers (`@register_keras_serializable`),
    which is all Keras needs to rebuild any model of the zoo.
    """
    import keras

    import medimg.models  # noqa: F401  registers the custom layers

    return keras.saving.load_model(str(path), safe_mode=True, compile=False)


HEAD_LAYER = "predictions"  # medimg.models.layers.classification_head's layer name


def with_embedding(model: Any, head: str = HEAD_LAYER) -> Any:
    """The same model with a second output: the penultimate-layer activations (the input of
    the classification head), for drift monitoring. One forward pass gives both, so the
    served model pays no second pass for its embedding; the weights are shared, not copied.
    A model without a `predictions` head (not from the zoo) raises ValueError."""
    import keras

    try:
        layer = model.get_layer(head)
    except ValueError:
        raise ValueError(
            f"model {model.name!r} has no {head!r} layer to take an embedding from"
        ) from None
    features = layer.input
    return keras.Model(model.inputs, [model.outputs[0], features], name=f"{model.name}_embedding")
