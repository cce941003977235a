"""The evaluate stage's slices: image properties of val and test, then `slices.slice_report`.

Kept apart from `medimg.analysis.slices` (pure) because it reads the split: the properties
come from the *original* encoded bytes in the TFRecord shards (`split_properties`), one read
of val and test with a PIL decode per image and no model, so sharpness and size are those of
the image as acquired, not of the model's resized copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medimg.analysis.metrics import predicted_labels
from medimg.analysis.slices import plot_rows, slice_report
from medimg.config import EvaluateConfig
from medimg.data.properties import PROPERTIES, properties_of_bytes
from medimg.data.shards import require_split, shard_files
from medimg.io import write_json, write_text


def split_properties(split_dir: str | Path, split: str, batch: int = 256) -> pd.DataFrame:
    """One row per image of `split`: its path and the properties of its original pixels,
    from the encoded bytes the shards keep. No model, no resize, no TF decode: one read of
    the records and one PIL decode per image (rows join by path, so order does not matter)."""
    import tensorflow as tf

    require_split(split_dir, split)
    parse = {
        "image": tf.io.FixedLenFeature([], tf.string),
        "path": tf.io.FixedLenFeature([], tf.string),
    }
    records = tf.data.TFRecordDataset(shard_files(split_dir, split)).batch(batch)
    rows: list[dict[str, Any]] = []
    for ex in records.map(lambda r: tf.io.parse_example(r, parse)).as_numpy_iterator():
        for data, path in zip(ex["image"], ex["path"], strict=True):
            rows.append({"path": path.decode(), **properties_of_bytes(data)})
    return pd.DataFrame(rows, columns=["path", *PROPERTIES])


def evaluate_slices(
    split_dir: str | Path,
    scored: dict[str, Any],
    probs: np.ndarray,
    classes: list[str],
    threshold: float,
    cfg: EvaluateConfig,
    seed: int,
) -> dict[str, Any] | None:
    """slices.json's content for the test split (None when `evaluate.slices.enabled` is off).

    `scored`: evaluate's streamed scores (`y`, `patients`, `paths`, `val_patients`); binary
    decisions are taken at `threshold`, the served operating threshold.
    """
    sc = cfg.slices
    if not sc.enabled:
        return None
    empty = pd.DataFrame(columns=["path", *PROPERTIES])
    test = split_properties(split_dir, "test") if sc.properties else empty
    val = split_properties(split_dir, "val") if sc.properties else empty
    binary = probs.ndim == 1
    return slice_report(
        scored["y"],
        predicted_labels(probs, threshold),
        scored["patients"],
        scored["paths"],
        classes,
        test,
        val,
        scored["val_patients"],
        sc,
        threshold=threshold if binary else None,
        resamples=cfg.bootstrap,
        ci=cfg.ci,
        seed=seed,
    )


def slices_csv_path(eval_dir: Path) -> Path:
    """reports/eval/<arch>.slices.csv: beside the stage's out folder, as DVC plots must not
    sit inside another output."""
    return eval_dir.with_name(f"{eval_dir.name}.slices.csv")


def write_slices(out_dir: Path, csv_path: Path, report: dict[str, Any] | None) -> None:
    """`slices.json` into `out_dir` and the worst-first plot data into `csv_path` (an empty
    table when slices are off, so the DVC plot output always exists)."""
    rows = plot_rows(report or {})
    if report is not None:
        write_json(out_dir / "slices.json", report)
    write_text(csv_path, rows.to_csv(index=False))
