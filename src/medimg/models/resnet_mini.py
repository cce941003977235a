"""Seed 000's ResNet (Rosebrock, DL4CV "ResNet" with the CIFAR stem), for 64 px malaria cells.

Pre-activation bottleneck modules (BN-ReLU-conv 1x1 K/4, BN-ReLU-conv 3x3 K/4, BN-ReLU-conv 1x1
K; a strided 1x1 projection of the first activation on the shortcut when the shape changes),
stages (3, 4, 6) with filters (64 | 128, 256, 512), BN eps 2e-5 / momentum 0.9, bias-free convs
and L2 5e-4, exactly as the tutorial called `ResNet.build(64, 64, 3, 2, (3, 4, 6),
(64, 128, 256, 512), reg=0.0005)`.

Deliberate differences, each so the model works on arbitrary sizes or fits the pipeline:
- the final 8x8 AveragePooling + Flatten becomes global average pooling (at 64 px the stage-3
  map is 16x16, so the original fed 2x2x512 = 2048 features to the classifier; GAP feeds 512
  and accepts any input size);
- the original's non-reducing modules silently used DL4CV's default reg 1e-4 (the argument was
  not forwarded); here L2 applies uniformly, as the tutorial text intends;
- a Rescaling(1/255) layer replaces the generator's rescale, before the DL4CV input BN;
- two classes use one sigmoid unit instead of a 2-way softmax (one probability per image).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import layers

from medimg.errors import ConfigError
from medimg.models.layers import (
    check_fraction,
    check_non_negative,
    classification_head,
    regularizer,
    unit_rescaling,
)
from medimg.models.registry import register_model


def _residual_module(
    x: Any,
    filters: int,
    stride: int,
    *,
    reduce: bool,
    reg: keras.regularizers.Regularizer | None,
    bn: dict[str, float],
    name: str,
) -> Any:
    shortcut = x
    act1 = layers.Activation("relu", name=f"{name}_relu1")(
        layers.BatchNormalization(**bn, name=f"{name}_bn1")(x)
    )
    y = layers.Conv2D(
        filters // 4, 1, use_bias=False, kernel_regularizer=reg, name=f"{name}_conv1"
    )(act1)
    y = layers.Activation("relu", name=f"{name}_relu2")(
        layers.BatchNormalization(**bn, name=f"{name}_bn2")(y)
    )
    y = layers.Conv2D(
        filters // 4,
        3,
        strides=stride,
        padding="same",
        use_bias=False,
        kernel_regularizer=reg,
        name=f"{name}_conv2",
    )(y)
    y = layers.Activation("relu", name=f"{name}_relu3")(
        layers.BatchNormalization(**bn, name=f"{name}_bn3")(y)
    )
    y = layers.Conv2D(filters, 1, use_bias=False, kernel_regularizer=reg, name=f"{name}_conv3")(y)
    if reduce:
        shortcut = layers.Conv2D(
            filters,
            1,
            strides=stride,
            use_bias=False,
            kernel_regularizer=reg,
            name=f"{name}_proj",
        )(act1)
    return layers.Add(name=f"{name}_add")([y, shortcut])


@register_model(
    "resnet_mini", default_size=64, optimizer="sgd", learning_rate=1e-1, schedule="poly"
)
def resnet_mini(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    stages: Sequence[int] = (3, 4, 6),
    filters: Sequence[int] = (64, 128, 256, 512),
    l2: float = 5e-4,
    bn_epsilon: float = 2e-5,
    bn_momentum: float = 0.9,
) -> keras.Model:
    """Seed 000 DL4CV pre-activation bottleneck ResNet, stages (3, 4, 6), L2 5e-4, GAP head.

    Params: `stages` (modules per stage), `filters` (stem width then one width per stage, so
    len(filters) == len(stages) + 1), `l2` (kernel L2 factor), `bn_epsilon`, `bn_momentum`.
    """
    try:
        stage_list = [int(s) for s in stages]
        filter_list = [int(f) for f in filters]
    except (TypeError, ValueError):
        stage_list, filter_list = [], []
    if (
        not stage_list
        or min(stage_list) < 1
        or len(filter_list) != len(stage_list) + 1
        or min(filter_list) < 4
    ):
        raise ConfigError(
            "resnet_mini: need stages >= 1 each and len(filters) == len(stages) + 1 "
            f"(filters >= 4), got stages={stages!r}, filters={filters!r}"
        )
    reg = regularizer(check_non_negative("resnet_mini", "l2", l2))
    bn = {
        "epsilon": check_non_negative("resnet_mini", "bn_epsilon", bn_epsilon),
        "momentum": check_fraction("resnet_mini", "bn_momentum", bn_momentum),
    }

    inputs = keras.Input(shape=input_shape, name="image")
    x = unit_rescaling()(inputs)
    x = layers.BatchNormalization(**bn, name="input_bn")(x)
    x = layers.Conv2D(
        filter_list[0], 3, padding="same", use_bias=False, kernel_regularizer=reg, name="stem_conv"
    )(x)
    for i, (blocks, width) in enumerate(zip(stage_list, filter_list[1:], strict=True)):
        stride = 1 if i == 0 else 2
        x = _residual_module(
            x, width, stride, reduce=True, reg=reg, bn=bn, name=f"stage{i + 1}_block1"
        )
        for j in range(1, blocks):
            x = _residual_module(
                x, width, 1, reduce=False, reg=reg, bn=bn, name=f"stage{i + 1}_block{j + 1}"
            )
    x = layers.BatchNormalization(**bn, name="final_bn")(x)
    x = layers.Activation("relu", name="final_relu")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = classification_head(x, num_classes, kernel_regularizer=reg)
    return keras.Model(inputs, outputs, name="resnet_mini")
