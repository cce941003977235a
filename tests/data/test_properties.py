from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medimg.data.properties import (
    PROPERTIES,
    image_properties,
    properties_of_bytes,
    properties_table,
)


def _noise(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _box_blur(x: np.ndarray, k: int = 5) -> np.ndarray:
    """A k x k mean filter (valid part), numpy only."""
    f = x.astype(np.float64)
    c = np.cumsum(np.cumsum(np.pad(f, ((1, 0), (1, 0), (0, 0))), 0), 1)
    s = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]
    return np.round(s / (k * k)).astype(np.uint8)


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(buf, format="PNG")
    return buf.getvalue()


def test_a_blurred_image_is_less_sharp():
    sharp = _noise()
    assert (
        image_properties(_box_blur(sharp))["sharpness"] < 0.2 * image_properties(sharp)["sharpness"]
    )


def test_sharpness_measures_edges_not_spread():
    """The same pixel values, as a smooth ramp or scattered: same spread, only one is sharp."""
    noise = _noise()
    ramp = np.sort(noise.reshape(-1, 3), axis=0).reshape(noise.shape)
    assert sorted(noise.ravel()) == sorted(ramp.ravel())  # identical histogram
    assert image_properties(ramp)["sharpness"] < 0.01 * image_properties(noise)["sharpness"]


def test_a_darker_image_is_less_bright_and_brightness_is_mean_luma():
    x = _noise()
    bright, dark = image_properties(x), image_properties((x // 2).astype(np.uint8))
    assert dark["brightness"] < bright["brightness"]
    luma = x.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert bright["brightness"] == pytest.approx(luma.mean() / 255, rel=1e-5)
    assert bright["contrast"] == pytest.approx(luma.std() / 255, rel=1e-4)


def test_grey_has_no_saturation_and_pure_colours_have_full_saturation():
    grey = np.repeat(_noise()[..., :1], 3, axis=2)
    assert image_properties(grey)["saturation"] == 0.0
    assert image_properties(grey[..., 0])["saturation"] == 0.0  # (H, W) input
    assert properties_of_bytes(_png(_noise(), "L"))["saturation"] == 0.0  # a grey PNG
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    props = image_properties(red)
    assert props["saturation"] == pytest.approx(1.0)
    assert (props["mean_r"], props["mean_g"], props["mean_b"]) == pytest.approx((200 / 255, 0, 0))
    assert image_properties(np.zeros((8, 8, 3), np.uint8))["saturation"] == 0.0  # black: max 0


def test_flat_image_has_no_contrast_and_no_sharpness():
    flat = image_properties(np.full((20, 30, 3), 128, np.uint8))
    assert flat["contrast"] == pytest.approx(0.0, abs=1e-9)
    assert flat["sharpness"] == pytest.approx(0.0, abs=1e-9)
    assert image_properties(np.zeros((2, 2, 3), np.uint8))["sharpness"] == 0.0  # under 3x3


def test_original_size_and_bytes_decode_at_the_original_size():
    x = _noise(37, 91)
    props = properties_of_bytes(_png(x))
    assert (props["height"], props["width"], props["size"]) == (37, 91, 37 * 91)
    assert props == pytest.approx(image_properties(x))
    rgba = np.concatenate([x, np.full((37, 91, 1), 7, np.uint8)], axis=2)
    assert image_properties(rgba) == pytest.approx(image_properties(x))  # alpha dropped


def test_table_has_every_property_per_image():
    table = properties_table([_noise(seed=1), _png(_noise(seed=2))])
    assert set(table) == set(PROPERTIES)
    assert all(v.shape == (2,) for v in table.values())


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError):
        image_properties(np.zeros((4, 4, 2), np.uint8))


def test_numpy_and_pil_only_so_the_served_model_can_import_it():
    source = Path(__file__).parents[2] / "src" / "medimg" / "data" / "properties.py"
    tree = ast.parse(source.read_text())
    roots = {
        (n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
        for n in ast.walk(tree)
        if isinstance(n, ast.Import | ast.ImportFrom)
        for a in (n.names if isinstance(n, ast.Import) else [n])
    }
    assert roots <= {"__future__", "io", "collections", "typing", "numpy", "PIL"}
