"""What one architecture trains with: its seed recipe merged with params, as a pure value.

Each architecture brings its seed's recipe (input size, optimiser, schedule) from the model
registry; `train:` in params overrides it for all, `train.overrides.<arch>` for one. The plan
is a frozen value (`resolve_plan`), so what ran is exactly what MLflow records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import keras

from medimg.config import Params
from medimg.errors import ConfigError


@dataclass(frozen=True)
class TrainPlan:
    arch: str
    image_size: int
    epochs: int
    batch_size: int
    optimizer: str
    learning_rate: float
    schedule: str
    weights: str
    augmentation: bool = True
    model_params: dict[str, Any] = field(default_factory=dict)


def resolve_plan(params: Params, arch: str) -> TrainPlan:
    """Model recipe ← `train:` ← `train.overrides.<arch>`; unknown names fail here."""
    from medimg.models import get_spec

    spec = get_spec(arch)
    t = params.train
    o = t.overrides.get(arch)

    def pick(name: str, recipe: Any) -> Any:
        for value in (getattr(o, name, None), getattr(t, name, None)):
            if value is not None:
                return value
        return recipe

    return TrainPlan(
        arch=arch,
        image_size=pick("image_size", spec.default_size),
        epochs=pick("epochs", None),
        batch_size=pick("batch_size", None),
        optimizer=pick("optimizer", spec.optimizer),
        learning_rate=pick("learning_rate", spec.learning_rate),
        schedule=pick("schedule", spec.schedule),
        weights=pick("weights", "none"),
        augmentation=pick("augmentation", spec.augmentation),  # `train:` has no such key
        model_params=dict(o.model) if o else {},
    )


def check_architectures(params: Params) -> None:
    from medimg.models import list_models

    known = set(list_models())
    for i, arch in enumerate(params.train.architectures):
        if arch not in known:
            raise ConfigError(
                f"params.yaml: train.architectures.{i}: unknown architecture {arch!r}; "
                f"available: {', '.join(sorted(known))}"
            )
    for arch in params.train.overrides:
        if arch not in known:
            raise ConfigError(f"params.yaml: train.overrides.{arch}: unknown architecture")


def model_kwargs(plan: TrainPlan) -> dict[str, Any]:
    """Builder params; `weights` only for ImageNet families (from-scratch models have none)."""
    from medimg.models import get_spec

    extra = {"weights": plan.weights} if get_spec(plan.arch).pretrained else {}
    return {**extra, **plan.model_params}


def learning_rate(plan: TrainPlan, steps_per_epoch: int) -> Any:
    """The plan's learning rate: a constant, or a schedule over optimizer steps. 'poly' =
    linear decay to 0 (power 1); 'cosine' = one epoch of linear warm-up from 0, then cosine
    decay to 0; 'plateau' is a callback (ReduceLROnPlateau) on a constant."""
    total = max(1, plan.epochs * steps_per_epoch)
    if plan.schedule == "poly":
        return keras.optimizers.schedules.PolynomialDecay(
            plan.learning_rate, decay_steps=total, power=1.0
        )
    if plan.schedule == "cosine":
        warmup = min(steps_per_epoch, total // 2)
        return keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=total - warmup, warmup_target=plan.learning_rate, warmup_steps=warmup
        )
    return plan.learning_rate


def make_optimizer(plan: TrainPlan, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """SGD+momentum 0.9 (seed 000), Adam, RMSprop, on `learning_rate(plan, ...)`."""
    lr = learning_rate(plan, steps_per_epoch)
    if plan.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=0.9)
    if plan.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(lr)
    return keras.optimizers.Adam(lr)


def compile_model(
    model: keras.Model,
    plan: TrainPlan,
    num_classes: int,
    steps: int,
    xla: bool,
    label_smoothing: float = 0.0,
) -> None:
    """Loss, metrics and optimizer. `label_smoothing` (binary only: Keras' sparse categorical
    loss has none) pulls targets to eps/2 and 1 - eps/2, against over-confident outputs."""
    binary = num_classes == 2
    if label_smoothing and not binary:
        raise ConfigError("train.label_smoothing: only for two classes (sigmoid output)")
    metrics = (
        [keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")]
        if binary
        else [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    )
    loss = (
        keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
        if binary
        else "sparse_categorical_crossentropy"
    )
    model.compile(make_optimizer(plan, steps), loss=loss, metrics=metrics, jit_compile=xla)


def class_weights(counts: dict[str, int], classes: list[str]) -> dict[int, float]:
    """Balanced weights n / (k * n_c), as sklearn's 'balanced', from the train counts."""
    total = sum(counts[c] for c in classes)
    return {i: total / (len(classes) * max(1, counts[c])) for i, c in enumerate(classes)}
