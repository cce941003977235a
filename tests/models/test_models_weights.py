"""Offline weight resolution: every failure is one ConfigError line that says what to do."""

from __future__ import annotations

import re
from pathlib import Path

import keras
import numpy as np
import pytest

import medimg.models as zoo
from medimg.errors import ConfigError
from medimg.models.weights import IMAGENET_FILES, freeze, keras_cache_dir, resolve_weights

PRETRAINED = [name for name in zoo.list_models() if zoo.get_spec(name).pretrained]


@pytest.fixture
def empty_keras_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "keras_home"
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(home))
    return home


@pytest.mark.parametrize("weights", ["none", "None", " none ", None])
def test_none_means_random_init(weights: str | None) -> None:
    assert resolve_weights("vgg19", weights) is None


def test_imagenet_offline_names_the_file_the_folder_and_the_alternative(
    empty_keras_home: Path,
) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_weights("vgg19", "imagenet")
    message = str(err.value)
    assert "\n" not in message and err.value.exit_code == 2
    assert "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert str(empty_keras_home / "models") in message
    assert "train.weights: <path" in message


def test_imagenet_uses_the_keras_cache_when_the_file_is_there(empty_keras_home: Path) -> None:
    cache = empty_keras_home / "models"
    cache.mkdir()
    (cache / IMAGENET_FILES["resnet50v2"]).write_bytes(b"h5")
    assert keras_cache_dir() == cache
    assert resolve_weights("resnet50v2", "imagenet") == "imagenet"
    with pytest.raises(ConfigError, match="inception_v3_weights_tf_dim_ordering"):
        resolve_weights("inception_v3", "imagenet")


def test_default_cache_is_home_dot_keras(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KERAS_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert keras_cache_dir() == tmp_path / ".keras" / "models"


@pytest.mark.parametrize("name", PRETRAINED)
def test_every_pretrained_builder_fails_fast_offline(name: str, empty_keras_home: Path) -> None:
    size = zoo.get_spec(name).min_size
    with pytest.raises(ConfigError, match=r"ImageNet weights for \w+ are not cached") as err:
        zoo.build_model(name, (size, size, 3), 2, weights="imagenet")
    assert any(fname in str(err.value) for fname in IMAGENET_FILES.values())


def test_missing_weights_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "vgg19_notop.h5"
    expected = re.escape(f"weights file for vgg19 not found: {missing}")
    with pytest.raises(ConfigError, match=expected):
        zoo.build_model("vgg19_frozen", (32, 32, 3), 2, weights=str(missing))


def test_weights_path_must_be_an_h5_file(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"x")
    with pytest.raises(ConfigError, match=r"must be a Keras \.h5 weights file"):
        resolve_weights("efficientnet_b0", str(path))


def test_unknown_arch_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no ImageNet weights known for 'alexnet'"):
        resolve_weights("alexnet", "imagenet")


def test_weights_path_is_loaded_into_the_base(tmp_path: Path) -> None:
    reference = keras.applications.MobileNetV3Small(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    kernel = reference.get_layer("conv")  # the stem conv
    kernel.kernel.assign(np.full(kernel.kernel.shape, 0.5, dtype="float32"))
    path = tmp_path / "mobilenet_v3_small_notop.weights.h5"
    reference.save_weights(path)

    model = zoo.build_model("mobilenet_v3_small", (32, 32, 3), 2, weights=str(path))
    np.testing.assert_array_equal(np.asarray(model.get_layer("conv").kernel), 0.5)


def test_unloadable_weights_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.h5"
    path.write_bytes(b"not an hdf5 file")
    expected = re.escape(f"could not load mobilenet_v3_small weights from {path}")
    with pytest.raises(ConfigError, match=expected):
        zoo.build_model("mobilenet_v3_small", (32, 32, 3), 2, weights=str(path))


def test_freezing_a_random_base_warns() -> None:
    inputs = keras.Input((4,))
    base = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    with pytest.warns(UserWarning, match="frozen but has random weights"):
        freeze(base, weights="none", name="demo")
    assert base.trainable_weights == []
