"""TFLite edge export: the evaluate stage's size/accuracy/speed numbers and `medimg export`,
which build the file the same way (`edge_model`).

Conversion path, and why: the Keras model is written as a SavedModel through
`keras.export.ExportArchive` with one `serve` endpoint that calls the model with
`training=False`, and that SavedModel goes through `TFLiteConverter.from_saved_model`.

- `from_concrete_functions(tf.function(model))` silently produces a broken file with Keras 3
  (the Keras variables are not frozen into constants: ~70 kB file, NaN outputs).
- `from_keras_model` works on TF 2.21 (it does the same ExportArchive dance internally) but
  swallows any export failure and retries the legacy Keras-2 freezing path, so an error shows
  up as a confusing second traceback; doing the export ourselves keeps one clear failure.
- `model.export(format="tf_saved_model")` works too, but whether it traces `__call__` with
  `training=False` has changed between Keras 3 releases; the explicit endpoint pins it, so
  dropout and batch-norm statistics can never leak into the edge file.

The endpoint takes a `(None, S, S, 3)` float32 signature, so the interpreter can be resized to
any batch and nested functional models (keras.applications bases) trace like any layer.

Quantization choices: "float16" stores weights as fp16 (half the size, float compute);
"int8" is full-integer (weights and activations int8, calibrated on representative images,
every op an int8 builtin so it runs on integer-only NPUs/MCUs) but keeps a float32 input and
output. Float I/O keeps the file's contract identical to the Keras model's (raw 0-255 pixels
in, probabilities out), so evaluation and serving code feed both the same arrays; the
quantize/dequantize at the two ends costs one elementwise op each. `TFLiteModel` still handles
int8/uint8 I/O tensors generically (scale/zero-point) for files built elsewhere.
"""

from __future__ import annotations

import itertools
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from medimg.analysis.metrics import predicted_labels
from medimg.config import QUANTIZE_MODES, Quantize
from medimg.data.images import batch_for
from medimg.errors import ConfigError, DataError, MedimgError, error_line
from medimg.io import write_bytes

# Calibration images for int8: more than a few hundred barely moves the activation ranges but
# makes conversion slower; a deterministic, evenly spaced subset keeps exports reproducible.
MAX_CALIBRATION_IMAGES = 256

# Dtypes with no TFLite float kernels; a model built under them is exported as float32.
_HALF = ("float16", "bfloat16", "mixed_float16", "mixed_bfloat16")

# Every .tflite flatbuffer carries this file identifier at bytes 4-8.
TFLITE_IDENTIFIER = b"TFL3"


def to_tflite(
    model: keras.Model,
    quantize: Quantize = "none",
    representative: np.ndarray | None = None,
) -> bytes:
    """The model as a .tflite flatbuffer; float32 in (raw 0-255 pixels) and float32 out.

    `representative` (N, S, S, 3 raw pixels, ideally training images of every class) is
    required for "int8": without calibration data the activation ranges are guesses and the
    accuracy numbers the evaluate stage reports would be meaningless.
    """
    if quantize not in QUANTIZE_MODES:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    shape = _input_shape(model)
    calibration = _calibration_images(representative, shape) if quantize == "int8" else None
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="medimg-tflite-") as tmp:
        _export_saved_model(float32_model(model), shape, tmp)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        _configure(converter, quantize, calibration)
        try:
            return bytes(converter.convert())
        except Exception as err:  # ConverterError and friends
            raise MedimgError(
                f"TFLite conversion ({quantize}) of {model.name} failed: {error_line(err)}"
            ) from err


def _input_shape(model: keras.Model) -> tuple[int, int, int]:
    """(S, S, C) from the model's single image input; the file is built for exactly that size."""
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1 or len(inputs[0].shape) != 4 or None in tuple(inputs[0].shape)[1:]:
        raise MedimgError(
            f"TFLite export needs a built model with one (batch, H, W, C) image input; "
            f"{model.name} has {[tuple(i.shape) for i in inputs]}"
        )
    _, h, w, c = (int(d) if d is not None else None for d in inputs[0].shape)
    return (h, w, c)


def float32_model(model: keras.Model) -> keras.Model:
    """`model` itself, or a float32-policy copy with the same weights if it was built mixed.

    GPU training runs under mixed_float16, and a saved model keeps that per-layer policy; its
    float16 ops have no TFLite builtin kernels ("'tf.Mul' op is neither a custom op nor a flex
    op"). Variables are float32 under mixed precision, so the copy is the same function at
    full precision, and "float16"/"int8" then decide the file's precision explicitly.
    """
    config, changed = _float32_config(keras.saving.serialize_keras_object(model))
    if not changed:
        return model
    copy = keras.saving.deserialize_keras_object(config)
    copy.set_weights(model.get_weights())
    return copy


def _float32_config(node: Any) -> tuple[Any, bool]:
    """The serialized model with every half/mixed dtype (policy or tensor) set to float32."""
    if isinstance(node, list):
        items = [_float32_config(v) for v in node]
        return [v for v, _ in items], any(hit for _, hit in items)
    if not isinstance(node, dict):
        return node, False
    if node.get("class_name") == "DTypePolicy" and node.get("config", {}).get("name") in _HALF:
        return "float32", True
    out, changed = {}, False
    for key, value in node.items():
        if key == "dtype" and isinstance(value, str) and value in _HALF:
            out[key], hit = "float32", True
        else:
            out[key], hit = _float32_config(value)
        changed = changed or hit
    return out, changed


def _export_saved_model(model: keras.Model, shape: tuple[int, int, int], dest: str) -> None:
    """A SavedModel whose only signature is inference-mode `model(x)` with a free batch size."""
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve",
        lambda images: model(images, training=False),
        input_signature=[tf.TensorSpec((None, *shape), tf.float32, name="image")],
    )
    archive.write_out(dest, verbose=False)


def _configure(converter: Any, quantize: str, calibration: np.ndarray | None) -> None:
    import tensorflow as tf

    if quantize == "none":
        return
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
        return
    converter.representative_dataset = lambda: _single_images(calibration)
    # Only int8 kernels: a float fallback op would make the file fail on integer-only hardware.
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.float32
    converter.inference_output_type = tf.float32


def _single_images(images: np.ndarray) -> Iterator[list[np.ndarray]]:
    """The converter's calibration feed: one raw float32 image per step, batch axis kept."""
    for image in images:
        yield [image[None].astype(np.float32)]


def _calibration_images(representative: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if representative is None:
        raise ConfigError(
            "int8 quantization needs representative images (N, H, W, C raw 0-255 pixels) to "
            "calibrate activation ranges; pass representative=... or use float16"
        )
    images = np.asarray(representative, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:] != tuple(shape) or len(images) == 0:
        raise ConfigError(
            f"representative images must have shape (N>=1, {', '.join(map(str, shape))}), "
            f"got {images.shape}"
        )
    if not np.isfinite(images).all():
        raise ConfigError("representative images contain NaN or inf")
    if len(images) > MAX_CALIBRATION_IMAGES:
        pick = np.linspace(0, len(images) - 1, MAX_CALIBRATION_IMAGES).round().astype(int)
        images = images[pick]
    return images


def _interpreter_class() -> Any:
    """LiteRT's interpreter when installed (tf.lite's is deprecated), else TF's own copy.

    TF 2.21 still ships `tf.lite.Interpreter` (it only warns), and it is what the converter
    was tested against here, so the heavy `ai_edge_litert` wheel is not a dependency.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        return tf.lite.Interpreter
    return Interpreter


class TFLiteModel:
    """A .tflite file behind a `model.predict`-like call, for accuracy and speed comparisons.

    Not thread-safe (one interpreter, resized per batch size); make one per thread.
    """

    def __init__(self, content: bytes, threads: int = 1) -> None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads must be a positive integer, got {threads!r}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tf.lite deprecation notice, once per model
            self._interpreter = _interpreter_class()(
                model_content=bytes(content), num_threads=threads
            )
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]
        self._batch = 0
        self.threads = threads
        self.input_size: int = int(self._input["shape"][1])
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in self._input["shape"][1:])

    def predict(self, images: np.ndarray, batch_size: int = 1) -> np.ndarray:
        """Probabilities for raw 0-255 images, same shape as the Keras model's `predict`."""
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != self.input_shape:
            raise DataError(
                f"TFLite model expects images of shape (N, {', '.join(map(str, self.input_shape))})"
                f", got {images.shape}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if len(images) == 0:
            return np.zeros((0, *self._output["shape"][1:]), dtype=np.float32)
        chunks = [self._run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return np.concatenate(chunks, axis=0)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) != self._batch:
            self._interpreter.resize_tensor_input(self._input["index"], batch.shape, strict=True)
            self._interpreter.allocate_tensors()
            self._batch = len(batch)
        self._interpreter.set_tensor(self._input["index"], _quantize(batch, self._input))
        self._interpreter.invoke()
        return _dequantize(self._interpreter.get_tensor(self._output["index"]), self._output)


def _quantize(x: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Float pixels → the input tensor's dtype (a no-op for this module's float-I/O files)."""
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype, copy=False)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    q = np.round(x / scale + zero_point) if scale else np.round(x)
    return np.clip(q, info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """The output tensor as float32 probabilities, whatever its storage type."""
    if np.dtype(detail["dtype"]).kind == "f":
        return y.astype(np.float32, copy=True)
    scale, zero_point = detail["quantization"]
    return ((y.astype(np.float32) - zero_point) * (scale or 1.0)).astype(np.float32)


def agreement(a_probs: np.ndarray, b_probs: np.ndarray, threshold: float = 0.5) -> float:
    """Fraction of images given the same class: the decision, not the probability, is what
    quantization must preserve (int8 shifts probabilities by a few hundredths by design)."""
    a, b = predicted_labels(a_probs, threshold), predicted_labels(b_probs, threshold)
    if a.shape != b.shape:
        raise ValueError(
            f"cannot compare predictions of shapes {np.shape(a_probs)} and {np.shape(b_probs)}"
        )
    if a.size == 0:
        raise ValueError("cannot compute agreement of zero predictions")
    return float(np.mean(a == b))


def check_parity(
    keras_probs: np.ndarray,
    tflite_probs: np.ndarray,
    min_agreement: float = 0.99,
    threshold: float = 0.5,
) -> float:
    """The agreement, or a MedimgError when the edge file decides differently too often.

    A gate rather than a metric: shipping a file whose decisions drift from the evaluated
    Keras model would make every reported accuracy number a statement about another model.
    """
    value = agreement(keras_probs, tflite_probs, threshold)
    if value < min_agreement:
        n = len(np.asarray(keras_probs))
        raise MedimgError(
            f"TFLite parity check failed: agreement {value:.4f} with Keras on {n} images "
            f"is below the bound {min_agreement:.4f}"
        )
    return value


def images_per_second(
    predict: Callable[[np.ndarray], Any],
    images: np.ndarray,
    batch_size: int = 1,
    min_seconds: float = 1.0,
) -> float:
    """Throughput of `predict` on `batch_size`-image calls, cycling over `images`.

    One untimed warm-up call first (graph tracing, XNNPACK packing, tensor allocation are
    one-off costs, not per-image ones), then whole calls until `min_seconds` have passed, so
    short runs are not dominated by timer resolution. With batch_size=1 this is 1/latency, the
    number an edge device classifying one cell at a time sees. For Keras pass
    `model.predict_on_batch`, not `model.predict` (its per-call dataset setup would dominate).
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim < 1 or len(images) == 0:
        raise ValueError("images_per_second needs at least one image")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not min_seconds > 0:
        raise ValueError(f"min_seconds must be > 0, got {min_seconds!r}")
    batches = itertools.cycle(
        [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    )
    predict(next(batches))
    done, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_seconds:
        batch = next(batches)
        predict(batch)
        done += len(batch)
    return done / elapsed


def write_tflite(content: bytes, dest: Path) -> Path:
    """Write the flatbuffer atomically, refusing bytes that are not a TFLite file.

    DVC caches whatever lands at `dest`; a truncated or mixed-up file there would be served
    to devices as if it were the evaluated model.
    """
    data = bytes(content)
    if len(data) < 8 or data[4:8] != TFLITE_IDENTIFIER:
        raise MedimgError(f"refusing to write {dest}: content is not a TFLite flatbuffer")
    dest = Path(dest)
    write_bytes(dest, data)
    return dest


def edge_model(
    model: keras.Model,
    quantize: Quantize,
    *,
    split_dir: str | Path,
    size: int,
    n_train: int,
    samples: int,
    seed: int,
) -> tuple[bytes, TFLiteModel]:
    """The .tflite file of `model` and a one-thread interpreter on it. int8 calibrates on a
    seeded random subset of `samples` of the `n_train` training images (all classes mixed),
    decoded alone: indices first, so only those images are read."""
    from medimg.data.shards import take_images

    calibration = None
    if quantize == "int8":
        picks = np.random.default_rng(seed).choice(n_train, min(samples, n_train), replace=False)
        calibration = take_images(split_dir, "train", size, picks.tolist())
    content = to_tflite(model, quantize, representative=calibration)
    return content, TFLiteModel(content, threads=1)


@dataclass(frozen=True)
class EdgeCheck:
    """An edge file and how it decides on the test images compared with the Keras model."""

    content: bytes
    lite: TFLiteModel
    probs: np.ndarray
    agreement: float
    accuracy: float

    @property
    def size(self) -> int:
        return len(self.content)


def lite_probabilities(lite: TFLiteModel, images: np.ndarray) -> np.ndarray:
    """The edge file's probabilities in `probabilities`' shape: (N,) sigmoid or (N, K)."""
    # 64 cells at 64 px a call, fewer for larger images: the interpreter's arena grows too
    probs = np.asarray(lite.predict(images, batch_size=batch_for(images, 64)), np.float64)
    return probs[:, 0] if probs.ndim == 2 and probs.shape[1] == 1 else probs


def compare_edge(
    content: bytes,
    lite: TFLiteModel,
    probs: np.ndarray,
    keras_probs: np.ndarray,
    y_test: np.ndarray,
    threshold: float = 0.5,
) -> EdgeCheck:
    """How the edge file's test probabilities decide compared with the Keras model's.

    The one int8/float16 check: the evaluate stage reports it and `medimg export` gates on
    it; both compute the two sets of probabilities in one streamed pass over test.
    """
    return EdgeCheck(
        content=content,
        lite=lite,
        probs=probs,
        agreement=agreement(keras_probs, probs, threshold),
        accuracy=float(np.mean(predicted_labels(probs, threshold) == np.asarray(y_test))),
    )


def edge_benchmark(
    model: keras.Model,
    bench: np.ndarray,
    y_test: np.ndarray,
    keras_probs: np.ndarray,
    lite: tuple[bytes, TFLiteModel, np.ndarray] | None,
) -> tuple[dict[str, Any], bytes | None]:
    """The evaluate stage's numbers: Keras images/s on CPU and, given the int8 file (content,
    interpreter, its test probabilities), its size, accuracy and agreement with the float
    model and its single-thread images/s; and the file's bytes."""
    keras_ips = images_per_second(model.predict_on_batch, bench, batch_size=32, min_seconds=1.0)
    result: dict[str, Any] = {"keras_cpu_images_per_s": round(keras_ips, 1)}
    if lite is None:
        return result, None
    check = compare_edge(*lite, keras_probs, y_test)
    result |= {
        "int8_bytes": check.size,
        "int8_accuracy": check.accuracy,
        "int8_agreement": check.agreement,
        "int8_images_per_s_1thread": round(images_per_second(check.lite.predict, bench[:64]), 1),
    }
    return result, check.content
