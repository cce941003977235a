"""How fast is the OCT2017-like generator? Renders, encodes and zips scans, prints images/s.

`generate` must stay cheap enough that the synthetic OCT dataset is never the slow stage:
the target is >= 100 images/s at 512x496 on one core. Two figures are printed: render only
(`render_scan`) and the full `generate` (render + JPEG + zip write).

    python bench/synthetic_oct.py [--images 200] [--width 512]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # "one core": the matrix products must not fan out

import numpy as np  # noqa: E402

from medimg.config import OctSyntheticConfig  # noqa: E402
from medimg.data.synthetic_oct import (  # noqa: E402
    CLASSES,
    ScanStyle,
    generate,
    jpeg_bytes,
    render_scan,
)


def _timed(fn) -> tuple[float, float]:
    """Wall and CPU seconds of fn(): CPU time is the fair figure on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=496)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    styles = [ScanStyle.sample(rng) for _ in range(16)]
    w, h, n = args.width, args.height, args.images

    def render() -> None:
        for i in range(n):
            render_scan(rng, CLASSES[i % 4], styles[i % 16], w, h)

    def encode() -> None:
        for i in range(n):
            jpeg_bytes(render_scan(rng, CLASSES[i % 4], styles[i % 16], w, h))

    per_patient = 5
    cfg = OctSyntheticConfig(
        patients=max(4, n // per_patient),
        images_per_patient=(per_patient, per_patient),
        width_choices=(w,),
        height=h,
    )
    summary: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            ("render_scan", n, _timed(render)),
            ("render + JPEG", n, _timed(encode)),
            (
                "generate (zip)",
                cfg.patients * per_patient,
                _timed(lambda: summary.update(generate(Path(tmp) / "oct.zip", cfg, seed=0))),
            ),
        ]
    print(f"{w}x{h}, {os.cpu_count()} cores visible, BLAS threads 1")
    for label, count, (wall, cpu) in rows:
        print(f"{label:16s} {count / wall:7.1f} images/s wall  {count / cpu:7.1f} images/s CPU")
    print(
        f"zip: {summary['images']} images, {summary['bytes'] / summary['images'] / 1e3:.0f} kB each"
    )


if __name__ == "__main__":
    main()
