"""TFRecord shards and the tf.data input pipeline.

Shards hold the original encoded bytes (PNG/JPEG), so one split serves every architecture:
each model's input size is applied at read time. A few shard files are also far cheaper for
DVC to hash and check than 27k loose PNGs. The pipeline is shards → parallel decode →
resize → uint8 cache → shuffle → batch → float32 → prefetch, deterministic for a seed;
augmentation lives in the model's training graph (medimg.models.augment), not here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "patient": tf.io.FixedLenFeature([], tf.string),
    "path": tf.io.FixedLenFeature([], tf.string),
}
AUTOTUNE = tf.data.AUTOTUNE


def _example(image: bytes, label: int, patient: str, path: str) -> bytes:
    def b(v: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[v]))

    feature = {
        "image": b(image),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "patient": b(patient.encode()),
        "path": b(path.encode()),
    }
    # deterministic: protobuf map order otherwise follows the process's hash seed, and the
    # same split would hash differently in dvc.lock on every machine
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    return example.SerializeToString(deterministic=True)


def shard_name(split: str, index: int, total: int) -> str:
    return f"{split}-{index:03d}-of-{total:03d}.tfrecord"


def shard_count(total_bytes: int, shard_mb: float) -> int:
    """How many shards keep each near `shard_mb` MB: at least one, never an empty one."""
    return max(1, math.ceil(total_bytes / (shard_mb * 1e6)))


def write_shards(
    frame: pd.DataFrame, images: Mapping[str, bytes], out_dir: Path, shard_mb: float, seed: int
) -> dict[str, list[str]]:
    """Write each split's rows, shuffled once by `seed`, into ~`shard_mb` MB files.

    Shards are sized in bytes, not counted: a fixed count gives 2 MB files on a small set and
    multi-GB files on OCT2017. `images` is read one entry at a time in the shuffled order (the
    split stage passes a zip opened for random access), so memory does not grow with the data.
    Sizes come from the manifest's `bytes` column when there is one; each image goes to the
    lightest shard so far, so the files end up within one image of each other.
    """
    written: dict[str, list[str]] = {}
    for split, rows in frame.groupby("split", sort=True):
        rows = rows.sample(frac=1.0, random_state=seed)
        sizes = rows["bytes"] if "bytes" in rows else rows["path"].map(lambda p: len(images[p]))
        n = min(shard_count(int(sizes.sum()), shard_mb), len(rows))
        names = [shard_name(str(split), i, n) for i in range(n)]
        writers = [tf.io.TFRecordWriter(str(out_dir / name)) for name in names]
        filled = [0] * n
        try:
            for row in rows.itertuples(index=False):
                data = images[row.path]
                i = filled.index(min(filled))  # the lightest shard so far: sizes stay even
                writers[i].write(_example(data, int(row.label), str(row.patient), row.path))
                filled[i] += len(data)
        finally:
            for w in writers:
                w.close()
        written[str(split)] = names
    return written


def shard_files(split_dir: str | Path, split: str) -> list[str]:
    files = sorted(str(p) for p in Path(split_dir).glob(f"{split}-*.tfrecord"))
    if not files:
        raise FileNotFoundError(f"{split_dir}: no {split} shards; run the split stage first")
    return files


def decode(record: tf.Tensor, image_size: int) -> dict[str, tf.Tensor]:
    """Parse one Example to a uint8 RGB image of `image_size` and its metadata.

    The resize runs on floats and is rounded back to uint8: a cached image then takes a
    quarter of float32's memory (OCT2017 at 299 px: 29 GB instead of 116 GB), and serving
    rounds the same way (`medimg.data.images.resize_batch`).
    """
    ex = tf.io.parse_single_example(record, FEATURES)
    img = tf.io.decode_image(ex["image"], channels=3, expand_animations=False)
    img = tf.image.resize(img, (image_size, image_size), antialias=True)
    img = tf.cast(tf.round(tf.clip_by_value(img, 0.0, 255.0)), tf.uint8)
    return {"image": img, "label": ex["label"], "patient": ex["patient"], "path": ex["path"]}


def _records(split_dir: str | Path, split: str) -> tf.data.Dataset:
    """The serialized Examples of a split, in a fixed order (shard order, then record order)."""
    files = shard_files(split_dir, split)
    return tf.data.TFRecordDataset(files, num_parallel_reads=len(files))


def require_split(split_dir: str | Path, split: str) -> None:
    """A one-line DataError (exit code and all) when the split stage has not written `split`."""
    from medimg.errors import DataError

    try:
        shard_files(split_dir, split)
    except FileNotFoundError as err:
        raise DataError(str(err)) from None


def read_split(split_dir: str | Path, split: str, image_size: int) -> tf.data.Dataset:
    """Decoded, unbatched examples in a fixed order (shard order, then record order)."""
    return _records(split_dir, split).map(
        lambda r: decode(r, image_size), num_parallel_calls=AUTOTUNE, deterministic=True
    )


def make_dataset(
    split_dir: str | Path,
    split: str,
    image_size: int,
    batch_size: int,
    *,
    num_classes: int,
    training: bool = False,
    seed: int = 0,
    cache: str | Path = "memory",
    shuffle_buffer: int = 2048,
    limit: int | None = None,
) -> tf.data.Dataset:
    """(image, label) batches for Keras `fit`/`evaluate`: float32 0-255 images.

    `cache` is "memory" (uint8 images in RAM), "none" (decode every epoch) or a file path
    prefix for tf.data's on-disk cache, for sets that do not fit in memory. Images stay uint8
    until after the cache. Binary labels are float (N, 1) for a sigmoid unit; multi-class
    labels stay sparse ints. `limit` keeps the first examples *before* the cache: a `take`
    after it would stop every epoch short of a complete cache, and tf.data then throws the
    partial cache away.
    """

    def to_xy(ex: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        label = ex["label"]
        y = tf.cast(tf.expand_dims(label, -1), tf.float32) if num_classes == 2 else label
        return ex["image"], y

    ds = read_split(split_dir, split, image_size).map(to_xy, num_parallel_calls=AUTOTUNE)
    if limit is not None:
        ds = ds.take(limit)
    if cache == "memory":
        ds = ds.cache()
    elif cache != "none":
        ds = ds.cache(str(cache))
    if training:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    return ds.map(lambda x, y: (tf.cast(x, tf.float32), y)).prefetch(AUTOTUNE)


def iter_batches(
    split_dir: str | Path, split: str, image_size: int, batch: int = 256
) -> Iterator[tuple[np.ndarray, np.ndarray, list[str], list[str]]]:
    """The split in read order, `batch` images at a time: float32 0-255 images, labels,
    patients and paths. A whole split of OCT2017 at 224 px would be 12 GB as one array."""
    for ex in read_split(split_dir, split, image_size).batch(batch).as_numpy_iterator():
        patients = [p.decode() for p in ex["patient"]]
        yield (
            ex["image"].astype(np.float32),
            ex["label"],
            patients,
            [p.decode() for p in ex["path"]],
        )


def stream_split(
    split_dir: str | Path,
    split: str,
    image_size: int,
    scorers: Mapping[str, Callable[[np.ndarray], np.ndarray]],
    batch: int = 256,
) -> tuple[np.ndarray, list[str], list[str], dict[str, np.ndarray]]:
    """One pass over a split: labels, patients, paths, and each scorer's output per image.

    Only one batch of images is in memory at a time; the outputs (a probability or a few per
    image) are what is kept, so the evaluate stage's memory does not grow with the split.
    """
    require_split(split_dir, split)
    ys: list[np.ndarray] = []
    patients: list[str] = []
    paths: list[str] = []
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in scorers}
    for x, y, p, f in iter_batches(split_dir, split, image_size, batch):
        ys.append(y)
        patients += p
        paths += f
        for name, fn in scorers.items():
            outputs[name].append(np.asarray(fn(x)))
    joined = {k: np.concatenate(v) if v else np.zeros(0) for k, v in outputs.items()}
    return (np.concatenate(ys) if ys else np.zeros(0, np.int64)), patients, paths, joined


def take_images(
    split_dir: str | Path, split: str, image_size: int, indices: Sequence[int]
) -> np.ndarray:
    """float32 images at `indices` of the read order, in the order given.

    Records are filtered before decoding, so picking 100 calibration images out of 65k
    decodes 100 images, not the whole split.
    """
    require_split(split_dir, split)
    wanted = np.unique(np.asarray(indices, np.int64))
    if len(wanted) == 0:
        return np.zeros((0, image_size, image_size, 3), np.float32)
    keep = tf.constant(wanted)
    ds = (
        _records(split_dir, split)
        .enumerate()
        .filter(lambda i, _: tf.reduce_any(tf.equal(i, keep)))
        .map(lambda _, r: decode(r, image_size)["image"], num_parallel_calls=AUTOTUNE)
    )
    found = list(ds.as_numpy_iterator())
    if len(found) != len(wanted):
        raise IndexError(f"{split_dir}: {split} has no image at index {int(wanted[-1])}")
    row = {int(w): k for k, w in enumerate(wanted)}
    return np.stack(found).astype(np.float32)[[row[int(i)] for i in indices]]
