"""Predict throughput (images/s) of Keras, Keras with TTA and TFLite int8 on real cells.

    python bench/predict.py [--model models/compact_cnn/model.keras] [--limit 2000]

Why subprocesses: TensorFlow fixes its intra-op thread pool when the runtime starts, so each
Keras setting runs in a fresh worker that calls
`tf.config.threading.set_intra_op_parallelism_threads(n)` (and inter-op 1) before any op; the
TFLite interpreter takes `num_threads` directly but runs in a worker too, so every row is
measured the same way. Images are decoded and resized once, exactly as `medimg predict`
does, and handed to the workers as a .npy file, so the rows measure the model alone; the
decode row is the preprocessing cost per image on one core. Each worker runs one untimed warm-up
batch, then one timed pass over all images in batches of `--batch-size`. The TTA rows score
through `medimg.scoring.probabilities(..., tta=True)`, the path evaluate, predict and serving
share (the mean over 8 flips/rotations), so they show what `evaluate.tta=true` costs.

Without `--model`, `models/compact_cnn/model.keras` is used when the train stage left one,
else a freshly built, untrained compact_cnn (same graph and cost, meaningless outputs); the
output says which. Without the dev zip the benchmark prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDIMG_SHARED_DATA", REPO.parent / "shared" / "data"))
DEFAULT_ZIP = SHARED / "malaria" / "cell_images_dev.zip"
DEFAULT_MODEL = REPO / "models" / "compact_cnn" / "model.keras"
CALIBRATION_IMAGES = 100


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="a .keras file (see above)")
    p.add_argument("--zip", type=Path, default=DEFAULT_ZIP, help="default: %(default)s")
    p.add_argument("--limit", type=int, default=None, help="use at most N cells (all: 6000)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", default="1,2", help="comma-separated (default: %(default)s)")
    p.add_argument("--worker", choices=("keras", "keras-tta", "tflite"), help=argparse.SUPPRESS)
    p.add_argument("--images", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--model-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--n-threads", type=int, default=1, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------ worker


def timed_pass(predict, images: np.ndarray, batch_size: int) -> float:
    """images/s of one pass over `images` after one untimed warm-up batch."""
    predict(images[:batch_size])
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        predict(images[i : i + batch_size])
    return len(images) / (time.perf_counter() - start)


def worker(args: argparse.Namespace) -> None:
    images = np.load(args.images)
    if args.worker in ("keras", "keras-tta"):
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.n_threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        from medimg.models.loading import load_model
        from medimg.scoring import probabilities

        model = load_model(args.model_file)
        tta = args.worker == "keras-tta"
        rate = timed_pass(lambda x: probabilities(model, x, tta=tta), images, args.batch_size)
    else:
        from medimg.analysis.edge import TFLiteModel

        lite = TFLiteModel(args.model_file.read_bytes(), threads=args.n_threads)
        rate = timed_pass(lambda x: lite.predict(x, batch_size=len(x)), images, args.batch_size)
    print(json.dumps({"images_per_s": rate}))


# ------------------------------------------------------------------------------------ parent


def read_cells(path: Path, limit: int | None) -> list[bytes]:
    """The zip's PNGs; with a limit, an even stride so both classes stay represented."""
    with zipfile.ZipFile(path) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith(".png"))
        if limit and limit < len(names):
            names = [names[i] for i in np.linspace(0, len(names) - 1, limit).round().astype(int)]
        return [zf.read(n) for n in names]


def load_or_build(model_path: Path | None, tmp: Path) -> tuple[Path, str]:
    """(a .keras file, how it was chosen), see the module docstring."""
    if model_path is not None:
        return model_path, str(model_path)
    if DEFAULT_MODEL.exists():
        return DEFAULT_MODEL, f"{DEFAULT_MODEL.relative_to(REPO)} (trained)"
    from medimg.models import build_model

    path = tmp / "compact_cnn_untrained.keras"
    build_model("compact_cnn", (64, 64, 3), 2).save(path)
    return path, "compact_cnn, freshly built and UNTRAINED (no models/compact_cnn/model.keras)"


def decode_all(cells: list[bytes], size: int) -> tuple[np.ndarray, float]:
    from medimg.data.images import decode_image, resize_batch

    start = time.perf_counter()
    images = resize_batch([decode_image(c, f"cell {i}") for i, c in enumerate(cells)], size)
    return images, len(cells) / (time.perf_counter() - start)


def run_worker(kind: str, threads: int, images: Path, model: Path, batch: int) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--n-threads",
        str(threads),
        "--images",
        str(images),
        "--model-file",
        str(model),
        "--batch-size",
        str(batch),
    ]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{kind} worker ({threads} threads) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]


def table(rows: list[tuple[str, str, str, float]], n: int) -> str:
    head = (
        f"{'engine':<14} {'threads':>7} {'images':>7} {'batch':>5} {'images/s':>9} {'ms/image':>8}"
    )
    lines = [head]
    for engine, threads, batch, rate in rows:
        lines.append(
            f"{engine:<14} {threads:>7} {n:>7} {batch:>5} {rate:>9.1f} {1000 / rate:>8.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if not args.zip.exists():
        print(f"skip: real data not available: {args.zip}")
        return None
    threads = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory(prefix="medimg-bench-") as tmp_name:
        tmp = Path(tmp_name)
        model_file, origin = load_or_build(args.model, tmp)
        from medimg.analysis.edge import to_tflite
        from medimg.models.loading import load_model
        from medimg.scoring import model_size

        model = load_model(model_file)
        size = model_size(model)
        images, decode_rate = decode_all(read_cells(args.zip, args.limit), size)
        np.save(tmp / "images.npy", images)
        int8 = tmp / "model_int8.tflite"
        int8.write_bytes(to_tflite(model, "int8", representative=images[:CALIBRATION_IMAGES]))
        rows = [("decode+resize", "1", "-", decode_rate)]
        batch, npy = args.batch_size, tmp / "images.npy"
        engines = (
            ("keras", "keras", model_file),
            ("keras + TTA", "keras-tta", model_file),
            ("tflite int8", "tflite", int8),
        )
        for engine, kind, file in engines:
            for n in threads:
                rows.append((engine, str(n), str(batch), run_worker(kind, n, npy, file, batch)))
    print(f"model: {origin}, input {size}x{size}; data: {args.zip.name}; cpus: {os.cpu_count()}")
    print(table(rows, len(images)))
    return None


if __name__ == "__main__":
    main()
