"""Does the real-data recipe still train a ~20k-cell dataset in under an hour on 2 cores?

The issue measured its baseline on 19,284 real cells of 140 patients; only 6,000 real cells
are available offline, so this runs the same DVC stages on the NIH-like synthetic generator
sized like that set (140 patients, ~138 cells each). Training time depends on the number of
cells, the input size and the epochs, not on what the pixels show. The recipe is the one the
README documents for real data (compact_cnn, 64 px, 15 epochs, `evaluate.tta=true`); each
stage is its own `dvc repro -s` process, timed with its peak RSS.

    python bench/recipe_time.py [--patients 140] [--cells 124 152] [--work /tmp/medimg-20k]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from scale import git_clone, measure

STAGES = ("download", "validate", "split", "train@compact_cnn", "evaluate@compact_cnn")


def clone(dest: Path, patients: int, cells: tuple[int, int], image_size: int) -> None:
    """A clone of the committed repo with the real-data recipe on synthetic cells."""
    git_clone(dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["dataset"]["synthetic"] |= {"patients": patients, "cells_per_patient": list(cells)}
    params["train"] |= {"architectures": ["compact_cnn"]}
    params["train"]["overrides"]["compact_cnn"] = {"image_size": image_size}
    params["evaluate"] |= {"tta": True}
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def split_sizes(repo: Path) -> dict:
    import pandas as pd

    table = pd.read_parquet(repo / "data" / "split" / "split.parquet")
    return {str(k): int(v) for k, v in table["split"].value_counts().items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=140)
    ap.add_argument("--cells", type=int, nargs=2, default=(124, 152))
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--work", type=Path, default=Path("/tmp/medimg-20k"))
    args = ap.parse_args()
    repo = args.work / "repo"
    args.work.mkdir(parents=True, exist_ok=True)
    clone(repo, args.patients, tuple(args.cells), args.image_size)
    log = args.work / "stages.log"
    rows = []
    for stage in STAGES:
        seconds, rss = measure(["dvc", "repro", "-s", stage], repo, log)
        rows.append((stage, seconds, rss))
        print(f"{stage}: {seconds / 60:.1f} min, {rss:,.0f} MB", file=sys.stderr, flush=True)
    metrics = json.loads((repo / "reports" / "eval" / "compact_cnn.json").read_text())
    train = json.loads((repo / "reports" / "train" / "compact_cnn" / "metrics.json").read_text())
    print(f"\nsplit cells: {split_sizes(repo)}; compact_cnn at {args.image_size} px, TTA on")
    print("| stage | minutes | peak RSS MB |\n|---|---|---|")
    for stage, seconds, rss in rows:
        print(f"| {stage} | {seconds / 60:.1f} | {rss:,.0f} |")
    total = sum(seconds for _, seconds, _ in rows) / 60
    print(f"| all five stages | {total:.1f} | |")
    print(
        f"\nfit alone: {train['train_seconds'] / 60:.1f} min; "
        f"test accuracy (synthetic) {metrics['accuracy']:.4f}"
    )


if __name__ == "__main__":
    main()
