"""Report figures for the evaluate and register stages.

Figures are built as `matplotlib.figure.Figure` objects on an Agg canvas, never through pyplot:
stages run headless (CI, DVC, a GPU box without a display) and pyplot's global figure registry
would both pick a GUI backend and leak figures across calls. Every function returns the figure
so the caller can log it to MLflow and/or write it with `save_figure`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from sklearn import metrics as skm

from medimg.analysis.gradcam import overlay
from medimg.analysis.metrics import reliability_curve
from medimg.io import atomic_path

LR_KEYS = ("learning_rate", "lr")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 120, close: bool = True) -> Path:
    """Write `fig` atomically (a crash never leaves a truncated PNG for DVC) and release it.

    The format follows the suffix of `path` (png when there is none), because the temporary
    file `atomic_path` writes to has a `.tmp` suffix matplotlib cannot infer it from.
    """
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)
    if close and fig.canvas.manager is not None:
        import matplotlib.pyplot as plt  # only a pyplot-made figure is registered anywhere

        plt.close(fig)
    return path


# ---------------------------------------------------------------------------- confusion matrix


def plot_confusion_matrix(
    cm: ArrayLike, class_names: Sequence[str], *, title: str = "Confusion matrix"
) -> Figure:
    """Counts and row percentages (the per-class sensitivity) on a heatmap, seed 003 style.

    Colour follows the row percentage, not the count, so a rare class's errors stay visible.
    """
    counts = np.asarray(cm, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    pct = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    k = len(class_names)
    fig = _figure(1.6 + 1.1 * k, 1.2 + 1.0 * k)
    ax = fig.add_subplot()
    image = ax.imshow(pct, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="row %")
    for (i, j), n in np.ndenumerate(counts):
        colour = "white" if pct[i, j] > 0.5 else "black"
        ax.text(j, i, f"{n}\n{pct[i, j]:.1%}", ha="center", va="center", color=colour)
    ax.set_xticks(
        range(k), class_names, rotation=30 if k > 2 else 0, ha="right" if k > 2 else "center"
    )
    ax.set_yticks(range(k), class_names)
    ax.set(xlabel="Predicted", ylabel="True", title=title)
    return fig


# ------------------------------------------------------------------------------ ROC and PR curves


def _one_vs_rest(
    y_true: ArrayLike, scores: ArrayLike, class_names: Sequence[str] | None
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, binary labels, scores) per curve: one for 1-D scores, one per class for 2-D.

    Classes absent from (or alone in) `y_true` are dropped: their curve is undefined.
    """
    y, s = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        name = class_names[1] if class_names is not None and len(class_names) > 1 else "positive"
        pairs = [(str(name), (y == 1).astype(int), s)]
    else:
        names = class_names or [str(k) for k in range(s.shape[1])]
        pairs = [(str(names[k]), (y == k).astype(int), s[:, k]) for k in range(s.shape[1])]
    return [(n, yk, sk) for n, yk, sk in pairs if 0 < yk.sum() < yk.size]


def plot_roc(
    y_true: ArrayLike,
    scores: ArrayLike,
    class_names: Sequence[str] | None = None,
    *,
    title: str = "ROC curve",
) -> Figure:
    """ROC curve for P(positive) (1-D scores) or one-vs-rest curves for (N, K) probabilities.

    One line per curve plus the dashed chance diagonal.
    """
    fig = _figure(5, 4.5)
    ax = fig.add_subplot()
    for name, yk, sk in _one_vs_rest(y_true, scores, class_names):
        fpr, tpr, _ = skm.roc_curve(yk, sk)
        ax.plot(fpr, tpr, label=f"{name} (AUC {skm.auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    ax.set(xlabel="1 - specificity (FPR)", ylabel="Sensitivity (TPR)", title=title)
    ax.set(xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return fig


def plot_pr(
    y_true: ArrayLike,
    scores: ArrayLike,
    class_names: Sequence[str] | None = None,
    *,
    title: str = "Precision-recall curve",
) -> Figure:
    """Precision-recall curve(s), one line per curve, labelled with average precision.

    The precision a random classifier gets (the prevalence) is in each label, since unlike ROC
    the PR baseline moves with class balance.
    """
    fig = _figure(5, 4.5)
    ax = fig.add_subplot()
    for name, yk, sk in _one_vs_rest(y_true, scores, class_names):
        precision, recall, _ = skm.precision_recall_curve(yk, sk)
        ap = skm.average_precision_score(yk, sk)
        label = f"{name} (AP {ap:.3f}, prevalence {yk.mean():.2f})"
        ax.plot(recall, precision, drawstyle="steps-post", label=label)
    ax.set(xlabel="Recall (sensitivity)", ylabel="Precision", title=title)
    ax.set(xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower left")
    return fig


# ---------------------------------------------------------------------------------- calibration


def plot_reliability(
    y_true: ArrayLike, probs: ArrayLike, *, n_bins: int = 10, title: str = "Reliability"
) -> Figure:
    """Reliability diagram over a histogram of bin counts (two axes).

    The histogram matters: a bin far off the diagonal with three samples in it is noise.
    """
    curve = reliability_curve(y_true, probs, n_bins)
    edges = np.asarray(curve["edges"])
    fig = _figure(5, 5.5)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    top.plot(curve["mean_predicted"], curve["observed"], marker="o", label="model")
    ylabel = "Observed frequency" if np.ndim(probs) == 1 else "Top-label accuracy"
    top.set(ylabel=ylabel, ylim=(0, 1.01), title=f"{title} (ECE {curve['ece']:.3f})")
    top.legend(loc="upper left")
    bottom.bar(curve["bin_lower"], curve["count"], width=np.diff(edges)[0], align="edge")
    bottom.set(xlabel="Predicted probability", ylabel="Count", xlim=(0, 1))
    return fig


# ------------------------------------------------------------------------------ learning curves


def plot_learning_curves(
    history: Mapping[str, Sequence[float]],
    metrics: Sequence[str] = ("loss", "accuracy"),
    *,
    title: str = "Learning curves",
) -> Figure:
    """Train vs validation per metric (Keras `History.history`), plus the learning rate.

    One panel per metric of `metrics` present in `history`, train and `val_` lines in it, and
    a log-scale learning-rate panel when `learning_rate`/`lr` was logged: a plateau in the
    loss usually lines up with a step there.
    """
    panels = [m for m in metrics if m in history]
    lr_key = next((k for k in LR_KEYS if k in history), None)
    n = len(panels) + (lr_key is not None)
    if n == 0:
        raise ValueError(f"history has none of {list(metrics)} nor a learning rate")
    fig = _figure(4.2 * n, 3.6)
    axes = np.atleast_1d(fig.subplots(1, n))
    for ax, name in zip(axes, panels, strict=False):
        _plot_series(ax, history, name)
    if lr_key is not None:
        _plot_series(axes[-1], history, lr_key)
        axes[-1].set_yscale("log")
    fig.suptitle(title)
    return fig


def _plot_series(ax: Axes, history: Mapping[str, Sequence[float]], name: str) -> None:
    for key, label in ((name, "train"), (f"val_{name}", "validation")):
        if key in history:
            values = np.asarray(history[key], dtype=np.float64)
            ax.plot(np.arange(1, values.size + 1), values, marker=".", label=label)
    ax.set(xlabel="Epoch", title=name)
    ax.legend()


# ---------------------------------------------------------------------------------- comparison


def plot_comparison(
    results: Mapping[str, Mapping[str, float | None]],
    *,
    metric: str = "accuracy",
    title: str | None = None,
) -> Figure:
    """One bar per architecture with its bootstrap interval, from `bootstrap_ci`-shaped dicts.

    `results` maps a name to {"point", "low", "high"}; a missing bound draws no error bar. For
    scores in [0, 1] the y axis starts just below the lowest bound: 0.95 vs 0.97 is invisible
    on a zero-based axis, and the intervals, not the bar heights, carry the comparison.
    """
    names = list(results)
    if not names:
        raise ValueError("nothing to compare")
    point = np.array([_num(results[n]["point"]) for n in names])
    low = np.array([_num(results[n].get("low"), p) for n, p in zip(names, point, strict=True)])
    high = np.array([_num(results[n].get("high"), p) for n, p in zip(names, point, strict=True)])
    fig = _figure(1.5 + 1.2 * len(names), 4)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    ax.bar(x, point, yerr=[point - low, high - point], capsize=5, color="tab:blue", alpha=0.8)
    for xi, p, h in zip(x, point, high, strict=True):
        ax.text(xi, h, f"{p:.3f}", ha="center", va="bottom")
    ax.set_xticks(x, names, rotation=20 if len(names) > 3 else 0)
    ax.set(ylabel=metric, title=title or f"{metric} with confidence interval")
    if low.min() >= 0.0 and high.max() <= 1.0:
        ax.set_ylim(max(0.0, math.floor((low.min() - 0.02) * 20) / 20), 1.0)
    return fig


def _num(value: float | None, default: float = float("nan")) -> float:
    return default if value is None else float(value)


# ------------------------------------------------------------------------------------- Grad-CAM


def gradcam_grid(
    images: Sequence[np.ndarray] | np.ndarray,
    heatmaps: Sequence[np.ndarray] | np.ndarray,
    titles: Sequence[str] | None = None,
    *,
    alpha: float = 0.4,
    ncols: int = 4,
) -> Figure:
    """Grad-CAM overlays in a grid, one axis per image (unused grid cells are removed).

    Titles are where the caller says why an image is shown (true/predicted class, p).
    """
    if len(images) == 0 or len(images) != len(heatmaps):
        raise ValueError("need the same, non-zero number of images and heatmaps")
    if titles is not None and len(titles) != len(images):
        raise ValueError("titles must match images one to one")
    n = len(images)
    cols = min(ncols, n)
    rows = math.ceil(n / cols)
    fig = _figure(2.6 * cols, 2.8 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for i, ax in enumerate(axes):
        if i >= n:
            fig.delaxes(ax)
            continue
        ax.imshow(overlay(images[i], heatmaps[i], alpha=alpha))
        ax.set_axis_off()
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
    return fig
