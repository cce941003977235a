"""The reference profile the evaluate stage stores with the served model: what `medimg monitor`
compares served requests with.

Measured on the images the model learnt from and was tuned on (a seeded sample of
`monitoring.reference.images` train images, plus every val image), in one streamed pass:
each record's original encoded bytes give the image properties (`medimg.data.properties`, as
the served model's request log measures them), and the same image resized as the model sees
it gives the penultimate-layer embedding (one forward pass of the two-output model
`medimg.models.loading.with_embedding` makes, handed in by evaluate). The predictions group
is val's served probabilities (calibrated, at the served TTA), which evaluate already has.

Test images are not used: the reference describes what the model was built on, and test
stays untouched for the headline.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medimg.config import ReferenceConfig
from medimg.data.properties import PROPERTIES, properties_of_bytes
from medimg.monitoring.reference import reference_from_table, with_model_outputs


def sample_indices(n: int, k: int, seed: int) -> np.ndarray:
    """`k` of `range(n)` (all when k >= n), sorted, for a seed: the same sample on any machine
    (numpy's PCG64 stream is fixed for a seed)."""
    if k >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


def measure_split(
    split_dir: str | Path,
    split: str,
    size: int,
    feature_model: Any | None,
    indices: Sequence[int] | None = None,
    batch: int = 128,
) -> tuple[dict[str, list[float]], np.ndarray | None]:
    """Properties (original pixels) and embeddings (model-size pixels) of a split's images,
    in read order; `indices` keeps only those positions (filtered before decoding)."""
    import tensorflow as tf

    from medimg.data.shards import FEATURES, decode, require_split, shard_files

    require_split(split_dir, split)
    ds = tf.data.TFRecordDataset(shard_files(split_dir, split))
    if indices is not None:
        keep = tf.constant(np.asarray(indices, np.int64))
        ds = ds.enumerate().filter(lambda i, _: tf.reduce_any(tf.equal(i, keep)))
        ds = ds.map(lambda _, r: r)

    def parse(record: Any) -> dict[str, Any]:
        raw = tf.io.parse_single_example(record, FEATURES)["image"]
        return {"raw": raw, "image": decode(record, size)["image"]}  # as training sees it

    table: dict[str, list[float]] = {name: [] for name in PROPERTIES}
    features: list[np.ndarray] = []
    for ex in ds.map(parse).batch(batch).as_numpy_iterator():
        for data in ex["raw"]:
            for name, value in properties_of_bytes(data).items():
                table[name].append(value)
        if feature_model is not None:
            out = feature_model.predict_on_batch(np.asarray(ex["image"], np.float32))
            features.append(np.asarray(out[1], np.float32))
    emb = np.concatenate(features) if features else None
    return table, emb


def reference_profile(
    feature_model: Any | None,
    split_dir: str | Path,
    size: int,
    n_train: int,
    val_probs: np.ndarray,
    val_decisions: Sequence[str],
    classes: Sequence[str],
    cfg: ReferenceConfig,
    seed: int,
) -> dict[str, Any]:
    """The whole reference (`monitoring.reference`'s format, version 2): image properties and
    embedding PCA over the train sample + val, val's served probabilities and decided-class
    shares. JSON-serialisable; ~60 KB with 8 components of a 512-wide embedding.

    `feature_model`: the served model with its embedding output
    (`medimg.models.loading.with_embedding`), or None for no embedding group."""
    if cfg.embedding_components == 0:
        feature_model = None
    picks = sample_indices(n_train, cfg.images, seed)
    train_props, train_emb = measure_split(split_dir, "train", size, feature_model, picks)
    val_props, val_emb = measure_split(split_dir, "val", size, feature_model)
    table = {k: np.asarray(train_props[k] + val_props[k], np.float64) for k in PROPERTIES}
    features = None
    if feature_model is not None and train_emb is not None and val_emb is not None:
        features = np.concatenate([train_emb, val_emb])
    reference = reference_from_table(table)
    reference["images"] = {"train": len(picks), "val": len(val_props[PROPERTIES[0]])}
    return with_model_outputs(
        reference,
        features=features,
        components=cfg.embedding_components,
        probs=val_probs,
        decisions=val_decisions,
        classes=classes,
        seed=seed,
    )
