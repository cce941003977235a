"""Report figures: structure of each figure and the atomic PNG writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from medimg.analysis.plots import (
    gradcam_grid,
    plot_comparison,
    plot_confusion_matrix,
    plot_learning_curves,
    plot_pr,
    plot_reliability,
    plot_roc,
    save_figure,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def binary() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    return y, np.clip(0.4 * y + 0.6 * rng.random(200), 0, 1)


@pytest.fixture
def three_class() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 150)
    logits = rng.normal(size=(150, 3)) + 2 * np.eye(3)[y]
    return y, np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)


def test_confusion_matrix_counts_and_row_percentages() -> None:
    fig = plot_confusion_matrix([[50, 5], [10, 35]], ["Parasitized", "Uninfected"])
    assert isinstance(fig, Figure) and len(fig.axes) == 2  # heatmap + colour bar
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["50\n90.9%", "5\n9.1%", "10\n22.2%", "35\n77.8%"]


def test_confusion_matrix_empty_row_is_zero_percent() -> None:
    fig = plot_confusion_matrix(np.zeros((3, 3), int), ["a", "b", "c"])
    assert len(fig.axes[0].texts) == 9
    assert fig.axes[0].texts[0].get_text() == "0\n0.0%"


def test_roc_binary_and_one_vs_rest(binary, three_class) -> None:
    fig = plot_roc(*binary, class_names=["Uninfected", "Parasitized"])
    lines = fig.axes[0].get_lines()
    assert len(fig.axes) == 1 and len(lines) == 2  # curve + chance
    assert lines[0].get_label().startswith("Parasitized (AUC")
    assert len(plot_roc(*three_class).axes[0].get_lines()) == 4


def test_roc_skips_a_class_absent_from_labels(three_class) -> None:
    y, probs = three_class
    keep = y != 2
    assert len(plot_roc(y[keep], probs[keep]).axes[0].get_lines()) == 3


def test_pr_curves(binary, three_class) -> None:
    assert len(plot_pr(*binary).axes[0].get_lines()) == 1
    fig = plot_pr(*three_class, class_names=["CNV", "DME", "NORMAL"])
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert len(labels) == 3 and labels[1].startswith("DME (AP")


def test_reliability_diagram(binary, three_class) -> None:
    fig = plot_reliability(*binary, n_bins=5)
    assert len(fig.axes) == 2
    top, bottom = fig.axes
    assert len(top.get_lines()) == 2 and len(bottom.patches) == 5
    assert "ECE" in top.get_title()
    assert len(plot_reliability(*three_class).axes) == 2


def test_learning_curves_with_and_without_lr() -> None:
    history = {
        "loss": [0.7, 0.5, 0.4],
        "val_loss": [0.72, 0.6, 0.55],
        "accuracy": [0.5, 0.7, 0.8],
        "val_accuracy": [0.5, 0.65, 0.7],
        "learning_rate": [1e-3, 1e-3, 5e-4],
    }
    fig = plot_learning_curves(history)
    assert len(fig.axes) == 3
    assert [len(ax.get_lines()) for ax in fig.axes] == [2, 2, 1]
    assert fig.axes[2].get_yscale() == "log"
    only_loss = plot_learning_curves({"loss": [1.0, 0.5]})
    assert len(only_loss.axes) == 1 and len(only_loss.axes[0].get_lines()) == 1
    with pytest.raises(ValueError):
        plot_learning_curves({"auc": [0.5]})


def test_comparison_bars_with_intervals() -> None:
    results = {
        "simple_cnn": {"point": 0.93, "low": 0.91, "high": 0.95},
        "compact_cnn": {"point": 0.95, "low": 0.94, "high": 0.96},
        "resnet": {"point": 0.96, "low": None, "high": None},
    }
    fig = plot_comparison(results)
    ax = fig.axes[0]
    assert len(ax.patches) == 3 and len(ax.texts) == 3
    assert [t.get_text() for t in ax.texts] == ["0.930", "0.950", "0.960"]
    assert [t.get_text() for t in ax.get_xticklabels()] == list(results)
    assert ax.get_ylim()[0] == pytest.approx(0.85)


def test_gradcam_grid_removes_unused_cells() -> None:
    rng = np.random.default_rng(2)
    images = rng.random((5, 16, 16, 3)).astype("float32")
    heat = rng.random((5, 16, 16)).astype("float32")
    fig = gradcam_grid(images, heat, [f"img {i}" for i in range(5)], ncols=3)
    assert len(fig.axes) == 5
    assert fig.axes[4].get_title() == "img 4"
    with pytest.raises(ValueError):
        gradcam_grid(images, heat[:2])


def test_save_figure_writes_png_atomically(tmp_path: Path, binary) -> None:
    dest = tmp_path / "reports" / "roc.png"
    assert save_figure(plot_roc(*binary), dest) == dest
    data = dest.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert [p.name for p in dest.parent.iterdir()] == ["roc.png"]  # no temporary left over
