"""Image decoding and serving requests → model pixels (`medimg.data.images`)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pandas as pd
import pytest

from medimg.data.images import ImageInputError, decode_image, images_from_input, resize_batch
from tests.conftest import bomb_png, load_arrays, png_bytes


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "I;16"])
def test_decode_gives_rgb_for_grey_alpha_and_16_bit(mode):
    rgb = decode_image(png_bytes(20, mode=mode), "x.png")
    assert rgb.shape == (20, 20, 3) and rgb.dtype == np.uint8
    if mode == "L":
        assert (rgb[..., 0] == rgb[..., 2]).all()


def test_decode_errors_name_the_source():
    with pytest.raises(ImageInputError, match=r"^bad\.png: not an image"):
        decode_image(b"hello", "bad.png")
    with pytest.raises(ImageInputError, match=r"^cut\.png: corrupt image"):
        decode_image(png_bytes(64)[:200], "cut.png")


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_preprocessing_matches_the_training_decode(mode, tmp_path):
    """Same pixels as the shards the model trained on (TF decode, antialiased resize, whole
    grey levels) for PNGs: written by the split's writer, read by the training reader."""
    import pandas as pd

    from medimg.data.shards import write_shards

    data = png_bytes(45, mode=mode, seed=3)
    row = {"path": "a.png", "label": 0, "patient": "P1", "split": "train"}
    write_shards(pd.DataFrame([row]), {"a.png": data}, tmp_path, 100, 0)
    trained_on = load_arrays(tmp_path, "train", 32)[0][0]
    np.testing.assert_array_equal(resize_batch([decode_image(data)], 32)[0], trained_on)
    np.testing.assert_array_equal(trained_on, np.round(trained_on))


def test_serving_inputs_base64_frames_arrays_and_lists():
    b64 = [base64.b64encode(png_bytes(40, seed=i)).decode() for i in range(2)]
    from_frame = images_from_input(pd.DataFrame({"image": b64}), 32)
    assert from_frame.shape == (2, 32, 32, 3) and from_frame.dtype == np.float32
    only_column = images_from_input(pd.DataFrame({"png": b64}), 32)
    np.testing.assert_array_equal(only_column, from_frame)
    np.testing.assert_array_equal(images_from_input(np.array(b64), 32), from_frame)
    np.testing.assert_array_equal(images_from_input({"image": b64}, 32), from_frame)
    data_uri = "data:image/png;base64," + b64[0]
    np.testing.assert_array_equal(images_from_input([data_uri], 32)[0], from_frame[0])
    raw = [png_bytes(40, seed=0)]  # raw encoded bytes in-process, not base64
    np.testing.assert_array_equal(images_from_input(raw, 32)[0], from_frame[0])

    pixels = np.random.default_rng(0).integers(0, 256, (3, 50, 40, 3))
    assert images_from_input(pixels, 32).shape == (3, 32, 32, 3)
    assert images_from_input(pixels[0], 32).shape == (1, 32, 32, 3)
    ragged = [pixels[0], np.zeros((20, 30, 3), np.uint8)]
    assert images_from_input(ragged, 32).shape == (2, 32, 32, 3)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (pd.DataFrame({"image": ["@@not base64@@"]}), "image 0: not valid base64"),
        (pd.DataFrame({"image": [base64.b64encode(b"text").decode()]}), "image 0: not an image"),
        (pd.DataFrame({"a": ["x"], "b": ["y"]}), "expected a column 'image'"),
        (pd.DataFrame({"image": []}), "no images"),
        (np.zeros((2, 8, 8)), r"shape \(N, H, W, 3\)"),
        (np.zeros((1, 8, 8, 4)), r"shape \(N, H, W, 3\)"),
        (np.full((1, 8, 8, 3), np.nan), "NaN"),
        ([np.zeros((8, 8))], r"image 0: expected an \(H, W, 3\)"),
        (42, "unsupported input type int"),
    ],
)
def test_bad_serving_inputs_raise_one_clear_error(bad, message):
    with pytest.raises(ImageInputError, match=message):
        images_from_input(bad, 32)


def test_a_decompression_bomb_is_refused_from_its_header():
    from PIL import Image

    bomb = bomb_png(12_000, 12_000)
    with Image.open(io.BytesIO(bomb)) as img:
        assert img.size == (12_000, 12_000)  # a valid header claiming 144 Mpixels
    with pytest.raises(ImageInputError, match=r"^cell\.png: 12000x12000 is 144,000,000 pixels"):
        decode_image(bomb, "cell.png")
    frame = pd.DataFrame({"image": [base64.b64encode(bomb).decode()]})
    with pytest.raises(ImageInputError, match="max_image_pixels"):
        images_from_input(frame, 32)
    with pytest.raises(ImageInputError, match="over the bound of 100"):
        images_from_input(np.zeros((1, 20, 20, 3)), 32, max_pixels=100)
    assert decode_image(png_bytes(20), "ok.png", max_pixels=400).shape == (20, 20, 3)


def test_a_batch_of_many_shapes_resizes_exactly_as_one_by_one():
    from medimg.data.images import RAGGED_FROM, resize_batch

    rng = np.random.default_rng(0)
    images = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 52), (82, 90), (33, 33)]
    ]
    images += [images[0], rng.integers(0, 256, (120, 101, 3), dtype=np.uint8)]
    assert len({im.shape for im in images}) >= RAGGED_FROM  # takes the ragged graph path
    together = resize_batch(images, 32)
    one_by_one = np.concatenate([resize_batch([im], 32) for im in images])
    np.testing.assert_array_equal(together, one_by_one)


def test_model_calls_are_bounded_by_pixels_not_images():
    from medimg.data.images import batch_for

    cells = np.zeros((1000, 64, 64, 3), np.float32)
    assert batch_for(cells) == 256 and batch_for(cells, 64) == 64
    assert batch_for(np.zeros((1, 224, 224, 3))) == 20  # 256 scans at 224 px took 3.5 GB
    assert batch_for(np.zeros((1, 4000, 4000, 3))) == 1
