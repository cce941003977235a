from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from medimg.data.shards import load_arrays, make_dataset, write_shards
from tests.conftest import png_bytes


@pytest.fixture
def shards(tmp_path):
    rows, images = [], {}
    for i in range(20):
        split = "train" if i < 14 else "val"
        path = f"cell_images/c{i % 2}/img{i}.png"
        mode = "L" if i == 3 else "RGB"  # a 1-channel image must come out as RGB
        images[path] = png_bytes(20 + i, mode=mode, seed=i)
        rows.append({"path": path, "label": i % 2, "patient": f"P{i // 4}", "split": split})
    written = write_shards(pd.DataFrame(rows), images, tmp_path, shards=3, seed=1)
    return tmp_path, written, images


def test_shards_hold_every_image_once_with_metadata(shards):
    out, written, images = shards
    assert written == {
        "train": [f"train-00{i}-of-003.tfrecord" for i in range(3)],
        "val": [f"val-00{i}-of-003.tfrecord" for i in range(3)],
    }
    x, y, patients, paths = load_arrays(out, "train", 24)
    assert x.shape == (14, 24, 24, 3) and x.dtype == np.float32
    assert x.min() >= 0.0 and x.max() <= 255.0
    assert sorted(paths) == sorted(p for p in images if int(p.split("img")[1][:-4]) < 14)
    for label, path in zip(y, paths, strict=True):
        assert label == int(path.split("/")[1][1])
    assert set(patients) <= {f"P{i}" for i in range(5)}


def test_binary_batches_are_float_column_labels(shards):
    out, _, _ = shards
    ds = make_dataset(out, "train", 16, 4, num_classes=2, training=True, seed=0)
    x, y = next(iter(ds))
    assert tuple(x.shape) == (4, 16, 16, 3)
    assert tuple(y.shape) == (4, 1) and y.dtype.name == "float32"


def test_multiclass_labels_stay_sparse(shards):
    out, _, _ = shards
    _, y = next(iter(make_dataset(out, "val", 16, 8, num_classes=4)))
    assert tuple(y.shape) == (6,) and y.dtype.name == "int64"


def test_pipeline_is_deterministic_for_a_seed(shards):
    out, _, _ = shards

    def order(seed):
        ds = make_dataset(out, "train", 8, 14, num_classes=2, training=True, seed=seed)
        return np.asarray(next(iter(ds))[0]).reshape(14, -1).sum(1)

    np.testing.assert_allclose(order(3), order(3))
    assert not np.allclose(order(3), order(4))


def test_missing_shards_say_which_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="no test shards"):
        make_dataset(tmp_path, "test", 8, 2, num_classes=2)


def test_limit_caches_a_complete_subset(shards):
    out, _, _ = shards
    ds = make_dataset(out, "train", 8, 4, num_classes=2, training=True, seed=0, limit=10)
    epochs = [np.concatenate([np.asarray(x) for x, _ in ds]).reshape(10, -1) for _ in range(2)]
    assert [len(e) for e in epochs] == [10, 10]
    # the same ten images every epoch (reshuffled): a complete cache, not a fresh prefix
    assert sorted(epochs[0].sum(1).round(3)) == sorted(epochs[1].sum(1).round(3))
