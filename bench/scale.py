"""Does memory stay flat as the data grows? Synthetic OCT2017 at 10k, 30k and 100k images.

For each size, a clone of this repo runs the real DVC stages on the offline OCT-like
generator (grayscale JPEG 512x496, `CLASS-PATIENT-N.jpeg`): download (generate + install) →
validate → split → train (compact_cnn, one epoch at 224 px) → evaluate → register → a no-op
`dvc repro` of the whole pipeline (of the data stages for a size that does not train).
Every stage is its own `dvc repro -s` process; its wall time and peak RSS (the largest of the
process tree, from `wait4`) are recorded. The table shows each stage per size and how it
grows from the smallest size to the largest. Goals: peak RSS ≤ 2 GB for every
stage at 100k, near-linear time, no-op `dvc repro` ≤ 3 s.

    python bench/scale.py [--sizes 10000,30000,100000] [--train-sizes 10000,30000]
                          [--work /tmp/medimg-scale] [--image-size 224]

Training one epoch at 224 px runs at ~20 images/s on 2 cores (an hour for 100k), so
`--train-sizes` picks the sizes that also train, evaluate and register; results are kept in
WORK/results.json and a re-run skips what it already measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]
IMAGES_PER_PATIENT = (4, 8)  # 6 on average
DATA_STAGES = ("download", "validate", "split")
MODEL_STAGES = ("train@compact_cnn", "evaluate@compact_cnn", "register")


def git_clone(dest: Path) -> None:
    """A clone of the committed repo (kept if it exists, so a re-run resumes in it)."""
    if not (dest / ".git").exists():
        subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
        # as a team would for GBs of data: the DVC cache links files instead of copying them
        dvc = str(Path(sys.executable).parent / "dvc")
        subprocess.run(
            [dvc, "config", "--local", "cache.type", "hardlink,symlink"], cwd=dest, check=True
        )


def clone(dest: Path, size: int, image_size: int) -> None:
    """A clone of the committed repo with params for `size` synthetic OCT images."""
    git_clone(dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["dataset"] |= {"name": "oct2017", "source": "synthetic"}
    params["dataset"]["synthetic_oct"] |= {
        "patients": max(4, round(size / (sum(IMAGES_PER_PATIENT) / 2))),
        "images_per_patient": list(IMAGES_PER_PATIENT),
        "width_choices": [512],
    }
    params["validate"] |= {"classes": CLASSES, "modes": ["L"], "formats": ["JPEG"]}
    params["gate"] |= {"min_accuracy": 0.0}  # one epoch: the gate is not what is measured
    params["train"] |= {
        "architectures": ["compact_cnn"],
        "epochs": 1,
        "overrides": {"compact_cnn": {"image_size": image_size}},
    }
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def measure(cmd: list[str], cwd: Path, log: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS in MB of `cmd` and every process it waited for."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed in {cwd} (exit {proc.returncode}); see {log}")
    return seconds, usage.ru_maxrss / 1024  # Linux: KB


def images_in(repo: Path) -> int | None:
    report = repo / "reports" / "validation.json"
    return int(json.loads(report.read_text())["valid"]) if report.exists() else None


def run_size(work: Path, size: int, train: bool, image_size: int, results: dict) -> None:
    repo = work / f"oct-{size}"
    clone(repo, size, image_size)
    row = results.setdefault(str(size), {})
    log = work / f"oct-{size}.log"
    stages = [*DATA_STAGES, *(MODEL_STAGES if train else [])]
    for stage in stages:
        if stage not in row:
            seconds, rss = measure(["dvc", "repro", "-s", stage], repo, log)
            row[stage] = {"seconds": round(seconds, 1), "peak_rss_mb": round(rss)}
            row["images"] = images_in(repo) or row.get("images")
            save(work, results)
    if "no-op dvc repro" not in row:
        target = [] if train else [stages[-1]]  # the whole pipeline once it has trained
        noop = [measure(["dvc", "repro", *target], repo, log) for _ in range(3)]
        seconds = sorted(s for s, _ in noop)[1]
        row["no-op dvc repro"] = {"seconds": round(seconds, 2), "peak_rss_mb": round(noop[1][1])}
    shard_mb = [p.stat().st_size / 1e6 for p in (repo / "data" / "split").glob("*.tfrecord")]
    row["shards"] = {"files": len(shard_mb), "largest_mb": round(max(shard_mb), 1)}
    save(work, results)


def save(work: Path, results: dict) -> None:
    (work / "results.json").write_text(json.dumps(results, indent=2))


def table(results: dict) -> str:
    sizes = sorted(results, key=int)
    stages = [*DATA_STAGES, *MODEL_STAGES, "no-op dvc repro"]
    head = " | ".join(f"{int(s):,} images: s, peak MB" for s in sizes)
    lines = [
        f"| stage | {head} | growth, smallest → largest: time, RSS |",
        "|---" * (len(sizes) + 2) + "|",
    ]
    for stage in stages:
        cells, have = [], []
        for s in sizes:
            m = results[s].get(stage)
            cells.append(f"{m['seconds']:g} s, {m['peak_rss_mb']:,} MB" if m else "–")
            if m:
                have.append((int(s), m))
        growth = "–"
        if len(have) > 1:
            (n0, a), (n1, b) = have[0], have[-1]
            growth = (
                f"{n1 / n0:.0f}x data: {b['seconds'] / a['seconds']:.1f}x time, "
                f"{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x RSS"
            )
        lines.append(f"| {stage} | {' | '.join(cells)} | {growth} |")
    images = " / ".join(f"{results[s].get('images') or 0:,}" for s in sizes)
    shards = " / ".join(
        f"{results[s]['shards']['files']} x ≤{results[s]['shards']['largest_mb']} MB"
        for s in sizes
        if "shards" in results[s]
    )
    lines.append(f"\nvalid images: {images}; split shards: {shards}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,30000,100000")
    ap.add_argument("--train-sizes", default="10000,30000")
    ap.add_argument("--work", type=Path, default=Path("/tmp/medimg-scale"))
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--clean", action="store_true", help="delete each clone after measuring")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    train_sizes = {int(s) for s in args.train_sizes.split(",") if s}
    for size in (int(s) for s in args.sizes.split(",")):
        run_size(args.work, size, size in train_sizes, args.image_size, results)
        if args.clean:
            shutil.rmtree(args.work / f"oct-{size}", ignore_errors=True)
        print(table(results), flush=True)


if __name__ == "__main__":
    main()
