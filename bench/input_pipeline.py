"""Input pipeline and model-zoo benchmarks on the 6,000 real NIH cells in ../shared.

Three tables:
1. images/s of our tf.data pipeline (+ the same augmentation, as a Keras layer) against the seeds'
   `ImageDataGenerator.flow_from_directory` on the same PNGs (goal ≥10×);
2. `fit` images/s through the pipeline ÷ `fit` on the same images as in-memory tensors, per
   default architecture (goal ≥0.9: the input is never the bottleneck);
3. parameters, `.keras` size and CPU inference images/s of every registered architecture.

    python bench/input_pipeline.py [--zip ../shared/data/malaria/cell_images_dev.zip]
                                   [--size 64] [--limit 2000] [--skip-zoo]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEV_ZIP = REPO.parent / "shared" / "data" / "malaria" / "cell_images_dev.zip"


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))


def prepare(zip_path: Path, work: Path, limit: int):
    """Our data stages on the real zip (patient split), plus the PNGs as class folders."""
    from medimg.config import parse_params
    from medimg.download import run as download
    from medimg.split import run as split
    from medimg.validate import run as validate

    paths = {k: str(work / k) for k in ("raw", "validated", "split", "reports", "gx")}
    params = parse_params(
        {
            "dataset": {"source": "local", "path": str(zip_path)},
            "validate": {"patient_regex": r"^(C\d+)"},
            "paths": paths,
        }
    )
    for stage in (download, validate, split):
        stage(params)
    folder = work / "png"
    with zipfile.ZipFile(zip_path) as zf:
        names = [n for n in zf.namelist() if n.endswith(".png")]
        names = names[:: max(1, len(names) // limit)][:limit]  # both classes, not the first
        for n in names:
            dest = folder / Path(n).parent.name / Path(n).name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(zf.read(n))
    return params, folder, len(names)


def epoch_rate(make_iter, epochs: int = 1) -> float:
    """Best images/s over whole epochs: a partial epoch would never complete tf.data's cache."""
    best = 0.0
    for _ in range(epochs):
        t0 = time.perf_counter()
        seen = sum(len(batch[0]) for batch in make_iter())
        best = max(best, seen / (time.perf_counter() - t0))
    return best


def pipeline_vs_generator(params, folder: Path, n: int, size: int) -> list[list[str]]:
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    from medimg.data.shards import AUTOTUNE, make_dataset
    from medimg.models.augment import build_augmenter

    aug = build_augmenter(params.train.augment, 0)
    ds = make_dataset(params.paths.split, "train", size, 32, num_classes=2, training=True, limit=n)
    augmented = ds.map(lambda x, y: (aug(x, training=True), y), num_parallel_calls=AUTOTUNE)
    first = epoch_rate(lambda: augmented)  # decode + resize + cache fill + augmentation
    on_cpu = epoch_rate(lambda: augmented, epochs=3)
    to_model = epoch_rate(lambda: ds, epochs=3)
    gen = ImageDataGenerator(
        rescale=1 / 255,
        rotation_range=20,
        zoom_range=0.05,
        width_shift_range=0.05,
        height_shift_range=0.05,
        shear_range=0.05,
        horizontal_flip=True,
        vertical_flip=True,
        fill_mode="nearest",
    )
    flow = gen.flow_from_directory(
        str(folder), target_size=(size, size), batch_size=32, class_mode="binary", seed=0
    )
    base = epoch_rate(lambda: (flow[i] for i in range(len(flow))), epochs=2)
    return [
        ["ImageDataGenerator.flow_from_directory (PNG decode + augment)", base, 1.0],
        ["medimg 1st epoch: decode + resize + cache + augment on CPU", first, first / base],
        [
            "medimg cached epochs + augment on CPU (same work as the baseline)",
            on_cpu,
            on_cpu / base,
        ],
        [
            "medimg cached epochs, augment in the model's graph (accelerator)",
            to_model,
            to_model / base,
        ],
    ]


def fit_ratio(params, arch: str, size: int, limit: int, rounds: int = 5) -> list[str]:
    """Median images/s per epoch through each input, epochs interleaved.

    This CPU's speed drifts by ±30% over a minute (shared host), so timing one input after the
    other measures the drift; alternating epochs and taking medians cancels it.
    """
    from medimg.data.shards import make_dataset, stream_split
    from medimg.models import build_model
    from medimg.models.augment import build_augmenter, with_augmentation

    n = limit // 32 * 32  # whole batches on both sides
    y, _, _, out = stream_split(params.paths.split, "train", size, {"x": lambda x: x})
    x, y = out["x"][:n], y[:n].astype("float32")
    ds = make_dataset(params.paths.split, "train", size, 32, num_classes=2, training=True, limit=n)
    inputs = {
        "pipeline": (ds, {}),
        "memory": (x, {"y": y, "batch_size": 32, "shuffle": True}),
    }
    models, rates = {}, {k: [] for k in inputs}
    for name, (data, kw) in inputs.items():
        models[name] = with_augmentation(
            build_model(arch, (size, size, 3), 2), build_augmenter(params.train.augment, 0)
        )
        models[name].compile("adam", "binary_crossentropy")
        models[name].fit(data, epochs=1, verbose=0, **kw)  # warm-up: tracing, cache fill
    for _ in range(rounds):
        for name, (data, kw) in inputs.items():
            t0 = time.perf_counter()
            models[name].fit(data, epochs=1, verbose=0, **kw)
            rates[name].append(len(x) / (time.perf_counter() - t0))
    piped, memory = (float(np.median(rates[k])) for k in inputs)
    return [arch, f"{piped:,.0f}", f"{memory:,.0f}", f"{piped / memory:.2f}"]


def zoo_row(arch: str, work: Path) -> list[str]:
    from medimg.analysis.edge import images_per_second
    from medimg.models import build_model, get_spec

    size = get_spec(arch).default_size
    model = build_model(arch, (size, size, 3), 2)
    path = work / f"{arch}.keras"
    model.save(path)
    x = np.random.default_rng(0).uniform(0, 255, (32, size, size, 3)).astype("float32")
    ips = images_per_second(model.predict_on_batch, x, batch_size=32, min_seconds=2.0)
    return [
        arch,
        str(size),
        f"{model.count_params():,}",
        f"{path.stat().st_size / 1e6:.2f}",
        f"{ips:,.0f}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zip", type=Path, default=DEV_ZIP)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--limit", type=int, default=2000, help="images per timing")
    ap.add_argument("--skip-zoo", action="store_true")
    args = ap.parse_args()
    if not args.zip.exists():
        print(f"skip: {args.zip} not found (the real cells live in ../shared/data)")
        return
    from medimg.config import load_params

    defaults = load_params(REPO / "params.yaml").train.architectures
    print(f"keras {keras.__version__} backend {keras.backend.backend()}, {os.cpu_count()} CPU")
    with tempfile.TemporaryDirectory() as tmp:
        params, folder, n = prepare(args.zip, Path(tmp), args.limit)
        rows = [
            [name, f"{ips:,.0f}", f"{x:.1f}×"]
            for name, ips, x in pipeline_vs_generator(params, folder, n, args.size)
        ]
        table(
            f"1. input pipeline, {n} real cells at {args.size}px, batch 32, "
            "same augmentation (goal ≥10×)",
            ["pipeline", "images/s", "speed-up"],
            rows,
        )
        rows = [fit_ratio(params, a, args.size, args.limit) for a in defaults]
        table(
            f"2. fit images/s at {args.size}px, median of 5 interleaved epochs: "
            "tf.data pipeline vs in-memory tensors (goal ≥0.9)",
            ["architecture", "pipeline", "in-memory", "ratio"],
            rows,
        )
        if not args.skip_zoo:
            from medimg.models import list_models

            rows = [zoo_row(a, Path(tmp)) for a in list_models()]
            table(
                "3. model zoo at each recipe's size: params, .keras size, CPU inference (batch 32)",
                ["architecture", "px", "params", ".keras MB", "images/s"],
                rows,
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
