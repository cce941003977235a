"""How long DVC takes to decide that nothing changed, at the full NIH size (27,558 cells).

A clone of this repo generates a synthetic set of about that size, runs the data stages once,
then times a no-op `dvc repro` (goal ≤3 s) and `dvc status`. Usage:

    python bench/dvc_noop.py [--patients 200] [--cells 120 156] [--repeat 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def sh(cmd: list[str], cwd: Path) -> float:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
    return time.perf_counter() - t0


def prepare(work: Path, patients: int, cells: tuple[int, int]) -> Path:
    repo = work / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(repo)], check=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["dataset"]["synthetic"].update({"patients": patients, "cells_per_patient": list(cells)})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--patients", type=int, default=200)
    ap.add_argument("--cells", type=int, nargs=2, default=(120, 156))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="medimg-bench-"))
    try:
        repo = prepare(work, args.patients, tuple(args.cells))
        build = sh(["dvc", "repro", "split"], repo)
        with zipfile.ZipFile(repo / "data/raw/images.zip") as zf:
            images = sum(n.endswith(".png") for n in zf.namelist())
        noop = [sh(["dvc", "repro", "split"], repo) for _ in range(args.repeat)]
        status = [sh(["dvc", "status"], repo) for _ in range(args.repeat)]
        files = sum(1 for _ in (repo / "data").rglob("*") if _.is_file())
        rows = [
            ("images in the synthetic set", f"{images:,}"),
            ("files DVC tracks under data/", f"{files}"),
            ("first repro (download→validate→split)", f"{build:.1f} s"),
            ("no-op `dvc repro split` (median)", f"{statistics.median(noop):.2f} s  goal ≤ 3 s"),
            ("`dvc status` (median)", f"{statistics.median(status):.2f} s"),
        ]
        width = max(len(r[0]) for r in rows)
        print(f"{'measure':<{width}} | value\n{'-' * width}-|------")
        for name, value in rows:
            print(f"{name:<{width}} | {value}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
