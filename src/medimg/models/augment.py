"""The seeds' ImageDataGenerator augmentation as one Keras preprocessing layer.

Keras random layers act only when called with `training=True`, so wrapping the augmenter in
front of a model augments inside the training graph (on the accelerator, any backend) and is
off at evaluation and in the saved model, which never contains it.

Keras ships RandomRotation/Zoom/Translation/Shear/Flip, but chaining them resamples every image
five times: five times the cost, and each bilinear pass blurs the one-pixel chromatin dots we
classify on. `RandomAffine` composes the same draws into one matrix per image and resamples
once, as ImageDataGenerator does, through `keras.ops.image.affine_transform`.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from medimg.config import AugmentConfig


@keras.saving.register_keras_serializable(package="medimg")
class RandomAffine(keras.layers.Layer):
    """Per-image rotation, zoom, shift, shear and flips in one resampling, fill 'nearest'.

    rotation_deg: angle drawn from ±rotation_deg; zoom: scale from 1±zoom (same on both axes);
    shift: translation from ±shift of the height/width; shear: shear factors (tan of the angle)
    from ±shear on each axis; flips: each with probability 0.5.
    """

    def __init__(
        self,
        rotation_deg: float = 0.0,
        zoom: float = 0.0,
        shift: float = 0.0,
        shear: float = 0.0,
        horizontal_flip: bool = False,
        vertical_flip: bool = False,
        seed: int | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("dtype", "float32")  # interpolate in float32 under mixed precision
        super().__init__(**kwargs)
        self.rotation_deg = float(rotation_deg)
        self.zoom = float(zoom)
        self.shift = float(shift)
        self.shear = float(shear)
        self.horizontal_flip = bool(horizontal_flip)
        self.vertical_flip = bool(vertical_flip)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def get_config(self) -> dict:
        return super().get_config() | {
            "rotation_deg": self.rotation_deg,
            "zoom": self.zoom,
            "shift": self.shift,
            "shear": self.shear,
            "horizontal_flip": self.horizontal_flip,
            "vertical_flip": self.vertical_flip,
            "seed": self.seed,
        }

    def compute_output_shape(self, input_shape):
        return input_shape

    def _uniform(self, n, bound: float):
        return keras.random.uniform((n,), -bound, bound, seed=self.seed_generator)

    def _flip_sign(self, n, enabled: bool):
        if not enabled:
            return ops.ones((n,))
        return ops.where(keras.random.uniform((n,), seed=self.seed_generator) < 0.5, -1.0, 1.0)

    def transforms(self, n, height, width):
        """(n, 8) output→input maps about the image centre, as affine_transform expects."""
        theta = self._uniform(n, math.radians(self.rotation_deg))
        scale = 1.0 + self._uniform(n, self.zoom)
        shx, shy = self._uniform(n, self.shear), self._uniform(n, self.shear)
        tx = self._uniform(n, self.shift) * ops.cast(width, "float32")
        ty = self._uniform(n, self.shift) * ops.cast(height, "float32")
        dx = scale * self._flip_sign(n, self.horizontal_flip)
        dy = scale * self._flip_sign(n, self.vertical_flip)
        c, s = ops.cos(theta), ops.sin(theta)
        # M = Rotation(theta) · Shear(shx, shy) · diag(dx, dy)
        m00, m01 = (c - s * shy) * dx, (c * shx - s) * dy
        m10, m11 = (s + c * shy) * dx, (s * shx + c) * dy
        cx = (ops.cast(width, "float32") - 1.0) / 2.0
        cy = (ops.cast(height, "float32") - 1.0) / 2.0
        a2 = cx - m00 * cx - m01 * cy + tx
        b2 = cy - m10 * cx - m11 * cy + ty
        zeros = ops.zeros((n,))
        return ops.stack([m00, m01, a2, m10, m11, b2, zeros, zeros], axis=1)

    def call(self, images, training=True):
        if not training:
            return images
        shape = ops.shape(images)
        matrix = self.transforms(shape[0], shape[1], shape[2])
        return ops.image.affine_transform(
            images, matrix, interpolation="bilinear", fill_mode="nearest"
        )


# RGB → YIQ: Y is luma, (I, Q) the chroma plane; a hue shift is a rotation of (I, Q).
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


@keras.saving.register_keras_serializable(package="medimg")
class RandomColor(keras.layers.Layer):
    """Per-image brightness, contrast, saturation and hue jitter on 0-255 RGB, training only.

    Thin smears differ between patients and slides in stain intensity and hue (Giemsa batches,
    illumination): the shift the patient split exposes. brightness: a factor from 1±brightness;
    contrast: about the image mean, from 1±contrast; saturation: the chroma scaled from
    1±saturation; hue: the chroma plane rotated by ±hue x 180°. One 3x3 colour matrix per image
    (YIQ), then clipped to [0, 255].
    """

    def __init__(
        self,
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
        hue: float = 0.0,
        seed: int | None = None,
        **kwargs,
    ) -> None:
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.saturation, self.hue = float(saturation), float(hue)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def get_config(self) -> dict:
        return super().get_config() | {
            "brightness": self.brightness,
            "contrast": self.contrast,
            "saturation": self.saturation,
            "hue": self.hue,
            "seed": self.seed,
        }

    def compute_output_shape(self, input_shape):
        return input_shape

    def _factor(self, n, bound: float):
        return 1.0 + keras.random.uniform((n,), -bound, bound, seed=self.seed_generator)

    def matrices(self, n):
        """(n, 3, 3) RGB → RGB colour matrices: YIQ, chroma scale and rotation, back."""
        yiq = ops.convert_to_tensor(_YIQ, "float32")
        rgb = ops.inv(yiq)
        sat = self._factor(n, self.saturation)
        angle = keras.random.uniform((n,), -self.hue, self.hue, seed=self.seed_generator)
        c, s = ops.cos(angle * math.pi) * sat, ops.sin(angle * math.pi) * sat
        one, zero = ops.ones((n,)), ops.zeros((n,))
        chroma = ops.stack([one, zero, zero, zero, c, -s, zero, s, c], axis=1)
        chroma = ops.reshape(chroma, (n, 3, 3))
        return ops.einsum("ij,njk,kl->nil", rgb, chroma, yiq)

    def call(self, images, training=True):
        if not training:
            return images
        n = ops.shape(images)[0]
        x = ops.einsum("nhwc,ndc->nhwd", images, self.matrices(n))
        mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
        contrast = ops.reshape(self._factor(n, self.contrast), (-1, 1, 1, 1))
        bright = ops.reshape(self._factor(n, self.brightness), (-1, 1, 1, 1))
        return ops.clip(((x - mean) * contrast + mean) * bright, 0.0, 255.0)


def build_augmenter(cfg: AugmentConfig, seed: int) -> keras.layers.Layer:
    """The params' augmentation: the seeds' geometry (one RandomAffine) and, when any of
    `train.augment.color` is set, colour jitter after it."""
    geometry = cfg.model_dump(exclude={"color"})
    affine = RandomAffine(**geometry, seed=seed, name="augment")
    if not any(cfg.color.model_dump().values()):
        return affine
    color = RandomColor(**cfg.color.model_dump(), seed=seed + 1, name="augment_color")
    return keras.Sequential([affine, color], name="augment_all")


def with_augmentation(model: keras.Model, augmenter: keras.layers.Layer) -> keras.Model:
    """A training wrapper sharing `model`'s weights; save `model`, train the wrapper."""
    inputs = keras.Input(shape=model.input_shape[1:], name="image")
    outputs = model(augmenter(inputs))
    return keras.Model(inputs, outputs, name=f"{model.name}_train")
