"""Image properties from pixels: brightness, contrast, saturation, sharpness, size, channel means.

The evaluate stage slices test accuracy by these (a model may fail on dark, washed-out or
blurred smears only) and a monitoring job can compare served images with the same numbers,
so this module is numpy + PIL only (no TensorFlow: the served model imports it) and each
property is a few whole-array operations, cheap next to the model itself.

Definitions, on the image as decoded at its *original* size (RGB, 0-255; grey and palette
images are converted to RGB, an alpha channel is dropped):

- `brightness`: mean luma / 255, in [0, 1]. Luma is ITU-R BT.601,
  Y = 0.299 R + 0.587 G + 0.114 B (what PIL's "L" conversion uses).
- `contrast`: standard deviation of luma / 255 (RMS contrast), in [0, 0.5].
- `saturation`: mean HSV saturation (max - min) / max over the channels, 0 where max is 0,
  in [0, 1]; exactly 0 for a grey image (OCT B-scans).
- `sharpness`: variance of the 4-neighbour Laplacian of luma (0-255 scale) over the interior
  pixels (no padding, so borders add no fake edges). Blur lowers it; noise raises it; it
  depends on resolution, which is why it is measured on the original pixels, before the
  model's resize. 0 for images under 3x3.
- `height`, `width` (pixels) and `size` = height x width (pixel count: the min side would not
  separate OCT's 496x512 from its 496x768 scans).
- `mean_r`, `mean_g`, `mean_b`: per-channel means / 255 (stain colour).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
PROPERTIES = (
    "brightness",
    "contrast",
    "saturation",
    "sharpness",
    "height",
    "width",
    "size",
    "mean_r",
    "mean_g",
    "mean_b",
)


def as_rgb(pixels: Any) -> np.ndarray:
    """An (H, W, 3) uint8-range array from a PIL image or an (H, W), (H, W, 1|3|4) array."""
    if isinstance(pixels, Image.Image):
        pixels = np.asarray(pixels.convert("RGB"))
    x = np.asarray(pixels)
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"expected an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, got {x.shape}"
        )
    if x.shape[2] == 4:
        x = x[..., :3]
    if x.shape[2] == 1:
        x = np.repeat(x, 3, axis=2)
    return x


def image_properties(pixels: Any) -> dict[str, float]:
    """Every property of PROPERTIES for one image (see the module docstring for definitions).

    Written for the served model's request log, which measures every scored image on the
    serving host's CPU: channels as contiguous float32 planes and plain elementwise ops (a
    `@` with a 3-long inner axis or a reduction over the last axis of size 3 costs several
    times more on cell-sized images): ~0.4 ms for a 150 px cell on one core."""
    x = as_rgb(pixels)
    h, w = x.shape[:2]
    if h == 0 or w == 0:
        raise ValueError("empty image")
    r, g, b = np.moveaxis(x, 2, 0).astype(np.float32)
    luma = LUMA[0] * r + LUMA[1] * g + LUMA[2] * b
    hi = np.maximum(np.maximum(r, g), b)
    lo = np.minimum(np.minimum(r, g), b)
    sat = (hi - lo) / np.maximum(hi, np.float32(1.0))  # hi == 0 means lo == 0: 0 / 1 = 0
    sharpness = 0.0
    if h >= 3 and w >= 3:
        lap = (
            luma[:-2, 1:-1]
            + luma[2:, 1:-1]
            + luma[1:-1, :-2]
            + luma[1:-1, 2:]
            - np.float32(4.0) * luma[1:-1, 1:-1]
        )
        sharpness = float(lap.var(dtype=np.float64))
    return {
        "brightness": float(luma.mean(dtype=np.float64) / 255.0),
        "contrast": float(luma.std(dtype=np.float64) / 255.0),
        "saturation": float(sat.mean(dtype=np.float64)),
        "sharpness": sharpness,
        "height": float(h),
        "width": float(w),
        "size": float(h * w),
        "mean_r": float(r.mean(dtype=np.float64) / 255.0),
        "mean_g": float(g.mean(dtype=np.float64) / 255.0),
        "mean_b": float(b.mean(dtype=np.float64) / 255.0),
    }


def properties_of_bytes(data: bytes) -> dict[str, float]:
    """The properties of an encoded image (PNG, JPEG, ...), decoded at its original size:
    what the split's TFRecord shards hold, before any model resize."""
    with Image.open(io.BytesIO(data)) as img:
        return image_properties(img)


def properties_table(images: Iterable[Any]) -> dict[str, np.ndarray]:
    """Column-wise properties of many images (arrays, PIL images or encoded bytes)."""
    rows = [
        properties_of_bytes(x) if isinstance(x, bytes | bytearray) else image_properties(x)
        for x in images
    ]
    return {name: np.array([r[name] for r in rows], dtype=np.float64) for name in PROPERTIES}
