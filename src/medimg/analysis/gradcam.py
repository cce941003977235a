"""Grad-CAM heatmaps (Selvaraju et al. 2017), as used by seed 004 for misclassified images.

A heatmap shows which region of the cell drove the prediction: a model that is right for the
wrong reason (staining artefacts, the slide border) shows it here long before it fails on a new
microscope. Keras and TensorFlow are imported inside the functions so `overlay` (used by the
report plots) costs no TensorFlow import. `gradcam_examples` picks and explains the evaluate
stage's test images (its plots draw them).

How the gradient is taken: the model is re-wired (`keras.models.clone_model` with the same
layers and a `call_function`) into a graph that adds a zero variable `delta` of shape
(N, 1, 1, C), broadcast, to the chosen 4-D feature map A and also outputs A.
d score / d delta[n, 0, 0, c] is the sum over positions of d score / d A[n, :, :, c],
i.e. the Grad-CAM channel weight up to a constant factor that the final max-normalisation
removes. That turns "gradient with respect to an intermediate activation" into a gradient with
respect to a variable, which `tf.GradientTape` takes (the pipeline runs Keras on TensorFlow),
and it works the same for layers inside nested models (an application base inside a wrapper),
which a plain `keras.Model(model.inputs, inner_layer.output)` cannot reach.

Which score is differentiated: for a softmax output the probability of the class; for a single
sigmoid unit p for class 1 and 1 - p for class 0 (so class 0 highlights what lowers p). With
`class_index=None` the predicted class is used per image (argmax, or p >= 0.5). A probability
and its log give the same map after normalisation (they differ by a positive per-image
factor); for a single sigmoid unit that map equals the one from the logit and its sign.
Models are assumed channels-last with a single image input and a single output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from medimg.analysis.metrics import predicted_labels

if TYPE_CHECKING:
    import keras


# ------------------------------------------------------------------------------ layer selection


def _output_rank(layer: Any) -> int:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):  # never called, or called more than once
        return 0


def _last_4d_path(model: Any) -> list[str]:
    """Names leading to the last layer with a 4-D output, descending into nested models.

    A nested model whose own output is 4-D (an application base with `pooling=None`) is itself
    the answer: its output is its last feature map.
    """
    import keras

    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if _output_rank(layer) == 4:
            return [layer.name]
        if isinstance(layer, keras.Model):
            inner = _last_4d_path(layer)
            if inner:
                return [layer.name, *inner]
    return []


def _find_path(model: Any, name: str) -> list[str]:
    """Path to the layer called `name` in `model` or any model nested in it ([] if none)."""
    import keras

    for layer in model.layers:
        if layer.name == name:
            return [name]
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            inner = _find_path(layer, name)
            if inner:
                return [layer.name, *inner]
    return []


def _resolve_path(model: Any, layer_name: str | None) -> list[str]:
    if layer_name is None:
        path = _last_4d_path(model)
        if not path:
            raise ValueError(f"model {model.name!r} has no layer with a 4-D output")
        return path
    path = layer_name.split("/") if "/" in layer_name else _find_path(model, layer_name)
    if not path:
        raise ValueError(f"no layer {layer_name!r} in model {model.name!r} or its sub-models")
    return path


def _layer_at(model: Any, path: list[str]) -> Any:
    layer = model
    for name in path:
        layer = layer.get_layer(name)
    return layer


# --------------------------------------------------------------------------------- re-wiring


def _probe_layer(n: int, channels: int, dtype: str) -> Any:
    """A layer adding a zero (n, 1, 1, channels) variable `delta` to a feature map."""
    import keras

    class FeatureProbe(keras.layers.Layer):
        def __init__(self) -> None:
            super().__init__(dtype=dtype, name="gradcam_probe")
            self.delta = self.add_weight(
                shape=(n, 1, 1, channels), initializer="zeros", trainable=False, name="delta"
            )

        def call(self, x: Any) -> Any:
            return keras.ops.add(x, self.delta)

    return FeatureProbe()


def _rewire(model: Any, path: list[str], probe: Any) -> Any:
    """`model` replayed (same layers, same weights) with `probe` after the layer at `path`.

    Returns a keras.Model with outputs [feature map, model output]. A nested model on the
    path is replayed the same way, and its feature map becomes an output of the outer graph,
    so layers inside an application base are reachable. Uses `keras.models.clone_model` with
    the layers themselves as clones and a `call_function` that intercepts the path.
    """
    import keras

    found: dict[str, Any] = {}

    def call(layer: Any, *args: Any, **kwargs: Any) -> Any:
        if layer.name != path[0]:
            return layer(*args, **kwargs)
        if len(path) == 1:
            found["features"] = layer(*args, **kwargs)
            return probe(found["features"])
        found["features"], out = _rewire(layer, path[1:], probe)(*args, **kwargs)
        return out

    if isinstance(model, keras.Sequential):
        inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
        x = inputs
        for layer in model.layers:
            x = call(layer, x)
        outputs = x
    else:
        clone = keras.models.clone_model(
            model, clone_function=lambda layer: layer, call_function=call
        )
        inputs, outputs = clone.inputs, clone.outputs[0]
    if "features" not in found:
        raise ValueError(f"layer {'/'.join(path)!r} is not on the path from input to output")
    return keras.Model(inputs, [found["features"], outputs])


def _gradcam_model(model: Any, path: list[str], n: int) -> tuple[Any, Any]:
    """(keras.Model images -> [feature map, output], its probe); see the module docstring."""
    if len(model.inputs) != 1:
        raise ValueError("grad_cam supports single-input models")
    target = _layer_at(model, path).output
    probe = _probe_layer(n, int(target.shape[-1]), str(target.dtype))
    return _rewire(model, path, probe), probe


# ----------------------------------------------------------------------------------- gradients


def _class_score(out: Any, class_index: int | None) -> Any:
    """Per-image score to differentiate (see the module docstring), summed over the batch.

    Images are independent (inference mode), so the gradient of the sum is each image's own.
    """
    from keras import ops

    p = ops.cast(out, "float32")
    if p.shape[-1] == 1:
        p1 = p[:, 0]
        if class_index is None:
            return ops.sum(ops.where(p1 >= 0.5, p1, 1.0 - p1))
        return ops.sum(p1 if class_index == 1 else 1.0 - p1)
    if class_index is None:
        return ops.sum(ops.max(p, axis=-1))
    return ops.sum(p[:, class_index])


def _features_and_gradients(gmodel: Any, probe: Any, images: np.ndarray, ci: int | None):
    """The feature maps and d score / d delta, by `tf.GradientTape`."""
    import tensorflow as tf

    delta = probe.delta.value
    with tf.GradientTape() as tape:
        tape.watch(delta)
        features, out = gmodel(tf.convert_to_tensor(images), training=False)
        score = _class_score(out, ci)
    return features.numpy(), tape.gradient(score, delta).numpy()


# ------------------------------------------------------------------------------------ public API


def grad_cam(
    model: keras.Model,
    images: np.ndarray,
    class_index: int | None = None,
    layer_name: str | None = None,
) -> np.ndarray:
    """Grad-CAM heatmaps, shape (N, H, W) in [0, 1], at the input images' size.

    `layer_name=None` uses the last layer with a 4-D output (descending into nested models); a
    name is searched in nested models too, or can be given as a `base/conv5_block3_out` path.
    An image whose map is all zero (no positive evidence, or a saturated output with zero
    gradient) gets an all-zero heatmap.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        raise NotImplementedError(
            f"grad_cam needs the TensorFlow backend of Keras, not {keras.backend.backend()!r}"
        )
    x = np.asarray(images, dtype="float32")
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {x.shape}")
    path = _resolve_path(model, layer_name)
    gmodel, probe = _gradcam_model(model, path, len(x))
    features, grads = _features_and_gradients(gmodel, probe, x, class_index)
    weights = grads[:, 0, 0, :].astype("float32")
    cam = np.maximum(np.einsum("nhwc,nc->nhw", features.astype("float32"), weights), 0.0)
    return _to_image_size(cam, x.shape[1:3])


def _to_image_size(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling, then each map scaled so its maximum is 1."""
    from keras import ops

    resized = ops.image.resize(cam[..., None], size, interpolation="bilinear")
    heat = np.clip(ops.convert_to_numpy(resized)[..., 0], 0.0, None)
    peak = heat.max(axis=(1, 2), keepdims=True)
    return np.divide(heat, peak, out=np.zeros_like(heat), where=peak > 0).astype("float32")


def overlay(
    image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4, cmap: str = "jet"
) -> np.ndarray:
    """Blend a [0, 1] heatmap, coloured with a matplotlib colormap, over an image (uint8 RGB).

    Float images with values up to 1 are taken as [0, 1], anything else as [0, 255]; grey
    images are repeated to three channels so the colour of the heat stays readable.
    """
    from matplotlib import colormaps

    img = np.asarray(image, dtype="float32")
    if img.ndim == 2:
        img = img[..., None]
    if np.issubdtype(np.asarray(image).dtype, np.floating) and img.max(initial=0.0) <= 1.0:
        img = img * 255.0
    img = np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img[..., :3]
    heat = np.clip(np.asarray(heatmap, dtype="float32"), 0.0, 1.0)
    if heat.shape != img.shape[:2]:
        raise ValueError(f"heatmap shape {heat.shape} does not match image {img.shape[:2]}")
    colour = colormaps[cmap](heat)[..., :3] * 255.0
    return np.clip((1.0 - alpha) * img + alpha * colour, 0, 255).round().astype(np.uint8)


# ------------------------------------------------------------------- the evaluate stage's images


def gradcam_picks(
    y: np.ndarray, probs: np.ndarray, cls: int, n: int
) -> tuple[list[int], list[int]]:
    """The worst misclassified images of true class `cls` (most confident wrong), then the
    most confident correct ones, n in all."""
    pred = predicted_labels(probs)
    conf = np.where(probs >= 0.5, probs, 1 - probs) if probs.ndim == 1 else probs.max(1)
    idx = np.flatnonzero(y == cls)
    wrong = idx[pred[idx] != cls]
    right = idx[pred[idx] == cls]
    wrong = wrong[np.argsort(-conf[wrong])][: max(n // 2, n - len(right))]
    right = right[np.argsort(-conf[right])][: n - len(wrong)]
    return wrong.tolist(), right.tolist()


def gradcam_examples(
    model: Any,
    images: Callable[[list[int]], np.ndarray],
    y: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    n: int,
) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """Per true class: the picked test images, their heatmaps and titles (`WRONG: a → b`).

    `images(indices)` decodes just those images (raw 0-255 pixels); a class with no test
    image is left out.
    """
    examples = {}
    pred = predicted_labels(probs)
    for cls, name in enumerate(classes):
        wrong, right = gradcam_picks(y, probs, cls, n)
        picks = wrong + right
        if not picks:
            continue
        x = images(picks)
        titles = [f"{'WRONG' if i in wrong else 'ok'}: {name} → {classes[pred[i]]}" for i in picks]
        examples[name] = (x, grad_cam(model, x), titles)
    return examples
