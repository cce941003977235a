"""EfficientNet-B0: the accuracy-per-parameter reference among the ImageNet edge candidates.

Keras' EfficientNet rescales and normalises inside the model, so it takes raw 0-255 pixels.
One trap is handled here: with `weights="imagenet"` Keras inserts an extra per-channel
1/sqrt(std) rescale after its Normalization layer (the ImageNet file stores std where a
variance belongs; see tensorflow/tensorflow#49930), but
with `weights=<path>` it builds the `weights=None` topology without it, so the same ImageNet
file would see differently scaled inputs. For a path, an equivalent per-channel affine
Rescaling is put in front of the base, making both routes compute the same function.
"""

from __future__ import annotations

import math

import keras
from keras import layers

from medimg.models.layers import check_bool, check_fraction, classification_head
from medimg.models.registry import register_model
from medimg.models.weights import freeze, imagenet_base

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)


def stddev_correction(name: str = "imagenet_std_correction") -> layers.Rescaling:
    """x → k·x + 255·m·(1 - k) per channel, with k = 1/sqrt(std) as in Keras' "imagenet" branch.

    Then Rescaling(1/255) → Normalization(mean m) sees k·(x/255 - m) + m, so its output is k
    times Normalization(x/255): exactly Keras' "imagenet" topology, whatever variance the file
    holds, as long as the file's mean is the ImageNet mean (true for the Keras ImageNet file).
    """
    scale = [1.0 / math.sqrt(s) for s in IMAGENET_STDDEV_RGB]
    offset = [255.0 * m * (1.0 - k) for m, k in zip(IMAGENET_MEAN_RGB, scale, strict=True)]
    return layers.Rescaling(scale=scale, offset=offset, name=name)


@register_model(
    "efficientnet_b0",
    default_size=128,
    optimizer="adam",
    learning_rate=1e-3,
    schedule="plateau",
    pretrained=True,
)
def efficientnet_b0(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    weights: str = "none",
    freeze_base: bool = False,
    dropout: float = 0.2,
) -> keras.Model:
    """EfficientNet-B0 (ImageNet) base + GAP, dropout 0.2 head; accuracy-per-MB reference.

    Params: `weights` ("none" | "imagenet" | path to the notop .h5), `freeze_base` (false),
    `dropout` (0.2).
    """
    freeze_base = check_bool("efficientnet_b0", "freeze_base", freeze_base)
    dropout = check_fraction("efficientnet_b0", "dropout", dropout)
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    if isinstance(weights, str) and weights.strip().lower() not in ("none", "imagenet"):
        x = stddev_correction()(x)
    base = imagenet_base(
        "efficientnet_b0", keras.applications.EfficientNetB0, x, input_shape, weights
    )
    if freeze_base:
        freeze(base, weights=weights, name="efficientnet_b0")
    x = layers.GlobalAveragePooling2D(name="head_gap")(base.output)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    outputs = classification_head(x, num_classes)
    return keras.Model(inputs, outputs, name="efficientnet_b0")
