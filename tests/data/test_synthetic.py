"""The offline NIH-like generator: layout, names, patients, determinism and a visible signal."""

from __future__ import annotations

import io
import re
import zipfile
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from medimg.config import NIH_PATIENT_REGEX, SyntheticConfig
from medimg.data.synthetic import PatientStyle, generate, render_cell

SMALL = SyntheticConfig(patients=8, cells_per_patient=(4, 6), size_range=(60, 90))


@pytest.fixture(scope="module")
def small_zip(tmp_path_factory):
    dest = tmp_path_factory.mktemp("synth") / "images.zip"
    return dest, generate(dest, SMALL, seed=3)


def _members(path):
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist() if not n.endswith("/")}


def test_layout_and_names_follow_the_nih_archive(small_zip):
    dest, summary = small_zip
    members = _members(dest)
    assert {n.split("/")[1] for n in members} == {"Parasitized", "Uninfected"}
    name = re.compile(
        r"^cell_images/(Parasitized|Uninfected)/C\d+P\d+thinF_IMG_\d{8}_\d+_cell_\d+\.png$"
    )
    assert all(name.match(n) for n in members), next(n for n in members if not name.match(n))
    assert summary["images"] == len(members)
    per_class = {c: sum(n.split("/")[1] == c for n in members) for c in summary["per_class"]}
    assert summary["per_class"] == per_class
    assert summary["patients"] == SMALL.patients


def test_healthy_patients_have_only_uninfected_cells(small_zip):
    classes = defaultdict(set)
    for n in _members(small_zip[0]):
        patient = re.match(NIH_PATIENT_REGEX, n.split("/")[-1]).group(1)
        classes[patient].add(n.split("/")[1])
    healthy = [p for p, c in classes.items() if c == {"Uninfected"}]
    assert len(healthy) == small_zip[1]["healthy_patients"] >= 1
    infected = [c for c in classes.values() if c != {"Uninfected"}]
    assert infected and all(c == {"Parasitized", "Uninfected"} for c in infected)
    assert len(classes) == small_zip[1]["patients"]


def test_same_seed_same_bytes_other_seed_other_data(small_zip, tmp_path):
    again = tmp_path / "again.zip"
    generate(again, SMALL, seed=3)
    assert again.read_bytes() == small_zip[0].read_bytes()
    other = tmp_path / "other.zip"
    generate(other, SMALL, seed=4)
    assert other.read_bytes() != small_zip[0].read_bytes()


def test_images_are_rgb_cells_on_black_within_the_size_range(small_zip):
    for data in list(_members(small_zip[0]).values())[:20]:
        img = Image.open(io.BytesIO(data))
        assert img.mode == "RGB"
        assert all(SMALL.size_range[0] <= s <= SMALL.size_range[1] for s in img.size)
        arr = np.asarray(img)
        assert arr[0, 0].max() < 10 and arr[-1, -1].max() < 10  # segmented: black corners
        assert arr[arr.shape[0] // 2, arr.shape[1] // 2].mean() > 80  # a lit cell in the middle


def _dark_purple_share(img: np.ndarray) -> float:
    r, g, b = (img[..., i].astype(float) for i in range(3))
    return float(np.mean((b > g + 25) & (r + g + b < 330) & (r + g + b > 30)))


def test_parasitized_cells_carry_more_dark_purple_chromatin():
    rng = np.random.default_rng(0)
    style = PatientStyle.sample(rng, confuser_fraction=0.3)
    infected = [_dark_purple_share(render_cell(rng, style, True, 100)) for _ in range(40)]
    healthy = [_dark_purple_share(render_cell(rng, style, False, 100)) for _ in range(40)]
    assert np.mean(infected) > 2 * np.mean(healthy)
