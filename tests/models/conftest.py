"""Fixtures for the model-zoo tests: keep Keras' global state from leaking between tests."""

from __future__ import annotations

from collections.abc import Iterator

import keras
import pytest


@pytest.fixture(autouse=True)
def _fresh_keras() -> Iterator[None]:
    """Free each test's graphs (the zoo builds ~20M-parameter bases) and restore the policy."""
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(policy)
    keras.utils.clear_session(free_memory=True)
