"""Where an ImageNet base gets its weights from, decided before anything touches the network.

The training machines are offline, and keras.applications' own failure mode for
`weights="imagenet"` without a cached file is a long download traceback after minutes of setup.
Resolving the choice first turns it into a one-line ConfigError that says exactly which file to
put where, or how to point at a copy elsewhere.

`train.weights` values: `"none"` (random init), `"imagenet"` (Keras' cache only, never
downloaded here) or a path to the `.h5` file keras.applications would have downloaded.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras

from medimg.errors import ConfigError, error_line

# The exact "notop" file names keras.applications fetches into $KERAS_HOME/models (see
# keras/src/applications/{vgg19,resnet,inception_v3,mobilenet_v3,efficientnet}.py).
IMAGENET_FILES: dict[str, str] = {
    "vgg19": "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "resnet50v2": "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "inception_v3": "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "mobilenet_v3_small": "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
    "efficientnet_b0": "efficientnetb0_notop.h5",
}

# Suffixes Keras' `load_weights` accepts for a plain weights file (".weights.h5" included).
_WEIGHT_SUFFIXES = (".h5", ".hdf5")


def keras_cache_dir() -> Path:
    """The folder keras.applications looks in: `$KERAS_HOME/models`, else `~/.keras/models`.

    Mirrors keras' own fallbacks (an unwritable home or KERAS_HOME makes it use /tmp/.keras),
    so a file reported as present is the one keras will actually find. Keras reads KERAS_HOME
    once, when it is imported: set it in the environment before the process starts.
    """
    home = os.environ.get("KERAS_HOME")
    if not home:
        base = os.path.expanduser("~")
        if not os.access(base, os.W_OK):
            base = "/tmp"
        home = os.path.join(base, ".keras")
    home = os.path.expanduser(home)
    if os.path.isdir(home) and not os.access(home, os.W_OK):
        home = os.path.join("/tmp", ".keras")
    return Path(home) / "models"


def resolve_weights(arch: str, weights: str | None) -> str | None:
    """The `weights=` value to hand keras.applications for `arch`, or a ConfigError.

    Returns None for random init, "imagenet" only when the cached file exists (so Keras loads it
    without a download), or the absolute path of an existing weights file.
    """
    if arch not in IMAGENET_FILES:
        raise ConfigError(
            f"no ImageNet weights known for {arch!r}; known: {', '.join(sorted(IMAGENET_FILES))}"
        )
    if weights is None:
        return None
    if not isinstance(weights, str) or not weights.strip():
        raise ConfigError(f"weights must be 'none', 'imagenet' or a file path, got {weights!r}")
    keyword = weights.strip().lower()
    if keyword == "none":
        return None
    if keyword == "imagenet":
        fname = IMAGENET_FILES[arch]
        folder = keras_cache_dir()
        if not (folder / fname).is_file():
            raise ConfigError(
                f"ImageNet weights for {arch} are not cached and this machine is offline: put "
                f"{fname} in {folder} (or set KERAS_HOME), or set train.weights: <path to {fname}>"
            )
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"weights file for {arch} not found: {path}")
    if not path.name.lower().endswith(_WEIGHT_SUFFIXES):
        raise ConfigError(
            f"weights file for {arch} must be a Keras .h5 weights file "
            f"(like {IMAGENET_FILES[arch]}), got {path}"
        )
    return str(path.resolve())


def imagenet_base(
    arch: str,
    application: Callable[..., keras.Model],
    inputs: Any,
    input_shape: tuple[int, int, int],
    weights: str | None,
    **kwargs: Any,
) -> keras.Model:
    """A keras.applications base (no top) wired onto `inputs`, weights resolved offline.

    Passing `input_tensor` (instead of calling the base as a nested model) keeps every base
    layer directly in the final model, so Grad-CAM can take `model.get_layer("block5_conv4")`
    and per-layer freezing needs no recursion. Load failures for a user-given file become a
    ConfigError naming the file, not an h5py traceback.
    """
    resolved = resolve_weights(arch, weights)
    try:
        return application(
            include_top=False,
            weights=resolved,
            input_tensor=inputs,
            input_shape=input_shape,
            **kwargs,
        )
    except Exception as err:
        if resolved is None:
            raise
        source = (
            f"the Keras cache ({keras_cache_dir() / IMAGENET_FILES[arch]}; corrupt or partial?)"
            if resolved == "imagenet"
            else resolved
        )
        raise ConfigError(
            f"could not load {arch} weights from {source}: {error_line(err)}"
        ) from err


def is_random_init(weights: str | None) -> bool:
    """True for the spellings of "no pretrained weights"."""
    return weights is None or (isinstance(weights, str) and weights.strip().lower() == "none")


def freeze(model: keras.Model, *, weights: str | None, name: str) -> None:
    """Freeze every layer of a base; warn when the frozen features are random.

    A frozen randomly-initialised base trains only the head on noise features: legal (tests
    and smoke runs do it) but almost never what a real run wants.
    """
    model.trainable = False
    if is_random_init(weights):
        warnings.warn(
            f"{name}: the base is frozen but has random weights (weights 'none'); only the head "
            "will learn. Use weights 'imagenet'/<path> or freeze_base: false.",
            UserWarning,
            stacklevel=3,
        )
