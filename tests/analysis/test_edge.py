"""TFLite export: float parity, quantized size and accuracy, the parity gate, speed, writes.

Conversions cost seconds each on a shared CPU, so models and files are built once per module.
`tiny` (no batch norm, trains in ~2 s) carries the accuracy checks; `compact_cnn` (the edge
model, ~125k parameters) carries the file-size checks, which do not depend on training.
"""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import pytest

from medimg.analysis.edge import (
    TFLiteModel,
    _dequantize,
    _quantize,
    agreement,
    check_parity,
    images_per_second,
    to_tflite,
    write_tflite,
)
from medimg.errors import ConfigError, DataError, MedimgError
from medimg.models import build_model

SIZE = 32


def toy_task(n: int, seed: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Dark noise; every odd image gets a bright 8x8 square somewhere (label 1)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 60, (n, size, size, 3)).astype(np.float32)
    y = np.arange(n) % 2
    for i in np.flatnonzero(y):
        r, c = rng.integers(2, size - 10, 2)
        x[i, r : r + 8, c : c + 8] = 230
    return x, y.astype(np.float32)


@pytest.fixture(scope="module")
def trained_tiny() -> tuple[keras.Model, np.ndarray, np.ndarray]:
    """A tiny model that has learnt the toy task, its training images and a held-out batch."""
    keras.utils.set_random_seed(0)
    model = build_model("tiny", (SIZE, SIZE, 3), 2)
    model.compile(keras.optimizers.Adam(0.02), "binary_crossentropy")
    x, y = toy_task(256, seed=1)
    model.fit(x, y, batch_size=32, epochs=10, verbose=0)
    held_out, labels = toy_task(128, seed=2)
    probs = model.predict(held_out, verbose=0)
    assert ((probs[:, 0] >= 0.5) == labels).mean() >= 0.9, "toy model did not learn"
    assert np.ptp(probs) > 0.2, "toy model outputs are nearly constant"
    return model, x, held_out


@pytest.fixture(scope="module")
def tiny_float(trained_tiny) -> bytes:
    return to_tflite(trained_tiny[0])


@pytest.fixture(scope="module")
def compact_sizes() -> dict[str, int]:
    model = build_model("compact_cnn", (SIZE, SIZE, 3), 2)
    calib = np.random.default_rng(0).uniform(0, 255, (8, SIZE, SIZE, 3)).astype(np.float32)
    return {q: len(to_tflite(model, q, calib)) for q in ("none", "float16", "int8")}


def test_float_export_matches_keras_probabilities(trained_tiny, tiny_float):
    model, _, held_out = trained_tiny
    expected = model.predict(held_out, verbose=0)
    got = TFLiteModel(tiny_float).predict(held_out, batch_size=16)
    assert got.shape == expected.shape == (len(held_out), 1) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert agreement(expected, got) == 1.0


def test_multiclass_float_export_matches_softmax():
    model = build_model("tiny", (SIZE, SIZE, 3), 4)
    images = np.random.default_rng(3).uniform(0, 255, (12, SIZE, SIZE, 3)).astype(np.float32)
    expected = model.predict(images, verbose=0)
    got = TFLiteModel(to_tflite(model)).predict(images, batch_size=5)
    assert got.shape == expected.shape == (12, 4)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    assert agreement(expected, got) == 1.0


def test_float16_halves_and_int8_quarters_the_file(compact_sizes):
    full, half, int8 = compact_sizes["none"], compact_sizes["float16"], compact_sizes["int8"]
    assert 0.45 * full <= half <= 0.6 * full
    # Weights are exactly 1/4, but per-channel scales (float32) and zero points (int64) add
    # ~48 kB on this 125k-parameter model, so the file lands at ~0.38-0.40x; bigger models
    # approach 0.26x.
    assert int8 <= 0.42 * full and int8 < half


def test_int8_is_full_integer_with_float_io_and_keeps_decisions(trained_tiny):
    model, train_images, held_out = trained_tiny
    content = to_tflite(model, "int8", representative=train_images[:64])
    details = _tensor_details(content)
    assert details[0]["dtype"] == np.float32, "input stays raw float pixels"
    assert any(d["dtype"] == np.int8 for d in details), "no int8 tensors: not quantized"
    expected = model.predict(held_out, verbose=0)
    got = TFLiteModel(content).predict(held_out, batch_size=32)
    assert got.shape == expected.shape and ((got >= 0) & (got <= 1)).all()
    assert check_parity(expected, got, min_agreement=0.95) >= 0.95
    assert np.abs(got - expected).max() < 0.05


def _tensor_details(content: bytes) -> list[dict]:
    """Input detail first, then every tensor, read with TF's own interpreter."""
    import tensorflow as tf

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interp = tf.lite.Interpreter(model_content=content)
    return [interp.get_input_details()[0], *interp.get_tensor_details()]


def test_int8_needs_valid_representative_images():
    model = build_model("tiny", (SIZE, SIZE, 3), 2)
    with pytest.raises(ConfigError, match="representative images"):
        to_tflite(model, "int8")
    with pytest.raises(ConfigError, match=r"shape \(N>=1, 32, 32, 3\)"):
        to_tflite(model, "int8", representative=np.zeros((4, 16, 16, 3), np.float32))
    with pytest.raises(ConfigError, match="quantize must be one of"):
        to_tflite(model, "int4")  # type: ignore[arg-type]


def test_check_parity_raises_below_bound_with_the_numbers():
    keras_probs = np.linspace(0, 1, 100)[:, None]
    tflite_probs = keras_probs.copy()
    tflite_probs[[10, 60, 90]] = 1 - tflite_probs[[10, 60, 90]]  # 3 decisions flip
    with pytest.raises(MedimgError) as err:
        check_parity(keras_probs, tflite_probs, min_agreement=0.99)
    message = str(err.value)
    assert "0.9700" in message and "0.9900" in message and "\n" not in message
    assert err.value.exit_code == 1
    assert check_parity(keras_probs, tflite_probs, min_agreement=0.95) == pytest.approx(0.97)


def test_agreement_binary_threshold_and_multiclass_argmax():
    assert agreement(np.array([0.2, 0.6]), np.array([[0.4], [0.55]])) == 1.0
    assert agreement(np.array([0.2, 0.6]), np.array([0.4, 0.55]), threshold=0.58) == 0.5
    a = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4]])
    b = np.array([[0.5, 0.3, 0.2], [0.1, 0.4, 0.5]])
    assert agreement(a, b) == 0.5
    with pytest.raises(ValueError, match="shapes"):
        agreement(a, b[:1])


def test_threads_give_identical_outputs_and_batches_match_singles(trained_tiny, tiny_float):
    _, _, held_out = trained_tiny
    images = held_out[:20]
    one, two = TFLiteModel(tiny_float, threads=1), TFLiteModel(tiny_float, threads=2)
    assert one.input_size == SIZE
    single = one.predict(images)
    np.testing.assert_array_equal(single, two.predict(images))
    batched = two.predict(images, batch_size=8)  # 8, 8 then a resized batch of 4
    assert batched.shape == single.shape == (20, 1)
    np.testing.assert_allclose(batched, single, atol=1e-6)
    with pytest.raises(DataError, match="shape"):
        one.predict(np.zeros((2, 16, 16, 3), np.float32))
    with pytest.raises(ConfigError):
        TFLiteModel(tiny_float, threads=0)


def test_images_per_second_is_positive_and_finite(trained_tiny, tiny_float):
    model = TFLiteModel(tiny_float)
    images = trained_tiny[2][:4]
    rate = images_per_second(model.predict, images, min_seconds=0.05)
    assert rate > 0 and math.isfinite(rate)
    assert images_per_second(model.predict, images, batch_size=3, min_seconds=0.05) > 0
    with pytest.raises(ValueError):
        images_per_second(model.predict, images[:0])


def test_quantized_io_tensors_round_trip_through_scale_and_zero_point():
    detail = {"dtype": np.uint8, "quantization": (1.0, 0)}
    pixels = np.array([0.0, 12.4, 254.6, 300.0], np.float32)
    np.testing.assert_array_equal(_quantize(pixels, detail), [0, 12, 255, 255])
    out = {"dtype": np.int8, "quantization": (1 / 256, -128)}
    np.testing.assert_allclose(
        _dequantize(np.array([-128, 0, 127], np.int8), out), [0, 0.5, 255 / 256]
    )


def test_write_tflite_is_atomic_and_refuses_non_tflite_bytes(tmp_path, tiny_float):
    dest = write_tflite(tiny_float, tmp_path / "models" / "tiny.tflite")
    assert dest.read_bytes() == tiny_float
    bad = tmp_path / "bad.tflite"
    with pytest.raises(MedimgError, match="not a TFLite"):
        write_tflite(b"<html>not a model</html>", bad)
    assert not bad.exists()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["tiny.tflite"]


def test_nested_functional_model_exports_like_any_layer():
    inner_in = keras.Input((SIZE, SIZE, 3))
    inner_out = keras.layers.Conv2D(4, 3, activation="relu")(
        keras.layers.Rescaling(1 / 255)(inner_in)
    )
    inner = keras.Model(inner_in, inner_out, name="base")
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.GlobalAveragePooling2D()(inner(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x), name="nested")
    images = np.random.default_rng(4).uniform(0, 255, (6, SIZE, SIZE, 3)).astype(np.float32)
    got = TFLiteModel(to_tflite(model)).predict(images, batch_size=6)
    np.testing.assert_allclose(got, model.predict(images, verbose=0), atol=1e-5)


def test_mixed_precision_model_is_exported_at_float32(trained_tiny):
    """GPU runs train under mixed_float16, whose float16 ops have no TFLite kernels."""
    model, _, held_out = trained_tiny
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        mixed = build_model("tiny", (SIZE, SIZE, 3), 2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    mixed.set_weights(model.get_weights())
    got = TFLiteModel(to_tflite(mixed)).predict(held_out[:16], batch_size=16)
    np.testing.assert_allclose(got, model.predict(held_out[:16], verbose=0), atol=1e-5)
    assert mixed.dtype_policy.name == "mixed_float16", "the caller's model is left untouched"
