"""Seed 001's VGG-19 transfer models: frozen feature extractor, then blocks 4-5 fine-tuned.

Both keep the seed's head (Flatten → 512 → 512 with dropout 0.3) so the published counts hold
(22,647,361 params at 125 px, 2,622,977 trainable when frozen). Input goes through Caffe-mode
preprocessing (RGB→BGR, ImageNet mean subtracted) because that is what the ImageNet VGG
weights were trained on; the seed's plain 1/255 rescale fed them out-of-distribution inputs.
"""

from __future__ import annotations

import keras
from keras import layers

from medimg.models.layers import CaffePreprocessing, check_fraction, classification_head
from medimg.models.registry import register_model
from medimg.models.weights import freeze, imagenet_base

# Layers left trainable by the fine-tuning recipe: the two deepest conv blocks, whose features
# are the most ImageNet-specific, while blocks 1-3 (edges, colour blobs) stay as learned.
FINETUNE_PREFIXES = ("block4_", "block5_")


def _vgg19(
    name: str, input_shape: tuple[int, int, int], num_classes: int, weights: str, dropout: float
) -> tuple[keras.Model, keras.Model]:
    dropout = check_fraction(name, "dropout", dropout)
    inputs = keras.Input(shape=input_shape, name="image")
    x = CaffePreprocessing(name="caffe_preprocess")(inputs)
    base = imagenet_base("vgg19", keras.applications.VGG19, x, input_shape, weights)
    x = layers.Flatten(name="head_flatten")(base.output)
    for i in (1, 2):
        x = layers.Dense(512, activation="relu", name=f"head_fc{i}")(x)
        x = layers.Dropout(dropout, name=f"head_dropout{i}")(x)
    outputs = classification_head(x, num_classes)
    return keras.Model(inputs, outputs, name=name), base


@register_model(
    "vgg19_frozen",
    default_size=125,
    optimizer="rmsprop",
    learning_rate=1e-4,
    schedule="plateau",
    pretrained=True,
    augmentation=False,
)
def vgg19_frozen(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    weights: str = "none",
    dropout: float = 0.3,
) -> keras.Model:
    """Seed 001 VGG-19 (ImageNet) as a frozen feature extractor + 512-512 dense head.

    Params: `weights` ("none" | "imagenet" | path to the notop .h5), `dropout` (0.3 in the seed).
    """
    model, base = _vgg19("vgg19_frozen", input_shape, num_classes, weights, dropout)
    freeze(base, weights=weights, name="vgg19_frozen")
    return model


@register_model(
    "vgg19_finetune",
    default_size=125,
    optimizer="rmsprop",
    learning_rate=1e-5,
    schedule="plateau",
    pretrained=True,
)
def vgg19_finetune(
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    weights: str = "none",
    dropout: float = 0.3,
) -> keras.Model:
    """Seed 001 VGG-19 (ImageNet) with blocks 4 and 5 fine-tuned at a low learning rate.

    Params: `weights` ("none" | "imagenet" | path to the notop .h5), `dropout` (0.3 in the seed).
    """
    model, base = _vgg19("vgg19_finetune", input_shape, num_classes, weights, dropout)
    for layer in base.layers:
        layer.trainable = layer.name.startswith(FINETUNE_PREFIXES)
    return model
