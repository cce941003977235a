"""Fixtures for the model-zoo tests."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import keras
import pytest

import medimg.models as zoo


@pytest.fixture(scope="module")
def small_model() -> Iterator[Callable[[str, int], keras.Model]]:
    """`small_model(name, num_classes)`: one build per key at the family's minimum size.

    Building an ImageNet base costs seconds on a shared CPU, so the forward-pass, freezing and
    Grad-CAM checks share one build; the cache is dropped when the module finishes.
    """
    cache: dict[tuple[str, int], keras.Model] = {}

    def get(name: str, num_classes: int) -> keras.Model:
        if (name, num_classes) not in cache:
            size = zoo.get_spec(name).min_size
            cache[name, num_classes] = zoo.build_model(name, (size, size, 3), num_classes)
        return cache[name, num_classes]

    yield get
    cache.clear()
    gc.collect()


@pytest.fixture
def mixed_precision() -> Iterator[None]:
    """Run a test under mixed_float16 and restore the global policy afterwards."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    yield
    keras.config.set_dtype_policy(previous)
