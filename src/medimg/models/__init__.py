"""The model zoo: every architecture medimg can train, by name.

Importing this package registers all families (the imports below exist for that side effect);
nothing else happens at import. Use `build_model(name, input_shape, num_classes, **params)`
for a fresh Keras model and `get_spec(name)` for its seed recipe (size, optimizer, lr, schedule).
"""

from __future__ import annotations

from medimg.models import (  # noqa: F401  (imported to register their builders)
    compact,
    efficientnet,
    inception_v3,
    mobilenet,
    resnet50v2,
    resnet_mini,
    simple_cnn,
    tiny,
    vgg19,
)
from medimg.models.layers import CaffePreprocessing
from medimg.models.registry import (
    ModelSpec,
    build_model,
    builder_params,
    get_spec,
    list_models,
    register_model,
)
from medimg.models.weights import IMAGENET_FILES, keras_cache_dir, resolve_weights

__all__ = [
    "IMAGENET_FILES",
    "CaffePreprocessing",
    "ModelSpec",
    "build_model",
    "builder_params",
    "get_spec",
    "keras_cache_dir",
    "list_models",
    "register_model",
    "resolve_weights",
]
