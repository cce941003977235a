"""Shared fixtures: tiny synthetic image trees built in tmp_path, and the real data in ../shared."""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDIMG_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def shared_file(rel: str) -> Path:
    """Path to a real data file in ../shared/data, or skip the test cleanly when absent."""
    path = SHARED_DATA / rel
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


def png_bytes(size: int = 32, mode: str = "RGB", seed: int = 0, fmt: str = "PNG") -> bytes:
    """A small decodable image whose pixels differ by seed (so sha256 differs too)."""
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        arr = rng.integers(0, 65535, (size, size), dtype=np.uint16)
        img = Image.fromarray(arr)
    else:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        arr = rng.integers(0, 255, (size, size, channels), dtype=np.uint8)
        img = Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode=mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def nih_name(patient: int, k: int) -> str:
    return f"C{patient}P{patient + 60}thinF_IMG_20150604_12{k:04d}_cell_{k}.png"


def make_nih_tree(
    root: Path,
    per_class: int = 12,
    patients: int = 6,
    classes: tuple[str, ...] = ("Parasitized", "Uninfected"),
    size: int = 32,
) -> Path:
    """An NIH-layout folder `root/cell_images/<class>/C<p>P..._cell_<k>.png` with unique images."""
    base = root / "cell_images"
    seed = 0
    for cls in classes:
        d = base / cls
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            seed += 1
            (d / nih_name(100 + k % patients, seed)).write_bytes(png_bytes(size, seed=seed))
    return root


def zip_tree(root: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(root).as_posix())
    return dest


@pytest.fixture
def nih_zip(tmp_path: Path) -> Path:
    """A small valid NIH-layout zip: 2 classes x 12 images, 6 patients."""
    return zip_tree(make_nih_tree(tmp_path / "src"), tmp_path / "cell_images.zip")
