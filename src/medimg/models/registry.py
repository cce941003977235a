"""Name → architecture registry, so params.yaml can pick a model by string.

Each family module registers its builders with `@register_model`, carrying the seed recipe's
training defaults (input size, optimizer, learning rate, schedule) next to the code that needs
them, so the trainer never hard-codes per-architecture knowledge. `build_model` is the one
entry point that turns user input into a model, so it is where user mistakes (unknown name,
misspelt param, weights for a from-scratch model) become a one-line `ConfigError`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

import keras

from medimg.config import Optimizer, Schedule
from medimg.errors import ConfigError

OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
SCHEDULES: tuple[str, ...] = get_args(Schedule)

Builder = Callable[..., keras.Model]


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture and the recipe it was published with."""

    name: str
    builder: Builder
    default_size: int
    optimizer: str
    learning_rate: float
    schedule: str
    pretrained: bool
    description: str
    # Smallest H/W the architecture accepts (InceptionV3 needs 75 px, the rest 32 px); checked
    # up front so a too-small image_size is a ConfigError, not a Keras shape error deep inside.
    min_size: int = 32
    # Whether the recipe trained with ImageDataGenerator augmentation (`train.augment`):
    # seed 001's basic CNN and frozen VGG-19 and seed 004's InceptionV3 did not.
    augmentation: bool = True


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    name: str,
    *,
    default_size: int,
    optimizer: str,
    learning_rate: float,
    schedule: str,
    pretrained: bool = False,
    min_size: int = 32,
    augmentation: bool = True,
) -> Callable[[Builder], Builder]:
    """Register `builder(input_shape, num_classes, **params)` under `name`.

    Mistakes here are programming errors in the zoo itself (raised as ValueError at import),
    not user configuration errors.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"{name}: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"{name}: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not 0 < min_size <= default_size:
        raise ValueError(f"{name}: need 0 < min_size <= default_size")

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        doc = inspect.getdoc(builder) or ""
        _REGISTRY[name] = ModelSpec(
            name=name,
            builder=builder,
            default_size=default_size,
            optimizer=optimizer,
            learning_rate=learning_rate,
            schedule=schedule,
            pretrained=pretrained,
            description=doc.split("\n\n")[0].replace("\n", " "),
            min_size=min_size,
            augmentation=augmentation,
        )
        return builder

    return decorator


def list_models() -> list[str]:
    """Registered names, sorted (stable order for CLI listings and parametrised tests)."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The spec for `name`; an unknown name lists the valid ones so typos are self-correcting."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown model {name!r}; available: {', '.join(list_models())}"
        ) from None


def builder_params(name: str) -> dict[str, Any]:
    """The extra params a builder accepts, with their defaults (for docs and validation)."""
    sig = inspect.signature(get_spec(name).builder)
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _check_input_shape(spec: ModelSpec, input_shape: Any) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"{spec.name}: input_shape must be (height, width, 3), got {input_shape}")
    h, w, c = shape
    if c != 3:
        # Every family rescales RGB pixels (and ImageNet bases only exist for RGB); grey
        # images such as OCT scans are expanded to 3 channels by the data pipeline instead.
        raise ConfigError(f"{spec.name}: expects 3-channel RGB input, got {c} channels")
    if min(h, w) < spec.min_size:
        raise ConfigError(
            f"{spec.name}: image_size {h}x{w} is below the architecture's minimum "
            f"{spec.min_size}x{spec.min_size}"
        )
    return h, w, c


def build_model(
    name: str, input_shape: tuple[int, int, int], num_classes: int, **params: Any
) -> keras.Model:
    """A fresh, uncompiled model for `name` that takes raw 0-255 RGB pixels.

    Two classes give one float32 sigmoid unit (P(positive class)); more give a float32 softmax.
    """
    spec = get_spec(name)
    shape = _check_input_shape(spec, input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"{name}: num_classes must be an integer >= 2, got {num_classes!r}")

    params = dict(params)
    if not spec.pretrained and "weights" in params:
        weights = params.pop("weights")
        if weights not in (None, "none"):
            raise ConfigError(
                f"{name} is trained from scratch and takes no pretrained weights "
                f"(got weights {weights!r}); use 'none', e.g. via train.overrides.{name}.weights"
            )

    accepted = builder_params(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"{name}: unknown model parameter(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(sorted(accepted)) or '(none)'}"
        )
    return spec.builder(shape, num_classes, **params)
