"""The zoo's training step on an accelerator: images/s per architecture at its recipe size.

    KERAS_BACKEND=jax python bench/gpu.py [--archs compact_cnn,resnet_mini] [--batch 64]
                                          [--steps 30] [--precision mixed_float16]

Keras 3 only (no TensorFlow needed): the models are `medimg.models`, written with `keras`
and `keras.ops`, so this runs on the JAX backend of a GPU machine as on TensorFlow here. Data
are in-memory random uint8 images (the input pipeline is bench/input_pipeline.py's job), so
the figure is the model's own step: forward, backward and the optimizer, mixed precision on a
GPU. Each model gets one untimed warm-up call (compilation), then `--steps` timed
`train_on_batch` calls; the table prints the median step.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def devices() -> str:
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return ", ".join(sorted({d.device_kind for d in jax.devices()}))
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return f"{len(gpus)} GPU" if gpus else f"CPU ({os.cpu_count()} cores)"


def time_arch(arch: str, batch: int, steps: int) -> dict:
    import keras

    from medimg.models import build_model, get_spec

    spec = get_spec(arch)
    size = spec.default_size
    keras.utils.set_random_seed(0)
    model = build_model(arch, (size, size, 3), 2)
    model.compile(keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8).astype("float32")
    y = rng.integers(0, 2, (batch, 1)).astype("float32")
    t0 = time.perf_counter()
    model.train_on_batch(x, y)  # compilation / tracing, not timed
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model.train_on_batch(x, y)
        float(np.asarray(loss))  # wait for the device
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    return {
        "arch": arch,
        "size": size,
        "params": model.count_params(),
        "batch": batch,
        "step_ms": step * 1000,
        "images_per_s": batch / step,
        "compile_s": compile_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=None, help="comma list (default: the whole zoo)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--precision", default=None, help="default: mixed_float16 on a GPU")
    args = ap.parse_args()
    import keras

    from medimg.models import list_models

    where = devices()
    on_gpu = "CPU" not in where and where != "cpu"
    precision = args.precision or ("mixed_float16" if on_gpu else "float32")
    keras.mixed_precision.set_global_policy(precision)
    archs = args.archs.split(",") if args.archs else [a for a in list_models() if a != "tiny"]
    rows = [time_arch(a, args.batch, args.steps) for a in archs]
    print(
        f"\nKeras {keras.__version__} on {keras.backend.backend()}, {where}, {precision}, "
        f"batch {args.batch}, median of {args.steps} steps ({platform.node()})"
    )
    print("| architecture | px | params | step ms | images/s | first call s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['arch']} | {r['size']} | {r['params']:,} | {r['step_ms']:.1f} "
            f"| {r['images_per_s']:,.0f} | {r['compile_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
