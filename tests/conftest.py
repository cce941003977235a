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


@pytest.fixture(autouse=True)
def _no_tracking_uri_leaks():
    """`mlflow.set_tracking_uri` exports MLFLOW_TRACKING_URI, which medimg honours over
    params.yaml: a test that calls it must not point the next test (or its subprocesses) at
    its store."""
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


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


def tmp_params_dict(tmp_path: Path, **sections: dict) -> dict:
    """A params mapping whose every path and the MLflow store live in tmp_path."""
    rel = {
        "raw": "data/raw",
        "validated": "data/validated",
        "split": "data/split",
        "models": "models",
        "reports": "reports",
        "gx": "gx",
        "mlruns": "mlruns",
    }
    base: dict = {
        "paths": {k: str(tmp_path / v) for k, v in rel.items()},
        "mlflow": {
            "tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db",
            "artifact_root": str(tmp_path / "mlruns" / "artifacts"),
        },
        "train": {"architectures": ["tiny"], "epochs": 1, "batch_size": 8},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return base


def tiny_params(tmp_path: Path, **sections):
    """`tmp_params_dict` as a validated Params."""
    from medimg.config import parse_params

    return parse_params(tmp_params_dict(tmp_path, **sections))


def planted_image(label: int, rng: np.random.Generator, size: int = 32) -> bytes:
    """Dark noise; label 1 adds a bright square, so even a tiny model can learn it."""
    arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
    if label:
        y, x = rng.integers(2, size - 10, 2)
        arr[y : y + 8, x : x + 8] = 230
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_split_dir(params, per_split=(48, 16, 16), classes=("Uninfected", "Parasitized")) -> dict:
    """Shards + split.parquet + classes.json as the split stage leaves them, for train tests."""
    import pandas as pd

    from medimg.data.shards import write_shards
    from medimg.io import write_json
    from medimg.split import fingerprint, summarise

    rng = np.random.default_rng(0)
    rows, images = [], {}
    for split, n in zip(("train", "val", "test"), per_split, strict=True):
        for i in range(n):
            label = i % len(classes)
            path = f"cell_images/{classes[label]}/C{i % 7}P1thinF_{split}_{i}.png"
            images[path] = planted_image(label, rng)
            patient = f"{split}{i % 7}"
            rows.append(
                {
                    "path": path,
                    "label": label,
                    "class": classes[label],
                    "patient": patient,
                    "split": split,
                    "sha256": path,
                }
            )
    frame = pd.DataFrame(rows)
    out = params.paths.split_manifest.parent
    out.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(params.paths.split_manifest)
    write_shards(frame, images, out, 0.02, 0)  # ~20 KB shards: a few per split
    summary = summarise(frame, list(classes), fingerprint(frame))
    write_json(params.paths.classes_json, summary)
    return summary


def load_arrays(split_dir, split: str, image_size: int):
    """The whole split in memory: images (N,S,S,3) float32 0-255, labels, patients and paths."""
    from medimg.data.shards import stream_split

    y, patients, paths, out = stream_split(split_dir, split, image_size, {"x": lambda x: x})
    if len(y) == 0:
        return np.zeros((0, image_size, image_size, 3), np.float32), y, [], []
    return out["x"], y, patients, paths


@pytest.fixture
def split_params(tmp_path: Path):
    """Params with a ready split (80 planted 32-px images) for the train/evaluate tests."""
    params = tiny_params(tmp_path)
    write_split_dir(params)
    return params


def pytest_collection_modifyitems(config, items) -> None:
    """Longest first: the end-to-end repro (~3 min) starts at once on one xdist worker while
    the other takes the unit tests; collected in path order, it would start half-way."""
    items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


def bomb_png(width: int = 12_000, height: int = 12_000) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's calling card),
    made from a 1x1 image by rewriting IHDR and its CRC: bytes, not a 144-Mpixel allocation."""
    import struct
    import zlib

    data = bytearray(png_bytes(1, mode="L"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


def log_candidate(params, arch: str, correct: np.ndarray) -> str:
    """A candidate as train + evaluate leave it, without training: an MLflow run (on the store
    `tracking.configure` picks, env first) holding a tiny pyfunc and the predictions CSV, and
    reports/eval/<arch>/summary.json + run.json. `correct`: which test image it got right."""
    import mlflow
    import pandas as pd

    from medimg import tracking
    from medimg.io import write_json

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
            return model_input

    paths, accuracy = params.paths, float(correct.mean())
    summary = {
        "accuracy": accuracy,
        "sensitivity": accuracy,
        "specificity": accuracy,
        "roc_auc": 0.9,
        "ece": 0.05,
        "accuracy_ci": [max(accuracy - 0.02, 0.0), min(accuracy + 0.02, 1.0)],
        "params": 1000,
        "keras_bytes": 50_000,
    }
    reports = paths.eval_reports(arch)
    reports.mkdir(parents=True, exist_ok=True)
    write_json(reports / "summary.json", summary)
    names = [f"img{i}.png" for i in range(len(correct))]
    paths.eval_predictions(arch).write_text(
        pd.DataFrame({"path": names, "correct": correct}).to_csv(index=False)
    )
    tracking.configure(params.mlflow, params.dataset.name)
    with tracking.run(run_name=arch) as run_id:
        info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=[])
        tracking.log_artifact(paths.eval_predictions(arch), "eval")
    write_json(reports / "run.json", {"run_id": run_id, "model_uri": info.model_uri})
    return run_id
