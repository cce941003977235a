"""Image bytes and serving requests → the model's float32 pixels.

Preprocessing is the training pipeline's (`medimg.data.shards.decode`), so a file scores the
same in `medimg predict`, in the served model and in the evaluate stage:

- decode with PIL to 8-bit RGB: grey and palette images are expanded to three channels and an
  alpha channel is dropped, as `tf.io.decode_image(channels=3)` does; 16-bit images keep their
  high byte (TF's uint16 → uint8 conversion); EXIF orientation is ignored, as in training;
- resize with TF itself, `tf.image.resize(bilinear, antialias=True)` on 0-255 floats, clipped
  to [0, 255] and rounded to whole grey levels, as the uint8 training cache holds them:
  re-implementing the antialiasing kernel in numpy/PIL would only add a second version to
  keep identical. PNG decoding is lossless, so PNG inputs match the shards exactly;
  JPEG decoders may differ by a grey level;
- float32 0-255 pixels go to the model, which rescales inside.
"""

from __future__ import annotations

import base64
import binascii
import functools
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from medimg.config import ArchiveLimits

MAX_PIXELS = ArchiveLimits().max_image_pixels  # the archive reader's default bound
# What counts as an image file: validate keeps these (manifest), `medimg predict` lists them.
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)


class ImageInputError(ValueError):
    """One input cannot be used as an image; the message says which and why."""


# --------------------------------------------------------------------------------- decoding


def decode_image(data: bytes, source: str = "image", max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded bytes → (H, W, 3) uint8 RGB, or ImageInputError naming `source`.

    The size is checked from the header before any pixel is decoded, against the bound the
    archive reader uses (`dataset.limits.max_image_pixels`): a decompression bomb sent to the
    server is refused (HTTP 400) without allocating it.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            _check_pixels(img.width, img.height, max_pixels, source)
            img.load()
            return _to_rgb(img)
    except ImageInputError:
        raise
    except UnidentifiedImageError:
        raise ImageInputError(f"{source}: not an image file PIL can read") from None
    except Image.DecompressionBombError as err:
        raise ImageInputError(f"{source}: too many pixels ({err})") from None
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data
        raise ImageInputError(f"{source}: corrupt image ({err})") from None


def _check_pixels(width: int, height: int, max_pixels: int, source: str) -> None:
    if width * height > max_pixels:
        raise ImageInputError(
            f"{source}: {width}x{height} is {width * height:,} pixels, over the bound of "
            f"{max_pixels:,} (dataset.limits.max_image_pixels)"
        )


def _to_rgb(img: Any) -> np.ndarray:
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img)
        if img.mode.startswith("I;16"):
            arr = arr.astype(np.uint16) >> 8  # tf.image.convert_image_dtype(uint16 → uint8)
        grey = np.clip(arr, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


# Distinct image shapes above which one graph call over a ragged batch beats one eager
# resize per shape (each ~2-3 ms of dispatch): measured on 32 full-resolution cells, 82 → 32 ms.
RAGGED_FROM = 4


# Pixels per model call: 256 cells at 64 px. A model's activations grow with batch x pixels:
# 256 OCT scans at 224 px took 3.5 GB in the evaluate stage; 20 of them take what 256 cells do.
BATCH_PIXELS = 256 * 64 * 64


def batch_for(images: np.ndarray, most: int = 256) -> int:
    """Images per model call for images of this size: bounded by pixels, at most `most`."""
    height, width = np.shape(images)[1:3]
    return max(1, min(most, BATCH_PIXELS // max(1, height * width)))


def resize_batch(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """(N, size, size, 3) float32 0-255, resized exactly as `medimg.data.shards.decode` does.

    Same-shaped images are resized in one TF call; a request of many shapes (cells are
    82-229 px) goes through one compiled call over a ragged batch, the same op per image.
    """
    import tensorflow as tf

    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(np.shape(img), []).append(i)
    if len(groups) >= RAGGED_FROM:
        return _ragged_resize(images, size)
    out = np.empty((len(images), size, size, 3), np.float32)
    for idx in groups.values():
        batch = np.stack([np.asarray(images[i], dtype=np.float32) for i in idx])
        resized = tf.image.resize(batch, (size, size), method="bilinear", antialias=True)
        out[idx] = np.round(np.clip(resized.numpy(), 0.0, 255.0))
    return out


def _ragged_resize(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    import tensorflow as tf

    pixels = [np.asarray(img, dtype=np.float32) for img in images]
    heights = np.array([p.shape[0] for p in pixels], np.int64)
    widths = np.concatenate([np.full(p.shape[0], p.shape[1], np.int64) for p in pixels])
    flat = np.concatenate([p.reshape(-1, 3) for p in pixels])
    batch = tf.RaggedTensor.from_nested_row_lengths(flat, [heights, widths])
    return _resize_graph(size)(batch).numpy()


@functools.cache
def _resize_graph(size: int) -> Any:
    """One traced function per output size: map the antialiased resize over a ragged batch."""
    import tensorflow as tf

    spec = tf.RaggedTensorSpec(shape=[None, None, None, 3], dtype=tf.float32, ragged_rank=2)

    def one(image: Any) -> Any:
        resized = tf.image.resize(image.to_tensor(), (size, size), "bilinear", antialias=True)
        return tf.round(tf.clip_by_value(resized, 0.0, 255.0))

    @tf.function(input_signature=[spec])
    def resize(batch: Any) -> Any:
        out = tf.TensorSpec((size, size, 3), tf.float32)
        return tf.map_fn(one, batch, fn_output_signature=out)

    return resize


def b64decode(text: str | bytes, source: str) -> bytes:
    """Standard or URL-safe base64, whitespace and a `data:image/...;base64,` prefix allowed."""
    if isinstance(text, bytes):
        text = text.decode("ascii", errors="replace")
    text = "".join(str(text).split())
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    if not text:
        raise ImageInputError(f"{source}: empty image string")
    altchars = b"-_" if ("-" in text or "_" in text) else None
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError(f"{source}: not valid base64") from None


# ---------------------------------------------------------------------- serving model input


def images_from_input(model_input: Any, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """What the serving model accepts, as (N, size, size, 3) float32 model input.

    - a DataFrame whose `image` column (or only column) holds base64 PNG/JPEG strings;
    - an array of raw 0-255 RGB pixels, (N, H, W, 3) or (H, W, 3), any H and W;
    - an array or list of base64 strings, or a list of (H, W, 3) arrays of varying sizes;
    - a dict (MLflow's `{"inputs": {"image": ...}}`) with an `image` key or a single key.
    """
    return resize_batch(decode_input(model_input, max_pixels), size)


def decode_input(model_input: Any, max_pixels: int = MAX_PIXELS) -> list[np.ndarray]:
    """The images of a serving request (see `images_from_input`) at their original size, before
    the model's resize: one (H, W, 3) array each (uint8 if decoded from PNG/JPEG, float32 if
    sent as pixels). The served model's request log measures these, so nothing decodes twice.
    """
    if isinstance(model_input, pd.DataFrame):
        return _from_frame(model_input, max_pixels)
    if isinstance(model_input, dict):
        value = _only_value(model_input, list(model_input))
        return decode_input(value, max_pixels)
    if isinstance(model_input, list | tuple):
        return _from_list(list(model_input), max_pixels)
    if isinstance(model_input, np.ndarray):
        return _from_array(model_input, max_pixels)
    raise ImageInputError(
        f"unsupported input type {type(model_input).__name__}: send a DataFrame with a base64 "
        "'image' column or an (N, H, W, 3) array of pixels"
    )


def _only_value(mapping: Any, keys: list[str]) -> Any:
    if "image" in keys:
        return mapping["image"]
    if len(keys) == 1:
        return mapping[keys[0]]
    raise ImageInputError(
        f"expected a column 'image' (base64 PNG/JPEG) or a single column, got {keys}"
    )


def _from_frame(frame: pd.DataFrame, max_pixels: int) -> list[np.ndarray]:
    column = _only_value(frame, [str(c) for c in frame.columns])
    if len(column) == 0:
        raise ImageInputError("the request holds no images")
    return _from_list(list(column), max_pixels)


def _from_list(items: list[Any], max_pixels: int) -> list[np.ndarray]:
    if not items:
        raise ImageInputError("the request holds no images")
    return [_one_item(item, f"image {i}", max_pixels) for i, item in enumerate(items)]


def _one_item(item: Any, source: str, max_pixels: int) -> np.ndarray:
    if isinstance(item, str | bytes | np.str_ | np.bytes_):
        raw = item if isinstance(item, bytes) and _is_encoded_image(item) else None
        data = raw if raw is not None else b64decode(item, source)
        return decode_image(data, source, max_pixels)
    arr = np.asarray(item)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ImageInputError(f"{source}: expected an (H, W, 3) RGB array, got shape {arr.shape}")
    _check_pixels(arr.shape[1], arr.shape[0], max_pixels, source)
    return _pixels(arr, source)


def _is_encoded_image(data: bytes) -> bool:
    """Raw PNG/JPEG/GIF/BMP bytes (as opposed to base64 text) start with a magic number."""
    return data.startswith((b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"RIFF", b"II*", b"MM\0"))


def _from_array(arr: np.ndarray, max_pixels: int) -> list[np.ndarray]:
    if arr.dtype.kind in "USO":  # strings (base64) or objects (ragged images)
        items = list(arr.reshape(-1)) if arr.dtype.kind in "US" else list(arr)
        return _from_list(items, max_pixels)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or 0 in arr.shape:
        raise ImageInputError(
            f"expected raw RGB pixels of shape (N, H, W, 3) or (H, W, 3), got {arr.shape}"
        )
    _check_pixels(arr.shape[2], arr.shape[1], max_pixels, "input")
    return list(_pixels(arr, "input"))


def _pixels(arr: np.ndarray, source: str) -> np.ndarray:
    if arr.dtype.kind not in "uifb":
        raise ImageInputError(f"{source}: pixels must be numbers, got dtype {arr.dtype}")
    values = arr.astype(np.float32)
    if not np.isfinite(values).all():
        raise ImageInputError(f"{source}: pixels contain NaN or inf")
    return values


def png_request(images: np.ndarray, n: int = 2) -> pd.DataFrame | None:
    """Up to `n` images as the DataFrame of base64 PNGs a serving client sends (`image`)."""
    if images is None or len(images) == 0:
        return None
    from PIL import Image

    encoded = []
    for image in np.asarray(images)[:n]:
        buf = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8)).save(buf, format="PNG")
        encoded.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return pd.DataFrame({"image": encoded})
