"""`medimg export`: the model as a TFLite file, after a parity check on the test split."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from medimg.commands.model_ref import MODEL_HELP, load_classifier
from medimg.config import QUANTIZE_MODES, Params
from medimg.errors import DataError, MedimgError
from medimg.io import read_json
from medimg.scoring import Classifier, probabilities

MIN_AGREEMENT = 0.99


def export_path(params: Params, clf: Classifier, quantize: str) -> Path:
    """`models/export/<name>-v<version>-<quantize>.tflite`; for a run `run-<id8>-...`, for a
    file its stem (`models/<arch>/model.keras` → `<arch>-...`)."""
    info = clf.info
    if info.get("name") and info.get("version"):
        stem = f"{info['name']}-v{info['version']}"
    elif info.get("run_id"):
        stem = f"run-{info['run_id'][:8]}"
    else:
        path = Path(info.get("keras_path", "model"))
        stem = path.parent.name if path.stem == "model" and path.parent.name else path.stem
    return Path(params.paths.models) / "export" / f"{stem}-{quantize}.tflite"


def export_edge(params: Params, clf: Classifier, quantize: str) -> tuple[bytes, dict[str, Any]]:
    """The .tflite bytes and their test-split numbers; raises when parity is below 99 %."""
    from medimg.analysis.edge import check_parity, compare_edge, edge_model, lite_probabilities
    from medimg.data.shards import stream_split

    split = params.paths.split
    n_train = read_json(params.paths.classes_json)["images"]["train"] if quantize == "int8" else 0
    content, lite = edge_model(
        clf.model,
        quantize,
        split_dir=split,
        size=clf.size,
        n_train=n_train,
        samples=params.evaluate.representative_samples,
        seed=params.seed,
    )
    scorers = {
        "keras": lambda x: probabilities(clf.model, x),
        "lite": lambda x: lite_probabilities(lite, x),
    }
    y_test, _, _, out = stream_split(split, "test", clf.size, scorers)  # a batch at a time
    if len(y_test) == 0:
        raise DataError(f"{split}: the test split is empty")
    keras_probs = out["keras"]
    check = compare_edge(content, lite, out["lite"], keras_probs, y_test, clf.threshold)
    check_parity(keras_probs, check.probs, MIN_AGREEMENT, clf.threshold)
    stats = {
        "bytes": check.size,
        "agreement": check.agreement,
        "test_accuracy": check.accuracy,
        "test_images": len(y_test),
        "threshold": clf.threshold,
    }
    return check.content, stats


def export_command(
    params: Params,
    quantize: str = "none",
    model: str = "champion",
    output: str | Path | None = None,
    fmt: str = "tflite",
) -> dict[str, Any]:
    """`medimg export`: write the edge file after the parity gate; log it to the model's run."""
    from medimg.analysis.edge import write_tflite

    if fmt != "tflite":
        raise MedimgError(f"export: unknown format {fmt!r}; only 'tflite'", exit_code=2)
    if quantize not in QUANTIZE_MODES:
        raise MedimgError(f"export: --quantize must be one of {QUANTIZE_MODES}", exit_code=2)
    clf = load_classifier(params, model)
    content, stats = export_edge(params, clf, quantize)
    dest = write_tflite(content, Path(output) if output else export_path(params, clf, quantize))
    run_id = clf.info.get("run_id")
    if run_id:
        _log_export(run_id, quantize, stats, dest)
    print(
        f"export {clf.label} ({quantize}): {dest} {stats['bytes'] / 1024:.1f} KiB, agreement "
        f"{stats['agreement']:.4f}, TFLite test accuracy {stats['test_accuracy']:.4f} on "
        f"{stats['test_images']} images" + ("" if run_id else " (no MLflow run: not logged)")
    )
    return {**stats, "path": str(dest), "run_id": run_id}


def _log_export(run_id: str, quantize: str, stats: dict[str, Any], dest: Path) -> None:
    from medimg import tracking

    prefix = f"tflite_{quantize}_"
    metrics = {k: stats[k] for k in ("bytes", "agreement", "test_accuracy")}
    with tracking.run(run_id=run_id):
        tracking.log_metrics(metrics, prefix=prefix)
        tracking.set_tags({f"{prefix}file": dest.as_posix()})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", dest="fmt", choices=("tflite",), default="tflite")
    p.add_argument("--quantize", choices=QUANTIZE_MODES, default="none")
    p.add_argument("--model", default="champion", help=MODEL_HELP)
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="default: models/export/<name>-v<version>-<quantize>.tflite",
    )


def run(params: Params, args: argparse.Namespace) -> int:
    export_command(params, args.quantize, args.model, args.output, args.fmt)
    return 0
