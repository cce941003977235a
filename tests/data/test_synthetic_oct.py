"""The offline OCT2017-like generator: layout, patients, JPEG format, determinism, class signal."""

from __future__ import annotations

import io
import re
import tracemalloc
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from medimg.config import OctSyntheticConfig, ValidateConfig, load_params
from medimg.data.synthetic_oct import CLASSES, ScanStyle, generate, render_scan

REPO = Path(__file__).resolve().parents[2]
SMALL = OctSyntheticConfig(
    patients=8, images_per_patient=(2, 3), width_choices=(160, 192), height=128
)
NAME = re.compile(r"^OCT2017/(CNV|DME|DRUSEN|NORMAL)/\1-\d{7}-\d+\.jpeg$")


@pytest.fixture(scope="module")
def small_zip(tmp_path_factory):
    dest = tmp_path_factory.mktemp("oct") / "oct.zip"
    return dest, generate(dest, SMALL, seed=5)


def _members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist() if not n.endswith("/")}


def test_layout_names_and_summary(small_zip):
    dest, summary = small_zip
    members = _members(dest)
    assert all(NAME.match(n) for n in members), next(n for n in members if not NAME.match(n))
    per_class = {c: sum(n.split("/")[1] == c for n in members) for c in CLASSES}
    assert summary["per_class"] == per_class and all(per_class.values())
    assert summary["images"] == len(members)
    assert summary["patients"] == SMALL.patients
    assert summary["patients_per_class"] == dict.fromkeys(CLASSES, 2)
    assert summary["bytes"] == dest.stat().st_size


def test_names_parse_to_one_class_patients(small_zip):
    """The project's OCT patient pattern finds every patient, each with 2-3 scans of one class."""
    pattern = re.compile(ValidateConfig().patient_pattern("oct2017"))
    classes, counts = defaultdict(set), defaultdict(int)
    for name in _members(small_zip[0]):
        match = pattern.search(name.split("/")[-1])
        assert match, name
        classes[match.group(1)].add(name.split("/")[1])
        counts[match.group(1)] += 1
    assert len(classes) == SMALL.patients
    assert all(len(c) == 1 for c in classes.values())
    assert all(2 <= n <= 3 for n in counts.values())


def test_images_are_grayscale_jpeg_of_the_configured_size(small_zip):
    widths = set()
    for data in _members(small_zip[0]).values():
        with Image.open(io.BytesIO(data)) as img:
            assert (img.format, img.mode, img.height) == ("JPEG", "L", SMALL.height)
            widths.add(img.width)
            img.load()
    assert widths <= set(SMALL.width_choices)


def test_same_seed_same_bytes_other_seed_other_data(small_zip, tmp_path):
    again, other = tmp_path / "again.zip", tmp_path / "other.zip"
    generate(again, SMALL, seed=5)
    generate(other, SMALL, seed=6)
    assert again.read_bytes() == small_zip[0].read_bytes()
    assert other.read_bytes() != small_zip[0].read_bytes()


def _scans(cls: str, n: int = 10) -> list[np.ndarray]:
    rng = np.random.default_rng(11)  # same styles and eye shapes for every class
    styles = [ScanStyle.sample(rng) for _ in range(n)]
    return [render_scan(np.random.default_rng(i), cls, s, 512, 496) for i, s in enumerate(styles)]


def _rpe_rows(img: np.ndarray) -> np.ndarray:
    """Row of the brightest (RPE) pixel in each column of a lightly blurred scan."""
    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.BoxBlur(2)), dtype=np.float32)
    return blurred[:-40].argmax(axis=0)  # skip a possible white wedge at the bottom


def _dark_in_retina(img: np.ndarray) -> float:
    """Share of near-background pixels in the 60 rows above the RPE: fluid, not tissue."""
    blurred = np.asarray(Image.fromarray(img).filter(ImageFilter.BoxBlur(2)), dtype=np.float32)
    rpe = _rpe_rows(img)
    floor = np.median(blurred[20:60])  # vitreous
    rows = rpe[None, :] - np.arange(8, 60)[:, None]
    band = np.take_along_axis(blurred, np.clip(rows, 0, None), axis=0)
    return float((band < 1.15 * floor).mean())


def _rpe_bumps(img: np.ndarray) -> float:
    """How far the RPE line strays from a smooth curve: drusen and CNV lift it locally."""
    rows = _rpe_rows(img).astype(float)
    x = np.arange(len(rows))
    fit = np.polyval(np.polyfit(x, rows, 4), x)
    return float(np.percentile(fit - rows, 97))


def test_class_structures_differ_measurably():
    normal, dme, drusen, cnv = (_scans(c) for c in ("NORMAL", "DME", "DRUSEN", "CNV"))
    dark = {k: np.mean([_dark_in_retina(i) for i in v]) for k, v in [("N", normal), ("D", dme)]}
    assert dark["D"] > 1.3 * dark["N"] + 0.005, dark
    bumps = {k: np.mean([_rpe_bumps(i) for i in v]) for k, v in [("N", normal), ("Dr", drusen)]}
    bumps["C"] = np.mean([_rpe_bumps(i) for i in cnv])
    assert bumps["Dr"] > bumps["N"] + 5 and bumps["C"] > bumps["N"] + 10, bumps


def test_unknown_class_is_refused():
    with pytest.raises(ValueError, match="unknown OCT class"):
        render_scan(
            np.random.default_rng(0), "AMD", ScanStyle.sample(np.random.default_rng(0)), 64, 64
        )


def test_memory_does_not_grow_with_the_number_of_images(tmp_path):
    """Streaming: peak traced memory for 4x the scans stays about the same."""

    def peak(patients: int) -> int:
        cfg = SMALL.model_copy(update={"patients": patients, "images_per_patient": (3, 3)})
        tracemalloc.start()
        generate(tmp_path / f"{patients}.zip", cfg, seed=1)
        size = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return size

    assert peak(16) < 1.3 * peak(4) + 200_000


def test_config_bounds_and_params_defaults():
    with pytest.raises(ValueError, match="images_per_patient"):
        OctSyntheticConfig(images_per_patient=(5, 2))
    with pytest.raises(ValueError):
        OctSyntheticConfig(patients=3)
    assert load_params(REPO / "params.yaml").dataset.synthetic_oct == OctSyntheticConfig()
