"""Every family builds, predicts probabilities, keeps the seeds' sizes and saves safely."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pytest

import medimg.models as zoo
from medimg.models.efficientnet import IMAGENET_MEAN_RGB, stddev_correction
from medimg.models.layers import CAFFE_BGR_MEAN, CaffePreprocessing

MB = 1024 * 1024


def trainable_count(model: keras.Model) -> int:
    return int(sum(np.prod(w.shape) for w in model.trainable_weights))


def raw_pixels(batch: int, height: int, width: int | None = None, seed: int = 0) -> np.ndarray:
    """Raw 0-255 float pixels, the contract every zoo model takes."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 255.0, (batch, height, width or height, 3)).astype("float32")


@pytest.mark.parametrize("num_classes", [2, 4])
@pytest.mark.parametrize("name", zoo.list_models())
def test_every_model_maps_raw_pixels_to_probabilities(
    small_model: Callable[[str, int], keras.Model], name: str, num_classes: int
) -> None:
    size = zoo.get_spec(name).min_size  # 32 px, or 75 for InceptionV3: keeps this test fast
    model = small_model(name, num_classes)
    assert model.name == name
    probs = np.asarray(model(raw_pixels(2, size), training=False))
    if num_classes == 2:
        assert probs.shape == (2, 1)
        assert np.all((probs >= 0) & (probs <= 1))
    else:
        assert probs.shape == (2, 4)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert model.output.dtype == "float32"


def test_builders_return_fresh_models() -> None:
    a = zoo.build_model("tiny", (32, 32, 3), 2)
    b = zoo.build_model("tiny", (32, 32, 3), 2)
    assert a is not b
    assert a.get_layer("conv").kernel is not b.get_layer("conv").kernel


@pytest.mark.parametrize(
    ("name", "size", "num_classes", "total", "trainable"),
    [
        # seed 001 basic CNN: the article's 15,102,529 (batch_norm=False, test_simple_cnn.py)
        # + BN before each ReLU: 5 biases out (-1,248), 5 BNs in (2,496 trainable + 2,496
        # moving statistics)
        ("simple_cnn", 125, 2, 15_106_273, 15_103_777),
        # seed 001: "22.6M params, 2.6M trainable"
        ("vgg19_frozen", 125, 2, 22_647_361, 2_622_977),
        # same network; blocks 4-5 (17,698,816) + head (2,622,977) trainable
        ("vgg19_finetune", 125, 2, 22_647_361, 20_321_793),
        # seed 003's 23,827,330 had a 2-unit softmax (258 weights); our sigmoid has 129
        ("resnet50v2", 128, 2, 23_827_201, 262_401),
        # seed 004: base 21,802,784 + GAP→Dense 64 (131,136) + 4-way softmax (260)
        ("inception_v3", 299, 4, 21_934_180, 131_396),
        # seed 000 DL4CV ResNet at 64 px. With the original 8x8 AvgPool + Flatten + 2-way
        # softmax the classifier took 2x2x512 = 2048 features (4,098 weights); global pooling +
        # one sigmoid takes 512 (513 weights), so 2,163,918 - 4,098 + 513 = 2,160,333. The
        # 13,574 non-trainable weights are BN moving statistics. (~2.2M params x 4 bytes plus
        # SGD momentum ≈ the 17.7 MB file the seed reported.)
        ("resnet_mini", 64, 2, 2_160_333, 2_146_759),
    ],
)
def test_parameter_counts_match_the_seeds(
    name: str, size: int, num_classes: int, total: int, trainable: int
) -> None:
    model = zoo.build_model(name, (size, size, 3), num_classes)
    assert model.count_params() == total
    assert trainable_count(model) == trainable


def test_vgg19_finetune_trains_only_blocks_4_5_and_the_head(
    small_model: Callable[[str, int], keras.Model],
) -> None:
    model = small_model("vgg19_finetune", 2)
    trainable = {layer.name for layer in model.layers if layer.trainable_weights}
    assert trainable == {
        *(f"block4_conv{i}" for i in range(1, 5)),
        *(f"block5_conv{i}" for i in range(1, 5)),
        "head_fc1",
        "head_fc2",
        "predictions",
    }
    # The base is flattened into the model, so Grad-CAM can tap the last conv layer directly.
    keras.Model(model.inputs, [model.get_layer("block5_conv4").output, model.output])


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("vgg19_frozen", {"head_fc1", "head_fc2", "predictions"}),
        ("resnet50v2", {"head_fc", "predictions"}),
        ("inception_v3", {"head_fc", "predictions"}),
    ],
)
def test_frozen_bases_leave_only_the_head_trainable(
    small_model: Callable[[str, int], keras.Model], name: str, head: set[str]
) -> None:
    model = small_model(name, 2)
    assert {layer.name for layer in model.layers if layer.trainable_weights} == head


def test_freeze_base_param_freezes_edge_bases() -> None:
    model = zoo.build_model("mobilenet_v3_small", (32, 32, 3), 2, freeze_base=True)
    assert {layer.name for layer in model.layers if layer.trainable_weights} == {"predictions"}


def test_compact_cnn_is_under_1mb_and_reloads_safely(tmp_path: Path) -> None:
    model = zoo.build_model("compact_cnn", (64, 64, 3), 2)
    assert model.count_params() < 200_000
    path = tmp_path / "compact_cnn.keras"
    model.save(path)
    assert path.stat().st_size <= 1 * MB
    reloaded = keras.models.load_model(path, safe_mode=True)
    x = raw_pixels(2, 64, seed=1)
    np.testing.assert_array_equal(
        np.asarray(model(x, training=False)), np.asarray(reloaded(x, training=False))
    )


def test_compact_cnn_signal_survives_inference_mode_bn() -> None:
    """Regression: with Keras' default Glorot init the depthwise outputs were ~C times too small,
    so inference-mode BN (stale moving variance) shrank the signal at every block and all
    validation predictions collapsed to one constant; the GAP features were ~1e-6."""
    keras.utils.set_random_seed(0)
    model = zoo.build_model("compact_cnn", (64, 64, 3), 2)
    features = keras.Model(model.input, model.get_layer("gap").output)
    assert float(np.mean(features(raw_pixels(4, 64), training=False))) > 1e-3


def test_compact_cnn_accepts_larger_inputs_and_a_width_multiplier() -> None:
    model = zoo.build_model("compact_cnn", (96, 128, 3), 3, width=0.5, se=False)
    assert model(raw_pixels(1, 96, 128), training=False).shape == (1, 3)
    assert model.count_params() < zoo.build_model("compact_cnn", (64, 64, 3), 3).count_params()


def test_caffe_preprocessing_is_vgg_caffe_mode_and_round_trips(tmp_path: Path) -> None:
    x = raw_pixels(2, 32, seed=2)
    expected = x[..., ::-1] - np.asarray(CAFFE_BGR_MEAN, dtype="float32")
    np.testing.assert_allclose(np.asarray(CaffePreprocessing()(x)), expected, rtol=1e-6)

    inputs = keras.Input((32, 32, 3))
    hidden = CaffePreprocessing(name="caffe")(inputs)
    outputs = keras.layers.Dense(1, dtype="float32")(keras.layers.GlobalAveragePooling2D()(hidden))
    model = keras.Model(inputs, outputs)
    model.save(tmp_path / "caffe.keras")
    reloaded = keras.models.load_model(tmp_path / "caffe.keras", safe_mode=True)
    assert isinstance(reloaded.get_layer("caffe"), CaffePreprocessing)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(reloaded(x)))


def test_efficientnet_path_correction_matches_keras_imagenet_topology() -> None:
    """Pre-affine → /255 → Normalization equals Keras' /255 → Normalization → 1/sqrt(std)."""
    variance = np.asarray([0.229, 0.224, 0.225]) ** 2
    x = raw_pixels(2, 8, seed=3)
    norm = keras.layers.Normalization(mean=IMAGENET_MEAN_RGB, variance=variance)
    rescale = keras.layers.Rescaling(1.0 / 255.0)
    keras_route = np.asarray(norm(rescale(x))) / np.sqrt([0.229, 0.224, 0.225])
    ours = np.asarray(norm(rescale(stddev_correction()(x))))
    np.testing.assert_allclose(ours, keras_route, rtol=1e-4, atol=1e-4)


@pytest.mark.usefixtures("mixed_precision")
def test_heads_stay_float32_under_mixed_precision() -> None:
    model = zoo.build_model("compact_cnn", (32, 32, 3), 2)
    assert model.get_layer("stage4_block2_pw").compute_dtype == "float16"
    probs = model(raw_pixels(2, 32), training=False)
    assert keras.backend.standardize_dtype(probs.dtype) == "float32"
