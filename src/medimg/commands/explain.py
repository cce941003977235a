"""`medimg explain`: a Grad-CAM overlay of one image, predicted class in the title."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import numpy as np

from medimg.commands.model_ref import MODEL_HELP, load_classifier
from medimg.config import Params
from medimg.data.images import ImageInputError, decode_image, resize_batch
from medimg.errors import DataError
from medimg.scoring import Classifier, result_frame


def explain_image(clf: Classifier, data: bytes, source: str) -> tuple[np.ndarray, str]:
    """Grad-CAM overlay (uint8 RGB, the image's own size) for the predicted class, and a title.

    The map is computed at the model's input size and upsampled onto the original pixels, so
    the overlay shows the cell as it is on disk, not the model's thumbnail of it.
    """
    from medimg.analysis.gradcam import grad_cam, overlay

    rgb = decode_image(data, source)
    x = resize_batch([rgb], clf.size)
    row = result_frame(clf.probabilities(x), clf.classes, clf.threshold).iloc[0]
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
    from medimg.analysis.plots import save_figure

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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-o", "--output", required=True, help="overlay PNG to write")
    p.add_argument("--model", default="champion", help=MODEL_HELP)


def run(params: Params, args: argparse.Namespace) -> int:
    explain_command(params, args.image, args.output, args.model)
    return 0
