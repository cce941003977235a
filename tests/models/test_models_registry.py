"""The registry is the one door from params.yaml to a model: its errors must be one-liners."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import medimg.models as zoo
from medimg.errors import ConfigError
from medimg.models import registry

EXPECTED = {
    # name: (default_size, optimizer, learning_rate, schedule, pretrained)
    "compact_cnn": (64, "adam", 2e-3, "plateau", False),
    "efficientnet_b0": (128, "adam", 1e-3, "plateau", True),
    "inception_v3": (299, "adam", 1e-3, "constant", True),
    "mobilenet_v3_small": (128, "adam", 1e-3, "plateau", True),
    "resnet50v2": (128, "adam", 1e-3, "constant", True),
    "resnet_mini": (64, "sgd", 1e-1, "poly", False),
    "simple_cnn": (125, "adam", 1e-3, "plateau", False),
    "tiny": (32, "adam", 1e-3, "constant", False),
    "vgg19_finetune": (125, "rmsprop", 1e-5, "plateau", True),
    "vgg19_frozen": (125, "rmsprop", 1e-4, "plateau", True),
}


def test_import_registers_every_family_sorted() -> None:
    names = zoo.list_models()
    assert names == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_spec_carries_the_seed_recipe(name: str) -> None:
    spec = zoo.get_spec(name)
    assert spec.name == name
    assert (
        spec.default_size,
        spec.optimizer,
        spec.learning_rate,
        spec.schedule,
        spec.pretrained,
    ) == EXPECTED[name]
    assert spec.description and "\n" not in spec.description
    assert spec.min_size <= spec.default_size
    # Only ImageNet families take `weights`; every builder's extras are keyword-only.
    assert ("weights" in zoo.builder_params(name)) == spec.pretrained


def test_unknown_name_lists_the_available_models() -> None:
    with pytest.raises(ConfigError) as err:
        zoo.build_model("resnet_tiny", (64, 64, 3), 2)
    assert err.value.exit_code == 2
    message = str(err.value)
    assert "resnet_tiny" in message and "\n" not in message
    assert all(name in message for name in EXPECTED)
    with pytest.raises(ConfigError, match="available: compact_cnn"):
        zoo.get_spec("nope")


def test_unknown_param_names_it_and_the_accepted_ones() -> None:
    with pytest.raises(ConfigError, match=r"compact_cnn: unknown model parameter\(s\) dropuot;"):
        zoo.build_model("compact_cnn", (64, 64, 3), 2, dropuot=0.1)
    with pytest.raises(ConfigError, match="accepted: dropout, l2, se, width"):
        zoo.build_model("compact_cnn", (64, 64, 3), 2, dropuot=0.1)


@pytest.mark.parametrize(
    ("name", "params", "pattern"),
    [
        ("compact_cnn", {"dropout": 1.5}, "dropout must be a number in"),
        ("compact_cnn", {"width": 8}, "width must be"),
        ("compact_cnn", {"se": "yes"}, "se must be true or false"),
        ("simple_cnn", {"dense_units": 0}, "dense_units must be a positive integer"),
        ("resnet_mini", {"filters": [64, 128]}, "len\\(filters\\) == len\\(stages\\) \\+ 1"),
        ("resnet_mini", {"l2": -1.0}, "l2 must be a number >= 0"),
        ("resnet50v2", {"freeze_base": "no"}, "freeze_base must be true or false"),
    ],
)
def test_bad_param_values_are_config_errors(name: str, params: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        zoo.build_model(name, (75, 75, 3), 2, **params)


@pytest.mark.parametrize("weights", ["imagenet", "/models/vgg.h5"])
def test_from_scratch_models_refuse_pretrained_weights(weights: str) -> None:
    with pytest.raises(ConfigError, match=r"trained from scratch.*train\.overrides\.tiny\.weights"):
        zoo.build_model("tiny", (32, 32, 3), 2, weights=weights)


def test_from_scratch_models_accept_weights_none() -> None:
    assert zoo.build_model("tiny", (32, 32, 3), 2, weights="none").name == "tiny"


@pytest.mark.parametrize("num_classes", [1, 0, True, 2.0])
def test_num_classes_must_be_an_int_of_at_least_two(num_classes: object) -> None:
    with pytest.raises(ConfigError, match="num_classes must be an integer >= 2"):
        zoo.build_model("tiny", (32, 32, 3), num_classes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("name", "shape", "pattern"),
    [
        ("tiny", (32, 32, 1), "expects 3-channel RGB input"),
        ("tiny", (32, 32), "input_shape must be"),
        ("inception_v3", (64, 64, 3), "below the architecture's minimum 75x75"),
        ("tiny", (16, 16, 3), "below the architecture's minimum 32x32"),
    ],
)
def test_bad_input_shapes_are_config_errors(name: str, shape: tuple, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        zoo.build_model(name, shape, 2)


def test_register_model_rejects_duplicates_and_bad_recipes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(ValueError, match="registered twice"):
        registry.register_model(
            "tiny", default_size=32, optimizer="adam", learning_rate=1e-3, schedule="constant"
        )(lambda input_shape, num_classes: None)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        registry.register_model(
            "x", default_size=32, optimizer="adamw", learning_rate=1e-3, schedule="constant"
        )


def test_model_code_never_imports_tensorflow() -> None:
    """The zoo must run on any Keras 3 backend (JAX, PyTorch): keras/keras.ops only."""
    package = Path(zoo.__file__).parent
    offenders = [
        path.name
        for path in package.glob("*.py")
        if re.search(r"^\s*(import|from)\s+tensorflow|\btf\.", path.read_text(), re.M)
    ]
    assert offenders == []
