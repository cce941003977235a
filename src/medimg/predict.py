"""Using the registered classifier: `medimg predict`, `explain` and `export`, and the input
handling of the MLflow serving model.

Preprocessing is the training pipeline's (`medimg.data.decode`), so a file scores the same
here, in the served model and in the evaluate stage:

- decode with PIL to 8-bit RGB: grey and palette images are expanded to three channels and an
  alpha channel is dropped, as `tf.io.decode_image(channels=3)` does; 16-bit images keep their
  high byte (TF's uint16 → uint8 conversion); EXIF orientation is ignored, as in training;
- resize with TF itself, `tf.image.resize(bilinear, antialias=True)` on 0-255 floats, clipped
  to [0, 255]: re-implementing the antialiasing kernel in numpy/PIL would only add a second
  version to keep identical. PNG decoding is lossless, so PNG inputs match the shards exactly
  (checked against `decode` on the dev set); JPEG decoders may differ by a grey level;
- float32 0-255 pixels go to the model, which rescales inside.

This module has no MLflow import: the registry lookups and the serving wrapper live in
`medimg.tracking`, which calls `serving_predict` here.
"""

from __future__ import annotations

import base64
import binascii
import glob
import io
import json
import math
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medimg.config import Params
from medimg.errors import DataError, MedimgError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
DEFAULT_THRESHOLD = 0.5
# A progress bar helps on a folder of thousands of cells; for a handful it is noise, and in a
# non-interactive log only a long job is worth the extra lines.
PROGRESS_TTY_MIN = 256
PROGRESS_LOG_MIN = 5000
FORMATS = ("table", "csv", "json")


class ImageInputError(ValueError):
    """One input cannot be used as an image; the message says which and why."""


# ------------------------------------------------------------------------------------ paths


def _walk(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively; other files and hidden entries are skipped."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _expand(spec: str) -> list[Path] | None:
    """The files one PATHS argument stands for, or None when it names nothing.

    A named file is used whatever its suffix (the user asked for it, so a non-image is an
    error, not silently skipped); folders and glob matches that are folders are walked.
    """
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        return _walk(path)
    if glob.has_magic(spec):
        matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
        files: list[Path] = []
        for m in matches:
            files += _walk(m) if m.is_dir() else [m] if m.is_file() else []
        return files if matches else None
    return None


def collect_paths(specs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to predict (in argument order, de-duplicated) and (spec, reason) problems.

    Globs are expanded here too, so quoted patterns (`"data/**/*.png"`) work the same as ones
    the shell expanded.
    """
    files: list[Path] = []
    seen: set[Path] = set()
    problems: list[tuple[str, str]] = []
    for spec in specs:
        found = _expand(spec)
        if found is None:
            problems.append((spec, "no such file or directory"))
            continue
        for path in found:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files, problems


# --------------------------------------------------------------------------------- decoding


def decode_image(data: bytes, source: str = "image") -> np.ndarray:
    """Encoded bytes → (H, W, 3) uint8 RGB, or ImageInputError naming `source`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _to_rgb(img)
    except UnidentifiedImageError:
        raise ImageInputError(f"{source}: not an image file PIL can read") from None
    except Image.DecompressionBombError as err:
        raise ImageInputError(f"{source}: too many pixels ({err})") from None
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data
        raise ImageInputError(f"{source}: corrupt image ({err})") from None


def _to_rgb(img: Any) -> np.ndarray:
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img)
        if img.mode.startswith("I;16"):
            arr = arr.astype(np.uint16) >> 8  # tf.image.convert_image_dtype(uint16 → uint8)
        grey = np.clip(arr, 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def resize_batch(images: Sequence[np.ndarray], size: int) -> np.ndarray:
    """(N, size, size, 3) float32 0-255, resized exactly as `medimg.data.decode` does.

    Same-shaped images are resized in one TF call (eager calls cost ~1 ms each).
    """
    import tensorflow as tf

    out = np.empty((len(images), size, size, 3), np.float32)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(np.shape(img), []).append(i)
    for idx in groups.values():
        batch = np.stack([np.asarray(images[i], dtype=np.float32) for i in idx])
        resized = tf.image.resize(batch, (size, size), method="bilinear", antialias=True)
        out[idx] = np.clip(resized.numpy(), 0.0, 255.0)
    return out


def prepare(data: bytes, size: int, source: str = "image") -> np.ndarray:
    """One encoded image as the model's (size, size, 3) float32 input."""
    return resize_batch([decode_image(data, source)], size)[0]


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


def images_from_input(model_input: Any, size: int) -> np.ndarray:
    """What the serving model accepts, as (N, size, size, 3) float32 model input.

    - a DataFrame whose `image` column (or only column) holds base64 PNG/JPEG strings;
    - an array of raw 0-255 RGB pixels, (N, H, W, 3) or (H, W, 3), any H and W;
    - an array or list of base64 strings, or a list of (H, W, 3) arrays of varying sizes;
    - a dict (MLflow's `{"inputs": {"image": ...}}`) with an `image` key or a single key.
    """
    if isinstance(model_input, pd.DataFrame):
        return _from_frame(model_input, size)
    if isinstance(model_input, dict):
        return images_from_input(_only_value(model_input, list(model_input)), size)
    if isinstance(model_input, list | tuple):
        return _from_list(list(model_input), size)
    if isinstance(model_input, np.ndarray):
        return _from_array(model_input, size)
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


def _from_frame(frame: pd.DataFrame, size: int) -> np.ndarray:
    column = _only_value(frame, [str(c) for c in frame.columns])
    if len(column) == 0:
        raise ImageInputError("the request holds no images")
    return _from_list(list(column), size)


def _from_list(items: list[Any], size: int) -> np.ndarray:
    if not items:
        raise ImageInputError("the request holds no images")
    decoded = [_one_item(item, f"image {i}") for i, item in enumerate(items)]
    return resize_batch(decoded, size)


def _one_item(item: Any, source: str) -> np.ndarray:
    if isinstance(item, str | bytes | np.str_ | np.bytes_):
        raw = item if isinstance(item, bytes) and _is_encoded_image(item) else None
        return decode_image(raw if raw is not None else b64decode(item, source), source)
    arr = np.asarray(item)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ImageInputError(f"{source}: expected an (H, W, 3) RGB array, got shape {arr.shape}")
    return _pixels(arr, source)


def _is_encoded_image(data: bytes) -> bool:
    """Raw PNG/JPEG/GIF/BMP bytes (as opposed to base64 text) start with a magic number."""
    return data.startswith((b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"RIFF", b"II*", b"MM\0"))


def _from_array(arr: np.ndarray, size: int) -> np.ndarray:
    if arr.dtype.kind in "USO":  # strings (base64) or objects (ragged images)
        return _from_list(list(arr.reshape(-1)) if arr.dtype.kind in "US" else list(arr), size)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] != 3 or 0 in arr.shape:
        raise ImageInputError(
            f"expected raw RGB pixels of shape (N, H, W, 3) or (H, W, 3), got {arr.shape}"
        )
    return resize_batch(list(_pixels(arr, "input")), size)


def _pixels(arr: np.ndarray, source: str) -> np.ndarray:
    if arr.dtype.kind not in "uifb":
        raise ImageInputError(f"{source}: pixels must be numbers, got dtype {arr.dtype}")
    values = arr.astype(np.float32)
    if not np.isfinite(values).all():
        raise ImageInputError(f"{source}: pixels contain NaN or inf")
    return values


# ------------------------------------------------------------------------------- prediction


def model_size(model: Any) -> int:
    """The square input size the model was built for (its `(None, S, S, 3)` input)."""
    shape = tuple(model.inputs[0].shape)
    if len(shape) != 4 or shape[1] is None or shape[1] != shape[2]:
        raise MedimgError(f"model {model.name!r} has no fixed square image input: {shape}")
    return int(shape[1])


def probabilities(model: Any, images: np.ndarray) -> np.ndarray:
    """(N,) positive-class probabilities (sigmoid) or (N, K) (softmax), as float64.

    `predict_on_batch`: `predict` builds a tf.data pipeline per call, which costs more than a
    batch of small cells.
    """
    if len(images) == 0:
        return np.zeros((0,), np.float64)
    out = np.asarray(model.predict_on_batch(np.asarray(images, np.float32)), dtype=np.float64)
    return out[:, 0] if out.ndim == 2 and out.shape[1] == 1 else out


def check_classes(model: Any, classes: Sequence[str]) -> list[str]:
    """The class names, checked against the model's output units (1 sigmoid = 2 classes)."""
    units = int(model.outputs[0].shape[-1])
    expected = 2 if units == 1 else units
    if len(classes) != expected:
        raise MedimgError(
            f"model has {units} output unit(s) ({expected} classes) but the class list has "
            f"{len(classes)}: {list(classes)}; check validate.classes in params.yaml"
        )
    return list(classes)


def result_frame(probs: np.ndarray, classes: Sequence[str], threshold: float) -> pd.DataFrame:
    """Per image: predicted class, its probability, and p_<class> (the positive one if binary).

    Binary: positive when p >= threshold, and `probability` is the predicted class's (p or
    1 - p); multi-class: argmax, and `threshold` does not apply (NaN).
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim == 1:
        positive = probs >= threshold
        frame = pd.DataFrame(
            {
                "class": np.where(positive, classes[1], classes[0]),
                "probability": np.where(positive, probs, 1.0 - probs),
                f"p_{classes[1]}": probs,
            }
        )
        frame["threshold"] = float(threshold)
        return frame
    pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, int)
    frame = pd.DataFrame(
        {"class": [classes[i] for i in pred], "probability": probs.max(axis=1, initial=0.0)}
    )
    for i, name in enumerate(classes):
        frame[f"p_{name}"] = probs[:, i]
    frame["threshold"] = np.nan
    return frame


def serving_predict(
    model: Any, model_input: Any, classes: Sequence[str], size: int, threshold: float
) -> pd.DataFrame:
    """The serving model's whole `predict`: decode → model → result rows."""
    x = images_from_input(model_input, size)
    return result_frame(probabilities(model, x), classes, threshold)


def _batches(items: Sequence[Path], n: int) -> Iterator[Sequence[Path]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _read(path: Path) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageInputError(f"{path}: unreadable ({err.strerror or err})") from None
    return decode_image(data, str(path))


def predict_files(
    model: Any,
    files: Sequence[Path],
    classes: Sequence[str],
    threshold: float,
    batch_size: int = 64,
    on_error: Callable[[Path, str], None] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per readable file (path first); `on_error(path, message)` for the others.

    Files are decoded and scored `batch_size` at a time, so memory stays flat on any folder.
    """
    from tqdm import tqdm

    size = model_size(model)
    frames = []
    with tqdm(total=len(files), unit="img", disable=not progress, file=sys.stderr) as bar:
        for chunk in _batches(files, batch_size):
            ok, images = [], []
            for path in chunk:
                try:
                    images.append(_read(path))
                    ok.append(path)
                except ImageInputError as err:
                    if on_error is not None:
                        on_error(path, str(err))
            if ok:
                probs = probabilities(model, resize_batch(images, size))
                frame = result_frame(probs, classes, threshold)
                frame.insert(0, "path", [str(p) for p in ok])
                frames.append(frame)
            bar.update(len(chunk))
    return pd.concat(frames, ignore_index=True) if frames else _empty(classes)


def _empty(classes: Sequence[str]) -> pd.DataFrame:
    cols = ["path", "class", "probability"]
    cols += [f"p_{classes[1]}"] if len(classes) == 2 else [f"p_{c}" for c in classes]
    return pd.DataFrame(columns=[*cols, "threshold"])


def show_progress(n_files: int, batch_size: int, is_tty: bool) -> bool:
    return n_files > batch_size and (
        (is_tty and n_files >= PROGRESS_TTY_MIN) or n_files >= PROGRESS_LOG_MIN
    )


# ---------------------------------------------------------------------------------- output


def format_rows(frame: pd.DataFrame, fmt: str) -> str:
    """The result table as `table` (aligned text), `csv` or `json` (a list of objects)."""
    if fmt == "csv":
        return frame.to_csv(index=False, float_format="%.6g")
    if fmt == "json":
        records = json.loads(frame.to_json(orient="records", double_precision=6))
        return json.dumps(records, indent=2) + "\n"
    if fmt == "table":
        return _table(frame)
    raise MedimgError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}", exit_code=2)


def _table(frame: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4f}"
        return str(value)

    rows = [[str(c) for c in frame.columns]]
    rows += [[cell(v) for v in row] for row in frame.itertuples(index=False)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    numeric = [frame[c].dtype.kind == "f" for c in frame.columns]
    lines = [
        "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(r, widths, numeric, strict=True)
        )
        for r in rows
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


# ---------------------------------------------------------------------------- model loading


@dataclass(frozen=True)
class Classifier:
    """A loaded model and what decides its output: class names, input size, threshold."""

    model: Any
    classes: list[str]
    size: int
    threshold: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """`malaria-classifier v3`, `run 1a2b3c4d` or the file name, for titles and names."""
        info = self.info
        if info.get("name") and info.get("version"):
            return f"{info['name']} v{info['version']}"
        if info.get("run_id"):
            return f"run {info['run_id'][:8]}"
        return Path(info.get("keras_path", "model")).stem


def _check_store(params: Params, spec: str) -> None:
    uri = params.mlflow.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise MedimgError(
            f"{uri.removeprefix('sqlite:///')}: no MLflow store to resolve model {spec!r} in; "
            "run `dvc repro` first or pass --model path/to/model.keras"
        )


def load_classifier(params: Params, spec: str, threshold: float | None = None) -> Classifier:
    """Resolve `--model` (alias, version, run, models:/ URI or .keras file) and load it.

    The registry's copy is downloaded to a temporary folder that is gone once the model is in
    memory. Threshold: `threshold`, else the version's `operating_threshold` tag, else the
    serving model's own, else 0.5.
    """
    from medimg.evaluation import load_model

    if spec.endswith(".keras"):
        path = Path(spec)
        if not path.is_file():
            raise MedimgError(f"{path}: model file not found")
        model, info = load_model(path), {"keras_path": str(path), "spec": spec}
    else:
        from medimg import tracking

        _check_store(params, spec)
        tracking.configure(params.mlflow, params.dataset.name)
        name = params.register_cfg.registered_name(params.dataset.name)
        with tempfile.TemporaryDirectory(prefix="medimg-model-") as tmp:
            path, info = tracking.resolve_model(spec, name, Path(tmp))
            model = load_model(path)
    classes = check_classes(model, info.get("classes") or params.validate_cfg.classes)
    chosen = _pick_threshold(threshold, info)
    return Classifier(model, classes, model_size(model), chosen, info)


def _pick_threshold(override: float | None, info: dict[str, Any]) -> float:
    for value in (override, info.get("operating_threshold"), info.get("threshold")):
        if value is not None:
            value = float(value)
            if not 0.0 <= value <= 1.0:
                raise MedimgError(f"threshold must be in [0, 1], got {value}", exit_code=2)
            return value
    return DEFAULT_THRESHOLD


# ---------------------------------------------------------------------------------- commands


def _report(path: Path | str, message: str) -> None:
    """`error: <path>: <reason>` on stderr, without breaking a running progress bar."""
    from tqdm import tqdm

    text = message if message.startswith(str(path)) else f"{path}: {message}"
    tqdm.write(f"error: {text}", file=sys.stderr)


def predict_command(
    params: Params,
    paths: Sequence[str],
    model: str = "champion",
    fmt: str = "table",
    batch_size: int = 64,
    threshold: float | None = None,
    output: str | Path | None = None,
) -> int:
    """`medimg predict`: 0 when every file was predicted, 1 when any failed, 2 for none."""
    from medimg.io import write_text

    if not paths:
        raise MedimgError("predict: no image paths given (files, folders or globs)", exit_code=2)
    if batch_size < 1:
        raise MedimgError(f"--batch-size must be >= 1, got {batch_size}", exit_code=2)
    files, problems = collect_paths(paths)
    for spec, reason in problems:
        _report(spec, reason)
    if not files:
        raise MedimgError(f"predict: no image files found in {', '.join(paths)}", exit_code=2)
    clf = load_classifier(params, model, threshold)
    failed: list[Path] = []

    def on_error(path: Path, message: str) -> None:
        failed.append(path)
        _report(path, message)

    progress = show_progress(len(files), batch_size, sys.stderr.isatty())
    frame = predict_files(
        clf.model, files, clf.classes, clf.threshold, batch_size, on_error, progress
    )
    text = format_rows(frame, fmt)
    if output is None:
        sys.stdout.write(text)
    else:
        write_text(output, text)
    return 1 if failed or problems else 0


def explain_image(clf: Classifier, data: bytes, source: str) -> tuple[np.ndarray, str]:
    """Grad-CAM overlay (uint8 RGB, the image's own size) for the predicted class, and a title.

    The map is computed at the model's input size and upsampled onto the original pixels, so
    the overlay shows the cell as it is on disk, not the model's thumbnail of it.
    """
    from medimg.gradcam import grad_cam, overlay

    rgb = decode_image(data, source)
    x = resize_batch([rgb], clf.size)
    row = result_frame(probabilities(clf.model, x), clf.classes, clf.threshold).iloc[0]
    heat = grad_cam(clf.model, x, class_index=clf.classes.index(row["class"]))[0]
    heat = _resize_map(heat, rgb.shape[:2])
    title = f"{row['class']}  p={row['probability']:.3f}"
    if not math.isnan(row["threshold"]):
        title += f"  (threshold {row['threshold']:.2f})"
    return overlay(rgb, heat), f"{title}\n{clf.label}"


def _resize_map(heat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    import tensorflow as tf

    resized = tf.image.resize(heat[..., None], shape, method="bilinear").numpy()[..., 0]
    return np.clip(resized, 0.0, 1.0)


MIN_FIGURE_WIDTH = 256  # pixels: room for a readable title over a 32-128 px cell


def overlay_figure(image: np.ndarray, title: str) -> Any:
    """The overlay at (at least) its own pixel size, title in a band above it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    h, w = image.shape[:2]
    scale = max(1.0, MIN_FIGURE_WIDTH / w)
    band = 36  # pixels for two lines of 8-pt text at dpi 100
    width, height = w * scale, h * scale + band
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.0, 0.0, 1.0, (h * scale) / height))
    ax.imshow(image, interpolation="nearest" if scale >= 2 else "antialiased")
    ax.set_axis_off()
    fig.text(0.5, 1.0 - 3 / height, title, ha="center", va="top", fontsize=8)
    return fig


def explain_command(
    params: Params, image: str | Path, output: str | Path, model: str = "champion"
) -> Path:
    """`medimg explain`: the Grad-CAM overlay PNG of one image, written atomically."""
    from medimg.plots import save_figure

    image = Path(image)
    try:
        data = image.read_bytes()
    except OSError as err:
        raise DataError(f"{image}: unreadable ({err.strerror or err})") from None
    clf = load_classifier(params, model)
    try:
        picture, title = explain_image(clf, data, str(image))
    except ImageInputError as err:
        raise DataError(str(err)) from None
    save_figure(overlay_figure(picture, title), output, dpi=100)
    print(f"explain {image}: {title.splitlines()[0]} → {output}")
    return Path(output)


# ----------------------------------------------------------------------------------- export

MIN_AGREEMENT = 0.99


def export_path(params: Params, clf: Classifier, quantize: str) -> Path:
    """`models/export/<name>-v<version>-<quantize>.tflite`; for a run `run-<id8>-...`, for a
    file its stem (`models/<arch>/model.keras` → `<arch>-...`)."""
    info = clf.info
    if info.get("name") and info.get("version"):
        stem = f"{info['name']}-v{info['version']}"
    elif info.get("run_id"):
        stem = f"run-{info['run_id'][:8]}"
    else:
        path = Path(info.get("keras_path", "model"))
        stem = path.parent.name if path.stem == "model" and path.parent.name else path.stem
    return Path(params.paths.models) / "export" / f"{stem}-{quantize}.tflite"


def _split_arrays(params: Params, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    from medimg.data import load_arrays

    try:
        x, y, _, _ = load_arrays(params.paths.split, split, size)
    except FileNotFoundError as err:
        raise DataError(str(err)) from None
    if len(x) == 0:
        raise DataError(f"{params.paths.split}: the {split} split is empty")
    return x, y


def representative(x_train: np.ndarray, n: int, seed: int) -> np.ndarray:
    """A seeded random subset of training images for int8 calibration (all classes mixed)."""
    rng = np.random.default_rng(seed)
    return x_train[rng.choice(len(x_train), min(n, len(x_train)), replace=False)]


def export_edge(params: Params, clf: Classifier, quantize: str) -> tuple[bytes, dict[str, Any]]:
    """The .tflite bytes and their test-split numbers; raises when parity is below 99 %."""
    from medimg import export as E

    x_test, y_test = _split_arrays(params, "test", clf.size)
    calibration = None
    if quantize == "int8":
        x_train, _ = _split_arrays(params, "train", clf.size)
        calibration = representative(x_train, params.evaluate.representative_samples, params.seed)
    content = E.to_tflite(clf.model, quantize, representative=calibration)
    lite = np.asarray(E.TFLiteModel(content, threads=1).predict(x_test, batch_size=64), np.float64)
    lite = lite[:, 0] if lite.ndim == 2 and lite.shape[1] == 1 else lite
    keras_probs = probabilities(clf.model, x_test)
    agreement = E.check_parity(keras_probs, lite, MIN_AGREEMENT, clf.threshold)
    predicted = (lite >= clf.threshold).astype(int) if lite.ndim == 1 else lite.argmax(1)
    stats = {
        "bytes": len(content),
        "agreement": agreement,
        "test_accuracy": float(np.mean(predicted == y_test)),
        "test_images": len(y_test),
        "threshold": clf.threshold,
    }
    return content, stats


def export_command(
    params: Params,
    quantize: str = "none",
    model: str = "champion",
    output: str | Path | None = None,
    fmt: str = "tflite",
) -> dict[str, Any]:
    """`medimg export`: write the edge file after the parity gate; log it to the model's run."""
    from medimg.export import QUANTIZE_MODES, write_tflite

    if fmt != "tflite":
        raise MedimgError(f"export: unknown format {fmt!r}; only 'tflite'", exit_code=2)
    if quantize not in QUANTIZE_MODES:
        raise MedimgError(f"export: --quantize must be one of {QUANTIZE_MODES}", exit_code=2)
    clf = load_classifier(params, model)
    content, stats = export_edge(params, clf, quantize)
    dest = write_tflite(content, Path(output) if output else export_path(params, clf, quantize))
    run_id = clf.info.get("run_id")
    if run_id:
        _log_export(run_id, quantize, stats, dest)
    print(
        f"export {clf.label} ({quantize}): {dest} {stats['bytes'] / 1024:.1f} KiB, agreement "
        f"{stats['agreement']:.4f}, TFLite test accuracy {stats['test_accuracy']:.4f} on "
        f"{stats['test_images']} images" + ("" if run_id else " (no MLflow run: not logged)")
    )
    return {**stats, "path": str(dest), "run_id": run_id}


def _log_export(run_id: str, quantize: str, stats: dict[str, Any], dest: Path) -> None:
    from medimg import tracking

    prefix = f"tflite_{quantize}_"
    metrics = {k: stats[k] for k in ("bytes", "agreement", "test_accuracy")}
    with tracking.run(run_id=run_id):
        tracking.log_metrics(metrics, prefix=prefix)
        tracking.set_tags({f"{prefix}file": dest.as_posix()})
