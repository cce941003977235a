from __future__ import annotations

import numpy as np
import pytest

from medimg.analysis.slice_eval import (
    evaluate_slices,
    slices_csv_path,
    split_properties,
    write_slices,
)
from medimg.io import read_json
from tests.conftest import tiny_params, write_split_dir


@pytest.fixture
def split(tmp_path):
    params = tiny_params(tmp_path, evaluate={"slices": {"min_images": 1, "min_patients": 1}})
    write_split_dir(params, per_split=(4, 12, 16))
    return params


def test_properties_come_from_the_original_pixels_of_every_test_image(split):
    from medimg.data.shards import stream_split

    props = split_properties(split.paths.split, "test")
    _, _, paths, _ = stream_split(split.paths.split, "test", 8, {})  # evaluate's resize: 8 px
    assert sorted(props["path"]) == sorted(paths) and len(paths) == 16
    assert set(props["height"]) == {32.0} and set(props["size"]) == {32.0 * 32.0}  # not 8
    parasitized = props["path"].str.contains("Parasitized")  # planted bright squares
    assert props["brightness"][parasitized].min() > props["brightness"][~parasitized].max()


def test_binary_slices_are_judged_at_the_served_threshold(split, tmp_path):
    from medimg.data.shards import stream_split

    y, patients, paths, _ = stream_split(split.paths.split, "test", 8, {})
    _, val_patients, _, _ = stream_split(split.paths.split, "val", 8, {})
    scored = {"y": y, "patients": patients, "paths": paths, "val_patients": val_patients}
    probs = np.full(len(y), 0.3)
    classes = ["Uninfected", "Parasitized"]
    cfg = split.evaluate
    at_low = evaluate_slices(split.paths.split, scored, probs, classes, 0.25, cfg, 0)
    at_half = evaluate_slices(split.paths.split, scored, probs, classes, 0.5, cfg, 0)
    low = {s["name"]: s for s in at_low["slices"]}
    half = {s["name"]: s for s in at_half["slices"]}
    assert at_low["threshold"] == 0.25
    assert low["class.Parasitized"]["metrics"]["sensitivity"] == 1.0  # 0.3 >= 0.25: called
    assert half["class.Parasitized"]["metrics"]["sensitivity"] == 0.0
    assert {"brightness.low", "brightness.high"} <= set(low)

    out = tmp_path / "eval" / "tiny"
    out.mkdir(parents=True)
    write_slices(out, slices_csv_path(out), at_low)
    assert read_json(out / "slices.json") == at_low
    assert slices_csv_path(out).read_text().startswith("slice,accuracy,images,patients")
    assert slices_csv_path(out).name == "tiny.slices.csv"
    off = split.evaluate.model_copy(
        update={"slices": cfg.slices.model_copy(update={"enabled": False})}
    )
    assert evaluate_slices(split.paths.split, scored, probs, classes, 0.5, off, 0) is None
