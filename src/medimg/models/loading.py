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
