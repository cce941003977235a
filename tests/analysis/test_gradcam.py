"""Grad-CAM on toy models whose evidence is known: a bright square planted in a dark image."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
keras = pytest.importorskip("keras")

from medimg.analysis.gradcam import _resolve_path, grad_cam, overlay  # noqa: E402

SIZE, PATCH = 32, 8


def last_conv_layer(model: keras.Model) -> str:
    """The layer `grad_cam` picks by default, as a `/`-joined path through nested models."""
    return "/".join(_resolve_path(model, None))


def planted(n: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Dark noisy RGB images, each with one bright PATCH x PATCH square; returns the masks too."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.0, 0.1, (n, SIZE, SIZE, 3)).astype("float32")
    masks = np.zeros((n, SIZE, SIZE), dtype=bool)
    for i in range(n):
        r, c = rng.integers(0, SIZE - PATCH, 2)
        images[i, r : r + PATCH, c : c + PATCH] = 0.9
        masks[i, r : r + PATCH, c : c + PATCH] = True
    return images, masks


def _features(inputs: keras.KerasTensor) -> keras.KerasTensor:
    """Channel 0 fires on bright pixels, channel 1 on dark ones; then a 2x2 max-pool.

    The pool makes the feature map smaller than the image, so the upsampling is exercised.
    """
    conv = keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="feat")
    x = conv(inputs)
    kernel = np.zeros((3, 3, 3, 2), dtype="float32")
    kernel[..., 0], kernel[..., 1] = 1 / 27, -1 / 27
    conv.set_weights([kernel, np.array([0.0, 0.5], dtype="float32")])
    return keras.layers.MaxPooling2D(2, name="pool")(x)


def _head(x: keras.KerasTensor, units: int = 1) -> keras.KerasTensor:
    """Bright evidence raises the positive class, dark evidence lowers it."""
    activation = "sigmoid" if units == 1 else "softmax"
    dense = keras.layers.Dense(units, activation=activation, name="head")
    y = dense(x)
    w = np.array([[8.0], [-8.0]]) if units == 1 else np.array([[-8.0, 8.0], [8.0, -8.0]])
    dense.set_weights([w.astype("float32"), np.full(units, 3.0 if units == 1 else 0.0, "float32")])
    return y


def flat_model(units: int = 1) -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.GlobalAveragePooling2D()(_features(inputs))
    return keras.Model(inputs, _head(x, units), name="flat")


def nested_model() -> keras.Model:
    """An application-like base with pooling inside (2-D output) wrapped in an outer model."""
    base_in = keras.Input((SIZE, SIZE, 3))
    base_out = keras.layers.GlobalAveragePooling2D()(_features(base_in))
    base = keras.Model(base_in, base_out, name="base")
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1.0, name="rescale")(inputs)
    return keras.Model(inputs, _head(base(x, training=False)), name="wrapper")


def heat_ratio(heat: np.ndarray, mask: np.ndarray) -> float:
    return float(heat[mask].mean() / max(heat[~mask].mean(), 1e-6))


def test_heatmap_finds_the_planted_patch() -> None:
    images, masks = planted()
    heat = grad_cam(flat_model(), images)
    assert heat.shape == (3, SIZE, SIZE)
    assert heat.min() >= 0.0 and heat.max() == pytest.approx(1.0)
    for h, m in zip(heat, masks, strict=True):
        assert m.ravel()[h.argmax()]
        assert heat_ratio(h, m) > 2.0


def test_negative_class_points_elsewhere() -> None:
    images, masks = planted()
    heat = grad_cam(flat_model(), images, class_index=0)
    for h, m in zip(heat, masks, strict=True):
        assert heat_ratio(h, m) < 0.5


def test_softmax_model_class_index() -> None:
    images, masks = planted(2)
    model = flat_model(units=2)
    predicted = model.predict(images, verbose=0).argmax(axis=1)
    bright, dark = grad_cam(model, images, class_index=1), grad_cam(model, images, class_index=0)
    for hb, hd, m in zip(bright, dark, masks, strict=True):
        assert heat_ratio(hb, m) > 2.0 and heat_ratio(hd, m) < 0.5
    auto = grad_cam(model, images)
    for i, k in enumerate(predicted):
        np.testing.assert_allclose(auto[i], (dark, bright)[k][i], atol=1e-6)


def test_nested_model_auto_layer_matches_flat() -> None:
    images, masks = planted()
    model = nested_model()
    assert last_conv_layer(model) == "base/pool"
    heat = grad_cam(model, images)
    np.testing.assert_allclose(heat, grad_cam(flat_model(), images), atol=1e-5)
    np.testing.assert_allclose(heat, grad_cam(model, images, layer_name="pool"), atol=1e-6)
    assert grad_cam(model, images, layer_name="base/feat").shape == (3, SIZE, SIZE)
    for h, m in zip(heat, masks, strict=True):
        assert heat_ratio(h, m) > 2.0


def test_base_with_4d_output_is_its_own_feature_map() -> None:
    base_in = keras.Input((SIZE, SIZE, 3))
    base = keras.Model(base_in, _features(base_in), name="backbone")
    model = keras.Sequential(
        [keras.Input((SIZE, SIZE, 3)), base, keras.layers.GlobalAveragePooling2D()]
    )
    model.add(keras.layers.Dense(1, activation="sigmoid"))
    model.layers[-1].set_weights([np.array([[8.0], [-8.0]], "float32"), np.array([3.0], "float32")])
    assert last_conv_layer(model) == "backbone"
    images, masks = planted(1)
    assert heat_ratio(grad_cam(model, images)[0], masks[0]) > 2.0


def test_unknown_layer_and_no_conv_are_errors() -> None:
    with pytest.raises(ValueError, match="no layer"):
        grad_cam(flat_model(), planted(1)[0], layer_name="nope")
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="4-D"):
        last_conv_layer(dense)


def test_overlay_is_uint8_rgb() -> None:
    images, _ = planted(1)
    heat = np.zeros((SIZE, SIZE), dtype="float32")
    out = overlay(images[0], heat, alpha=0.0)
    assert out.dtype == np.uint8 and out.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(out, np.round(images[0] * 255).astype(np.uint8))
    grey = overlay(np.full((SIZE, SIZE), 200, np.uint8), np.ones((SIZE, SIZE)), alpha=1.0)
    assert grey.shape == (SIZE, SIZE, 3) and grey[0, 0].tolist() != [200, 200, 200]
    with pytest.raises(ValueError):
        overlay(images[0], np.zeros((4, 4)))
