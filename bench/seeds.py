"""Does a model leave the start on every seed? Train it through the real train stage, one row
per seed.

    python bench/seeds.py [--arch simple_cnn] [--seeds 1,2,3,4,5] [--data-seed 42|same]
                          [--model batch_norm=false] [--epochs 15] [--threads 2]
                          [--work /tmp/medimg-seeds]

The data is params.yaml's default synthetic set, generated afresh through the real download →
validate → split stages (`medimg.data.synthetic.generate`, never a cached copy), once per data
seed: `--data-seed 42` (default) keeps the data fixed and varies only the training seed;
`--data-seed same` draws the data with each training seed too (both vary). Each training seed
then runs `medimg.train.fit` in its own process, as `dvc repro` runs the train stage: the
recipe and `train.overrides` of params.yaml (simple_cnn: 64 px, Adam 1e-3, plateau, no
augmentation), `seed` driving `keras.utils.set_random_seed`, the shuffle and the augmentation,
the best-val checkpoint kept, MLflow logging to a SQLite store in WORK. Test accuracy is that
saved model on the test split at threshold 0.5 (no temperature, no TTA). `--model KEY=VALUE`
(repeatable) adds a builder param to `train.overrides.<arch>.model`, e.g. `batch_norm=false`
for seed 001's simple_cnn exactly as published.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]


def run_params(
    work: Path, data_seed: int, seed: int, arch: str, epochs: int | None, model: dict | None
):
    """params.yaml with `seed`, this run's folders and store, the data of `data_seed` and the
    extra builder params `model` for `arch`."""
    from medimg.config import TrainOverride, load_params

    base = load_params(REPO / "params.yaml")
    tag = "".join(f"-{k}={v}" for k, v in sorted((model or {}).items()))
    data, run = work / f"data-{data_seed}", work / f"run-{arch}{tag}-{data_seed}-{seed}"
    paths = {k: str(data / k) for k in ("raw", "validated", "split")}
    paths |= {"gx": str(data / "gx"), "models": str(run / "models"), "reports": str(run / "rep")}
    override = base.train.overrides.get(arch) or TrainOverride()
    override = override.model_copy(update={"model": {**override.model, **(model or {})}})
    train = {"architectures": [arch], "overrides": {**base.train.overrides, arch: override}}
    train |= {"epochs": epochs} if epochs else {}
    mlflow = {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}", "artifact_root": str(work / "art")}
    return base.model_copy(
        update={
            "seed": seed,
            "paths": base.paths.model_copy(update=paths),
            "train": base.train.model_copy(update=train),
            "mlflow": base.mlflow.model_copy(update=mlflow),
        }
    )


def make_data(work: Path, data_seed: int) -> None:
    """download → validate → split of the default synthetic set drawn with `data_seed`."""
    from medimg.download import run as download
    from medimg.split import run as split
    from medimg.validate import run as validate

    params = run_params(work, data_seed, data_seed, "simple_cnn", None, None)
    reports = {"reports": str(work / f"data-{data_seed}" / "reports")}  # validation, data docs
    params = params.model_copy(update={"paths": params.paths.model_copy(update=reports)})
    if params.paths.classes_json.exists():
        return
    for stage in (download, validate, split):
        stage(params)


def train_one(
    work: Path, data_seed: int, seed: int, arch: str, epochs: int | None, model: dict
) -> dict:
    """One seed through `medimg.train.fit` (run in a fresh process), then test accuracy."""
    import numpy as np

    from medimg.data.shards import stream_split
    from medimg.models.loading import load_model
    from medimg.scoring import model_size, probabilities
    from medimg.train import fit

    params = run_params(work, data_seed, seed, arch, epochs, model)
    t0 = time.perf_counter()
    metrics = fit(params, arch)
    model = load_model(params.paths.model_file(arch))
    score = {"p": lambda x: probabilities(model, x)}
    y, _, _, out = stream_split(params.paths.split, "test", model_size(model), score)
    test_acc = float(np.mean((out["p"] >= 0.5).astype(int) == y))
    return {
        "seed": seed,
        "data_seed": data_seed,
        "best_epoch": metrics["best_epoch"],
        "val_accuracy": metrics["val_accuracy"],
        "test_accuracy": test_acc,
        "fit_minutes": metrics["train_seconds"] / 60,
        "minutes": (time.perf_counter() - t0) / 60,
    }


def parse_model(items: list[str]) -> dict:
    """`KEY=VALUE` strings → builder params; values read as YAML (false, 0.5, 512)."""
    import yaml

    pairs = [item.partition("=") for item in items]
    return {key: yaml.safe_load(value) for key, _, value in pairs}


def child(args: argparse.Namespace) -> None:
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    data_seed, seed = (int(v) for v in args.child.split(":"))
    model = parse_model(args.model)
    result = train_one(args.work, data_seed, seed, args.arch, args.epochs, model)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="simple_cnn")
    ap.add_argument("--seeds", default="1,2,3,4,5", help="training seeds (params `seed`)")
    ap.add_argument("--data-seed", default="42", help="an int (data fixed), or 'same'")
    ap.add_argument("--model", action="append", default=[], help="KEY=VALUE builder param")
    ap.add_argument("--epochs", type=int, default=None, help="default: params.yaml's")
    ap.add_argument("--threads", type=int, default=2, help="TensorFlow intra-op threads")
    ap.add_argument("--work", type=Path, default=Path("/tmp/medimg-seeds"))
    ap.add_argument("--child", help=argparse.SUPPRESS)  # "DATA_SEED:SEED": one training run
    args = ap.parse_args()
    args.work = args.work.resolve()
    if args.child:
        child(args)
        return
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    args.work.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    same = args.data_seed == "same"
    log = args.work / "train.log"
    rows = []
    for seed in seeds:
        data_seed = seed if same else int(args.data_seed)
        make_data(args.work, data_seed)
        cmd = [sys.executable, __file__, "--child", f"{data_seed}:{seed}", "--arch", args.arch]
        cmd += ["--threads", str(args.threads), "--work", str(args.work)]
        cmd += ["--epochs", str(args.epochs)] if args.epochs else []
        cmd += [f"--model={item}" for item in args.model]
        with log.open("a") as out:
            done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=out, text=True, check=True)
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
        rows.append(json.loads(line.removeprefix("RESULT ")))
        r = rows[-1]
        print(
            f"seed {seed} (data {data_seed}): best epoch {r['best_epoch']}, val "
            f"{r['val_accuracy']:.4f}, test {r['test_accuracy']:.4f}, {r['minutes']:.1f} min",
            file=sys.stderr,
            flush=True,
        )
    data = "data seed = training seed" if same else f"data seed {args.data_seed} (fixed)"
    model = parse_model(args.model)
    name = f"{args.arch} {model}" if model else args.arch
    print(f"\n{name}, default synthetic set, {data}; per-run log: {log}")
    print("| seed | data seed | best epoch | best val acc | test acc | minutes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seed']} | {r['data_seed']} | {r['best_epoch']} | {r['val_accuracy']:.4f} "
            f"| {r['test_accuracy']:.4f} | {r['minutes']:.1f} |"
        )
    worst = min(r["test_accuracy"] for r in rows)
    print(
        f"\nlowest test accuracy {worst:.4f}; runs >= 0.85: "
        f"{sum(r['test_accuracy'] >= 0.85 for r in rows)}/{len(rows)}"
    )


if __name__ == "__main__":
    main()
