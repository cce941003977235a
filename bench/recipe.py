"""The real-data recipe levers for compact_cnn on unseen patients: each lever on its own, then
the best combination (chosen on val), one row per recipe, from real cells.

    python bench/recipe.py [--zip ../shared/data/malaria/cell_images_dev.zip]
                           [--work /tmp/medimg-recipe] [--levers baseline,color,...]

The dev zip goes through the real download → validate → split stages once (the default
patient split); each lever then trains (or, for evaluation-only levers, re-evaluates the
baseline model) through the real train and evaluate stages, logging to a SQLite store in
WORK. Val accuracy and its patient-bootstrap CI are computed here on the val split with the
lever's scoring (TTA, temperature); test figures come from the evaluate stage: accuracy with
its patient-bootstrap CI, sensitivity and specificity at the operating threshold chosen on
val, ECE before/after temperature scaling, .keras size, train minutes. Only the test numbers
of the final table are ever looked at after choosing on val.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEV_ZIP = REPO.parent / "shared" / "data" / "malaria" / "cell_images_dev.zip"
COLOR = {"brightness": 0.1, "contrast": 0.1, "saturation": 0.15, "hue": 0.03}
# name: (train overrides, evaluate overrides, trains?) — each against the baseline
LEVERS: dict[str, tuple[dict, dict, bool]] = {
    "baseline": ({}, {}, True),
    "color": ({"augment": {"color": COLOR}}, {}, True),
    "px96": ({"overrides": {"compact_cnn": {"image_size": 96}}}, {}, True),
    "px128": ({"overrides": {"compact_cnn": {"image_size": 128}}}, {}, True),
    "cosine": ({"overrides": {"compact_cnn": {"schedule": "cosine"}}}, {}, True),
    "smooth": ({"label_smoothing": 0.1}, {}, True),
    "width1.2": ({"overrides": {"compact_cnn": {"model": {"width": 1.2}}}}, {}, True),
    "epochs30": ({"overrides": {"compact_cnn": {"epochs": 30}}}, {}, True),
    "tta": ({}, {"tta": True}, False),
    "point_threshold": ({}, {"threshold_rule": "point"}, False),
    "no_temperature": ({}, {"temperature_scaling": False}, False),
}
TRAINING = ("color", "px96", "px128", "cosine", "smooth", "width1.2", "epochs30")


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = (
            deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
        )
    return out


def base_params(work: Path, zip_path: Path, epochs: int) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["dataset"] |= {"source": "local", "path": str(zip_path)}
    params["train"] |= {"architectures": ["compact_cnn"], "epochs": epochs}
    params["evaluate"] |= {"gradcam_examples": 2}
    params["gate"] |= {"min_accuracy": 0.0}
    params["paths"] |= {
        "raw": str(work / "data/raw"),
        "validated": str(work / "data/validated"),
        "split": str(work / "data/split"),
        "gx": str(REPO / "gx"),
    }
    params["mlflow"] |= {
        "tracking_uri": f"sqlite:///{work / 'mlruns.db'}",
        "artifact_root": str(work / "artifacts"),
    }
    return params


def lever_params(base: dict, work: Path, name: str, train: dict, evaluate: dict) -> Any:
    from medimg.config import parse_params

    params = deep_merge(base, {"train": train, "evaluate": evaluate})
    params["paths"] |= {
        "models": str(work / name / "models"),
        "reports": str(work / name / "reports"),
    }
    return parse_params(params)


def prepare(base: dict, work: Path) -> None:
    from medimg.config import parse_params
    from medimg.download import run as download
    from medimg.split import run as split
    from medimg.validate import run as validate

    params = parse_params(base)
    if (Path(base["paths"]["split"]) / "classes.json").exists():
        return
    download(params, progress=False)
    validate(params)
    split(params)


def copy_model(work: Path, name: str, source: str = "baseline") -> None:
    """Reuse a trained lever's model and train reports for a run that only changes scoring.

    An evaluation-only lever scores the baseline's model; a combination of one training lever
    with TTA scores that lever's model, since training it again would repeat the same recipe.
    """
    for part in ("models", "reports/train"):
        src, dst = work / source / part, work / name / part
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


def val_accuracy(params: Any, size: int, summary: dict) -> dict:
    """Val accuracy with the lever's scoring, and its patient-bootstrap CI."""
    import numpy as np

    from medimg.analysis.stats import bootstrap_ci
    from medimg.data.shards import stream_split
    from medimg.models.loading import load_model
    from medimg.scoring import predicted_labels, probabilities

    model = load_model(params.paths.model_file("compact_cnn"))
    tta, temperature = params.evaluate.tta, summary.get("temperature", 1.0)
    score = lambda x: probabilities(model, x, tta=tta, temperature=temperature)  # noqa: E731
    y, groups, _, out = stream_split(params.paths.split, "val", size, {"p": score})
    p = out["p"]
    acc = lambda yy, pp: float(np.mean(predicted_labels(pp) == yy))  # noqa: E731
    return bootstrap_ci(y, p, groups, acc, params.evaluate.bootstrap, params.evaluate.ci, 0)


def run_lever(
    base: dict,
    work: Path,
    name: str,
    train: dict,
    evaluate: dict,
    trains: bool,
    source: str = "baseline",
) -> dict:
    from medimg.evaluate import run as evaluate_run
    from medimg.io import read_json
    from medimg.train import fit

    params = lever_params(base, work, name, train, evaluate)
    t0 = time.perf_counter()
    if trains:
        fit(params, "compact_cnn")
    else:
        copy_model(work, name, source)
    train_metrics = read_json(params.paths.train_reports("compact_cnn") / "metrics.json")
    summary = evaluate_run(params, "compact_cnn")
    size = read_json(params.paths.train_run("compact_cnn"))["image_size"]
    details = read_json(params.paths.eval_reports("compact_cnn") / "details.json")
    op = details.get("operating_point", {})
    val = val_accuracy(params, size, summary)
    return {
        "lever": name,
        "image_size": size,
        "val_accuracy": val["point"],
        "val_ci": [val["low"], val["high"]],
        "test_accuracy": summary["accuracy"],
        "test_ci": summary["accuracy_ci"],
        "sensitivity_at_op": op.get("sensitivity"),
        "specificity_at_op": op.get("specificity"),
        "op_threshold": op.get("threshold"),
        "sensitivity_at_0.5": summary.get("sensitivity"),
        "specificity_at_0.5": summary.get("specificity"),
        "ece_before": summary.get("ece_before"),
        "ece_after": summary.get("ece"),
        "temperature": summary.get("temperature"),
        "keras_mb": train_metrics["keras_bytes"] / 1e6,
        "train_min": train_metrics["train_seconds"] / 60,
        "wall_min": (time.perf_counter() - t0) / 60,
    }


def fmt(row: dict) -> str:
    f = lambda v, spec=".4f": "–" if v is None else format(v, spec)  # noqa: E731
    ci = lambda c: f"[{f(c[0])}, {f(c[1])}]"  # noqa: E731
    return (
        f"| {row['lever']} | {row['image_size']} | {f(row['val_accuracy'])} {ci(row['val_ci'])} "
        f"| {f(row['test_accuracy'])} {ci(row['test_ci'])} | {f(row['sensitivity_at_op'])} "
        f"| {f(row['specificity_at_op'])} | {f(row['op_threshold'], '.3f')} "
        f"| {f(row['ece_before'])} → {f(row['ece_after'])} | {f(row['keras_mb'], '.2f')} "
        f"| {f(row['train_min'], '.1f')} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zip", type=Path, default=DEV_ZIP)
    ap.add_argument("--work", type=Path, default=Path("/tmp/medimg-recipe"))
    ap.add_argument("--levers", default=",".join(LEVERS))
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--no-best", action="store_true", help="skip the combination run")
    args = ap.parse_args()
    if not args.zip.exists():
        raise SystemExit(f"{args.zip}: not found (the real dev cells live in ../shared/data)")
    args.work.mkdir(parents=True, exist_ok=True)
    base = base_params(args.work, args.zip.resolve(), args.epochs)
    prepare(base, args.work)
    results_file = args.work / "results.json"
    rows = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name in args.levers.split(","):
        if name not in rows:
            rows[name] = run_lever(base, args.work, name, *LEVERS[name])
            results_file.write_text(json.dumps(rows, indent=2))
    if not args.no_best and "baseline" in rows:
        chosen = [
            n
            for n in TRAINING
            if n in rows and rows[n]["val_accuracy"] > rows["baseline"]["val_accuracy"]
        ]
        train: dict = {}
        for n in chosen:
            train = deep_merge(train, LEVERS[n][0])
        evaluate = (
            {"tta": True}
            if "tta" in rows and rows["tta"]["val_accuracy"] > rows["baseline"]["val_accuracy"]
            else {}
        )
        key = "best: " + (" + ".join(chosen + (["tta"] if evaluate else [])) or "baseline")
        if key not in rows:
            # one training lever: its model is the combination's model, scored with TTA
            reuse = len(chosen) == 1 and (args.work / chosen[0] / "models").is_dir()
            source = chosen[0] if reuse else "baseline"
            trains = bool(chosen) and not reuse
            rows[key] = run_lever(base, args.work, "best", train, evaluate, trains, source)
            rows[key]["lever"] = key
            results_file.write_text(json.dumps(rows, indent=2))
    print(f"\ncompact_cnn on {args.zip.name}, patient split, {args.epochs} epochs")
    print(
        "| lever | px | val acc [95% CI] | test acc [95% CI] | sens @op | spec @op | op thr "
        "| ECE before → after T | .keras MB | train min |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows.values():
        print(fmt(row))


if __name__ == "__main__":
    main()
