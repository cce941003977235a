from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from medimg.data.shards import (
    make_dataset,
    shard_count,
    stream_split,
    take_images,
    write_shards,
)
from tests.conftest import load_arrays, png_bytes


@pytest.fixture
def shards(tmp_path):
    rows, images = [], {}
    for i in range(20):
        split = "train" if i < 14 else "val"
        path = f"cell_images/c{i % 2}/img{i}.png"
        mode = "L" if i == 3 else "RGB"  # a 1-channel image must come out as RGB
        images[path] = png_bytes(20 + i, mode=mode, seed=i)
        rows.append({"path": path, "label": i % 2, "patient": f"P{i // 4}", "split": split})
    frame = pd.DataFrame(rows)
    frame["bytes"] = frame["path"].map(lambda p: len(images[p]))
    # three train shards: each may hold a third of the train bytes (and a little more)
    shard_mb = frame.loc[frame["split"] == "train", "bytes"].sum() / 3 / 1e6 * 1.001
    written = write_shards(frame, images, tmp_path, shard_mb=shard_mb, seed=1)
    return tmp_path, written, images, frame, shard_mb


def test_shard_count_follows_bytes():
    assert shard_count(0, 100) == 1  # an empty split still gets its one file
    assert shard_count(100_000_000, 100) == 1
    assert shard_count(100_000_001, 100) == 2
    assert shard_count(5_800_000_000, 100) == 58  # OCT2017's 5.8 GB


WRITE_IN_A_CHILD = """
import sys
from pathlib import Path
import pandas as pd
from medimg.data.shards import write_shards
images = {f"cell_images/c{i % 2}/img{i}.png": bytes([i]) * 50 for i in range(12)}
frame = pd.DataFrame(
    [{"path": p, "label": i % 2, "patient": f"P{i // 3}", "split": "train"}
     for i, p in enumerate(images)]
)
write_shards(frame, images, Path(sys.argv[1]), shard_mb=100, seed=3)
"""


def test_shards_are_byte_identical_whatever_the_hash_seed(tmp_path):
    """The same split must give the same files (and dvc.lock hash) on every machine."""
    contents = []
    for hash_seed in ("1", "2"):
        out = tmp_path / hash_seed
        out.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "TF_CPP_MIN_LOG_LEVEL": "3"}
        subprocess.run([sys.executable, "-c", WRITE_IN_A_CHILD, str(out)], env=env, check=True)
        contents.append((out / "train-000-of-001.tfrecord").read_bytes())
    assert contents[0] and contents[0] == contents[1]


def test_shards_are_sized_in_megabytes(shards):
    out, written, _, frame, shard_mb = shards
    val_bytes = int(frame.loc[frame["split"] == "val", "bytes"].sum())
    n_val = shard_count(val_bytes, shard_mb)
    assert written == {
        "train": [f"train-00{i}-of-003.tfrecord" for i in range(3)],
        "val": [f"val-00{i}-of-00{n_val}.tfrecord" for i in range(n_val)],
    }
    sizes = [(out / name).stat().st_size for name in written["train"]]
    largest = frame["bytes"].max() + 200  # an image and its Example's metadata
    assert max(sizes) - min(sizes) <= largest  # filled evenly, within one image


def test_a_huge_shard_size_gives_one_file_and_never_more_files_than_images(tmp_path):
    frame = pd.DataFrame(
        {"path": ["a.png", "b.png"], "label": [0, 1], "patient": ["P1", "P2"], "split": "train"}
    )
    images = {"a.png": png_bytes(8, seed=0), "b.png": png_bytes(8, seed=1)}
    out = tmp_path / "one"
    out.mkdir()
    assert write_shards(frame, images, out, 4096, 0) == {"train": ["train-000-of-001.tfrecord"]}
    out = tmp_path / "tiny"
    out.mkdir()
    assert len(write_shards(frame, images, out, 1e-9, 0)["train"]) == 2


def test_shards_hold_every_image_once_with_metadata(shards):
    out, _, images, _, _ = shards
    x, y, patients, paths = load_arrays(out, "train", 24)
    assert x.shape == (14, 24, 24, 3) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 255.0
    assert sorted(paths) == sorted(p for p in images if int(p.split("img")[1][:-4]) < 14)
    for label, path in zip(y, paths, strict=True):
        assert label == int(path.split("/")[1][1])
    assert set(patients) <= {f"P{i}" for i in range(5)}


def test_binary_batches_are_float_column_labels(shards):
    out, *_ = shards
    ds = make_dataset(out, "train", 16, 4, num_classes=2, training=True, seed=0)
    x, y = next(iter(ds))
    assert tuple(x.shape) == (4, 16, 16, 3)
    assert tuple(y.shape) == (4, 1) and y.dtype.name == "float32"


def test_multiclass_labels_stay_sparse(shards):
    out, *_ = shards
    _, y = next(iter(make_dataset(out, "val", 16, 8, num_classes=4)))
    assert tuple(y.shape) == (6,) and y.dtype.name == "int64"


def test_pipeline_is_deterministic_for_a_seed(shards):
    out, *_ = shards

    def order(seed):
        ds = make_dataset(out, "train", 8, 14, num_classes=2, training=True, seed=seed)
        return np.asarray(next(iter(ds))[0]).reshape(14, -1).sum(1)

    np.testing.assert_allclose(order(3), order(3))
    assert not np.allclose(order(3), order(4))


def test_missing_shards_say_which_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="no test shards"):
        make_dataset(tmp_path, "test", 8, 2, num_classes=2)


def test_limit_caches_a_complete_subset(shards):
    out, *_ = shards
    ds = make_dataset(out, "train", 8, 4, num_classes=2, training=True, seed=0, limit=10)
    epochs = [np.concatenate([np.asarray(x) for x, _ in ds]).reshape(10, -1) for _ in range(2)]
    assert [len(e) for e in epochs] == [10, 10]
    # the same ten images every epoch (reshuffled): a complete cache, not a fresh prefix
    assert sorted(epochs[0].sum(1).round(3)) == sorted(epochs[1].sum(1).round(3))


@pytest.mark.parametrize("cache", ["memory", "none", "disk"])
def test_every_cache_gives_the_same_whole_grey_level_batches(shards, tmp_path, cache):
    out, *_ = shards
    where = str(tmp_path / "cache" / "train") if cache == "disk" else cache
    if cache == "disk":
        (tmp_path / "cache").mkdir()

    def epoch(c):
        ds = make_dataset(out, "train", 8, 5, num_classes=2, training=True, seed=2, cache=c)
        return np.concatenate([np.asarray(x) for x, _ in ds])  # a whole epoch: a complete cache

    first, second = epoch(where), epoch(where)  # the second reads the cache the first wrote
    assert first.dtype == np.float32
    np.testing.assert_array_equal(first, np.round(first))  # uint8 in the cache
    np.testing.assert_array_equal(first, epoch("memory"))
    np.testing.assert_array_equal(second, first)
    if cache == "disk":
        assert any((tmp_path / "cache").iterdir())


def test_stream_split_scores_batch_by_batch_like_the_whole_array(shards):
    out, *_ = shards
    x, y, patients, paths = load_arrays(out, "train", 16)
    calls = []

    def brightness(batch):
        calls.append(len(batch))
        return batch.mean(axis=(1, 2, 3))

    ys, ps, fs, scores = stream_split(out, "train", 16, {"mean": brightness}, batch=4)
    assert calls == [4, 4, 4, 2]  # never more than a batch of images at a time
    np.testing.assert_array_equal(ys, y)
    assert ps == patients and fs == paths
    np.testing.assert_allclose(scores["mean"], x.mean(axis=(1, 2, 3)))


def test_take_images_decodes_only_the_asked_indices_in_the_asked_order(shards):
    out, *_ = shards
    x, *_ = load_arrays(out, "train", 16)
    picks = [9, 0, 13, 9]
    np.testing.assert_array_equal(take_images(out, "train", 16, picks), x[picks])
    assert take_images(out, "train", 16, []).shape == (0, 16, 16, 3)
    with pytest.raises(IndexError, match="no image at index 14"):
        take_images(out, "train", 16, [14])
