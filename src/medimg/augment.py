"""The seeds' ImageDataGenerator augmentation as Keras preprocessing layers.

Keras random layers act only when called with `training=True`, so wrapping them in front of a
model augments inside the training graph (on the accelerator, any backend) and is off at
evaluation and in the saved model, which never contains them.
"""

from __future__ import annotations

import keras

from medimg.config import AugmentConfig


def build_augmenter(cfg: AugmentConfig, seed: int) -> keras.Sequential:
    """rotation, zoom, shift, shear and flips with fill 'nearest', as in seeds 000/001/003."""
    layers: list[keras.layers.Layer] = []
    flip = {(True, True): "horizontal_and_vertical", (True, False): "horizontal"}.get(
        (cfg.horizontal_flip, cfg.vertical_flip), "vertical" if cfg.vertical_flip else None
    )
    if flip:
        layers.append(keras.layers.RandomFlip(flip, seed=seed))
    if cfg.rotation_deg:
        layers.append(
            keras.layers.RandomRotation(cfg.rotation_deg / 360.0, fill_mode="nearest", seed=seed)
        )
    if cfg.zoom:
        layers.append(keras.layers.RandomZoom(cfg.zoom, fill_mode="nearest", seed=seed))
    if cfg.shift:
        layers.append(
            keras.layers.RandomTranslation(cfg.shift, cfg.shift, fill_mode="nearest", seed=seed)
        )
    if cfg.shear:
        layers.append(
            keras.layers.RandomShear(
                x_factor=cfg.shear, y_factor=cfg.shear, fill_mode="nearest", seed=seed
            )
        )
    return keras.Sequential(layers, name="augment")


def with_augmentation(model: keras.Model, augmenter: keras.Sequential) -> keras.Model:
    """A training wrapper sharing `model`'s weights; save `model`, train the wrapper."""
    inputs = keras.Input(shape=model.input_shape[1:], name="image")
    outputs = model(augmenter(inputs))
    return keras.Model(inputs, outputs, name=f"{model.name}_train")
