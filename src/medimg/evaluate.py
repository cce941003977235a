"""The `evaluate` stage: clinical metrics of one architecture on the held-out test patients.

The operating threshold is chosen on the validation split (for `evaluate.target_sensitivity`:
missing an infection costs more than a false alarm) and then applied unchanged to test, so
the reported sensitivity is an honest estimate; it is the served model's threshold, so every
headline rate is at it (the 0.5 rates are kept beside them, labelled `_at_0.5`). Confidence
intervals resample patients, not cells, because cells of one patient are not independent.
The same numbers go to DVC (`reports/eval/<arch>.json`) and into the architecture's MLflow
training run.

This module orchestrates: the int8 file and its benchmark are `medimg.analysis.edge`'s, the
Grad-CAM examples `medimg.analysis.gradcam`'s, logging the served model
`medimg.classifier_logging`'s. It writes the numbers three ways, each for its reader:
`details.json` (every metric, nested), `summary.json` (the flat headline numbers, for register
and compare.md) and `reports/eval/<arch>.json` (what `dvc metrics`/`exp show` compare).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medimg import tracking
from medimg.analysis.calibration import apply_temperature, fit_temperature
from medimg.analysis.edge import TFLiteModel, edge_benchmark, edge_model, lite_probabilities
from medimg.analysis.gradcam import gradcam_examples
from medimg.analysis.metrics import (
    binary_metrics,
    expected_calibration_error,
    multiclass_metrics,
)
from medimg.analysis.operating import confidence_intervals, operating_threshold
from medimg.analysis.patient import evaluate_patients
from medimg.analysis.slice_eval import evaluate_slices, slices_csv_path, write_slices
from medimg.analysis.slices import tracked_metrics, worst_slice_metrics
from medimg.classifier_logging import ServingConfig, log_classifier
from medimg.config import EvaluateConfig, Params
from medimg.data.shards import stream_split, take_images
from medimg.errors import DataError
from medimg.io import atomic_dir, read_json, write_json, write_text
from medimg.models.loading import load_model, with_embedding
from medimg.monitoring.profile import reference_profile
from medimg.scoring import predicted_labels, probabilities


def score(
    y_test: np.ndarray,
    p_test: np.ndarray,
    y_val: np.ndarray,
    p_val: np.ndarray,
    groups: list[str],
    classes: list[str],
    cfg: EvaluateConfig,
    seed: int,
    val_groups: list[str] | None = None,
) -> dict[str, Any]:
    """Pure: every test metric, the operating threshold and its CIs.

    Binary: the headline (and its CIs) is at the operating threshold chosen on val, the
    decision the served model and `medimg predict` make, so the gate judges what is served;
    the 0.5 figures stay beside it under `at_0.5`. Multi-class: argmax.
    """
    if p_test.ndim == 2:
        result = multiclass_metrics(y_test, p_test, classes, n_bins=cfg.calibration_bins)
        result["ci"] = confidence_intervals(y_test, p_test, groups, cfg, seed, 0.5)
        return result
    threshold, rule = operating_threshold(y_val, p_val, val_groups, cfg, seed)
    result = binary_metrics(y_test, p_test, threshold=threshold, n_bins=cfg.calibration_bins)
    result["positive_class"] = classes[1]
    result["operating_point"] = {
        "target_sensitivity": cfg.target_sensitivity,
        "chosen_on": "val",
        **rule,
        **binary_metrics(y_test, p_test, threshold=threshold),
    }
    result["at_0.5"] = at_half(y_test, p_test)
    result["ci"] = confidence_intervals(y_test, p_test, groups, cfg, seed, threshold)
    return result


AT_HALF = ("accuracy", "sensitivity", "specificity", "precision", "f1", "mcc")


def at_half(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """The decision rates at 0.5, kept beside the served-threshold headline: how much the
    operating threshold moves them is what a reader of the headline needs to see."""
    half = binary_metrics(y, p, threshold=0.5)
    return {k: half[k] for k in ("threshold", *AT_HALF, "confusion_matrix")}


def predictions_frame(
    paths: list[str],
    patients: list[str],
    y: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    threshold: float,
) -> pd.DataFrame:
    """One row per test image; `actual`/`predicted` feed `dvc plots` confusion matrices."""
    pred = predicted_labels(probs, threshold)
    frame = pd.DataFrame(
        {
            "path": paths,
            "patient": patients,
            "actual": [classes[i] for i in y],
            "predicted": [classes[i] for i in pred],
            "correct": pred == y,
        }
    )
    if probs.ndim == 1:
        frame[f"p_{classes[1]}"] = probs
    else:
        for i, c in enumerate(classes):
            frame[f"p_{c}"] = probs[:, i]
    return frame


def write_plots(
    out: Path,
    result: dict,
    y: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    cfg: EvaluateConfig,
    gradcams: dict[str, tuple[np.ndarray, np.ndarray, list[str]]],
    train_reports: Path,
) -> None:
    from medimg.analysis.plots import (
        gradcam_grid,
        plot_confusion_matrix,
        plot_pr,
        plot_reliability,
        plot_roc,
        save_figure,
    )

    names = None if probs.ndim == 1 else classes
    save_figure(plot_confusion_matrix(result["confusion_matrix"], classes), out / "confusion.png")
    save_figure(plot_roc(y, probs, names), out / "roc.png")
    save_figure(plot_pr(y, probs, names), out / "pr.png")
    save_figure(plot_reliability(y, probs, n_bins=cfg.calibration_bins), out / "calibration.png")
    for name, (x, heat, titles) in gradcams.items():
        save_figure(gradcam_grid(x / 255.0, heat, titles), out / f"gradcam_{name}.png")
    curves = train_reports / "learning_curves.png"
    if curves.exists():
        (out / "learning_curves.png").write_bytes(curves.read_bytes())


def roc_csv(y: np.ndarray, probs: np.ndarray) -> str:
    from sklearn.metrics import roc_curve

    if probs.ndim != 1 or len(np.unique(y)) < 2:
        return "fpr,tpr,threshold\n"
    fpr, tpr, thr = roc_curve(y, probs)
    thr = np.clip(thr, 0.0, 1.0)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thr}).to_csv(index=False)


def headline(result: dict[str, Any], train: dict[str, Any], edge: dict[str, Any]) -> dict:
    """summary.json: every headline number, flat, with CIs as [low, high] (register reads it)."""
    keys = (
        "accuracy",
        "sensitivity",
        "specificity",
        "precision",
        "f1",
        "roc_auc",
        "pr_auc",
        "mcc",
        "brier",
        "ece",
    )
    flat = {k: result[k] for k in keys if k in result}
    if "at_0.5" in result:  # binary: the headline's decision threshold, then the 0.5 figures
        flat["threshold"] = result["threshold"]
        flat |= {f"{k}_at_0.5": result["at_0.5"][k] for k in AT_HALF}
    flat |= {f"{k}_ci": [v["low"], v["high"]] for k, v in result["ci"].items()}
    flat |= {"params": train.get("params"), "keras_bytes": train.get("keras_bytes"), **edge}
    calibration = result.get("calibration", {})
    flat |= {k: calibration[k] for k in ("temperature", "ece_before") if k in calibration}
    return flat


COMPARED = ("accuracy", "sensitivity", "specificity", "roc_auc")


def dvc_metrics(flat: dict[str, Any]) -> dict[str, Any]:
    """reports/eval/<arch>.json, what `dvc exp show` / `metrics diff` compare: the headline
    rates (binary: at the served `threshold`) with their patient-bootstrap CIs (as scalars:
    DVC tables take no lists), calibration, size, int8 accuracy and, labelled, the rates at
    0.5 (the rest is in summary.json)."""
    out: dict[str, Any] = {}
    for name in COMPARED:
        low, high = flat.get(f"{name}_ci") or (None, None)
        out |= {name: flat.get(name), f"{name}_ci_low": low, f"{name}_ci_high": high}
    keep = ("ece", "ece_before", "temperature", "keras_bytes", "int8_accuracy")
    out |= {k: flat.get(k) for k in keep}
    served = ("threshold", *(f"{k}_at_0.5" for k in COMPARED[:3]))  # binary only
    return out | {k: flat[k] for k in served if k in flat}


def calibrated(
    y_val: np.ndarray, p_val_raw: np.ndarray, p_raw: np.ndarray, cfg: EvaluateConfig
) -> tuple[np.ndarray, np.ndarray, float]:
    """(val, test probabilities as served, temperature).

    The raw probabilities come with `evaluate.tta` as the served model will run it; the
    temperature is fitted on val (`evaluate.temperature_scaling`) and applied to both, so
    thresholds are chosen on the same probabilities the clinician sees.
    """
    t = fit_temperature(y_val, p_val_raw) if cfg.temperature_scaling else 1.0
    return apply_temperature(p_val_raw, t), apply_temperature(p_raw, t), t


def scored_splits(
    model: Any, params: Params, size: int, info: dict[str, Any]
) -> tuple[dict[str, Any], tuple[bytes, TFLiteModel] | None]:
    """Val and test scored in one streamed pass each: one batch of images in memory at a
    time, whatever the split size. Test gets the served scoring (TTA as configured), the
    plain scoring the int8 file must match, and the int8 file's own probabilities."""
    cfg, split = params.evaluate, params.paths.split
    served = lambda x: probabilities(model, x, tta=cfg.tta)  # noqa: E731
    y_val, val_patients, _, out = stream_split(split, "val", size, {"raw": served})
    scorers = {"raw": served}
    if cfg.tta:
        scorers["plain"] = lambda x: probabilities(model, x)
    edge = None
    if cfg.tflite_int8:  # calibrated on a seeded sample of training images
        edge = edge_model(
            model,
            "int8",
            split_dir=split,
            size=size,
            n_train=info["images"]["train"],
            samples=cfg.representative_samples,
            seed=params.seed,
        )
        scorers["int8"] = lambda x: lite_probabilities(edge[1], x)
    y, patients, img_paths, test = stream_split(split, "test", size, scorers)
    test.setdefault("plain", test["raw"])
    found = {"y_val": y_val, "val_patients": val_patients, "p_val_raw": out["raw"], "y": y}
    return found | {"patients": patients, "paths": img_paths, **test}, edge


def run(params: Params, arch: str) -> dict[str, Any]:
    """Evaluate `arch` on test, write reports/eval/<arch>.json + plots, log to its MLflow run
    with the served model (its TTA, temperature and operating threshold)."""
    paths, cfg = params.paths, params.evaluate
    info = read_json(paths.classes_json)
    classes = info["classes"]
    run_info = read_json(paths.train_run(arch))
    train_metrics = read_json(paths.train_reports(arch) / "metrics.json")
    size = int(run_info["image_size"])
    model = load_model(paths.model_file(arch))

    scored, edge_file = scored_splits(model, params, size, info)
    y, patients, y_val = scored["y"], scored["patients"], scored["y_val"]
    if len(y_val) == 0 or len(y) == 0:
        raise DataError(f"{paths.split}: the {'val' if len(y_val) == 0 else 'test'} split is empty")
    p_val, probs, temperature = calibrated(y_val, scored["p_val_raw"], scored["raw"], cfg)
    result = score(
        y, probs, y_val, p_val, patients, classes, cfg, params.seed, scored["val_patients"]
    )
    result["calibration"] = {
        "temperature": temperature,
        "ece_before": expected_calibration_error(y, scored["raw"], cfg.calibration_bins),
        "ece_after": result["ece"],
        "tta": cfg.tta,
    }
    images = lambda picks: take_images(paths.split, "test", size, picks)  # noqa: E731
    bench = images(list(range(min(cfg.benchmark_images, len(y)))))
    lite = None if edge_file is None else (*edge_file, scored["int8"])
    edge, int8 = edge_benchmark(model, bench, y, scored["plain"], lite)
    gradcams = gradcam_examples(model, images, y, probs, classes, cfg.gradcam_examples)

    patient_rows = None
    if probs.ndim == 1:  # a smear's diagnosis (medimg.analysis.patient): binary only
        result["patient_level"], patient_rows = evaluate_patients(
            (scored["val_patients"], y_val, p_val),
            (patients, y, probs),
            result["operating_point"]["threshold"],
            cfg.patient.target_sensitivity,
            cfg.patient.threshold_rule,
            cfg.bootstrap,
            cfg.ci,
            params.seed,
        )
    flat = headline(result, train_metrics, edge)
    if "patient_level" in result:
        flat["patient_level"] = result["patient_level"]
    out = paths.eval_reports(arch)
    point = result.get("operating_point", {})
    slices = evaluate_slices(
        paths.split, scored, probs, classes, float(point.get("threshold", 0.5)), cfg, params.seed
    )
    serving = ServingConfig(
        classes=list(classes),
        image_size=size,
        threshold=float(point.get("threshold", 0.5)),
        tta=cfg.tta,
        temperature=temperature,
        max_image_pixels=params.dataset.limits.max_image_pixels,
        patient_threshold=result.get("patient_level", {}).get("patient_threshold"),
        keep_images=params.monitoring.keep_images,
    )
    reference = monitoring_reference(model, params, size, info, p_val, classes, serving.threshold)
    tracking.configure(params.mlflow, params.dataset.name)
    with tempfile.TemporaryDirectory() as staging:
        reference_file = Path(staging) / "reference.json"
        write_json(reference_file, reference)
        uri, model_id = log_classifier(
            paths.model_file(arch),
            serving,
            bench[:2],
            run_id=run_info["run_id"],
            reference=reference_file,
        )
    run_info = {**run_info, "model_uri": uri, "model_id": model_id}
    with atomic_dir(out) as tmp:
        write_json(tmp / "reference.json", reference)  # also stored with the served model
        write_plots(tmp, result, y, probs, classes, cfg, gradcams, paths.train_reports(arch))
        if int8 is not None:
            (tmp / "model_int8.tflite").write_bytes(int8)
        write_json(tmp / "details.json", {**result, "edge": edge, "architecture": arch})
        write_json(tmp / "run.json", run_info)  # what register reads: inside this stage's out
        write_json(tmp / "summary.json", flat)  # every headline number, for compare.md
        write_slices(tmp, slices_csv_path(out), slices)  # slices.json, the worst-first plot
        if patient_rows is not None:
            write_text(tmp / "patients.csv", patient_rows.to_csv(index=False))
    frame = predictions_frame(scored["paths"], patients, y, probs, classes, serving.threshold)
    write_text(paths.eval_predictions(arch), frame.to_csv(index=False))
    write_text(paths.eval_roc(arch), roc_csv(y, probs))
    write_json(paths.eval_metrics(arch), dvc_metrics(flat) | worst_slice_metrics(slices))
    files = [*sorted(out.iterdir()), paths.eval_predictions(arch), paths.eval_roc(arch)]
    _log_test_results(params, run_info, flat, files, info["fingerprint"])
    if slices is not None:  # slice/<name>/<metric>
        with tracking.run(run_id=run_info["run_id"]):
            tracking.log_metrics(tracked_metrics(slices), model_id=run_info.get("model_id"))
    at = f" at threshold {flat['threshold']:.4f}" if "threshold" in flat else ""
    print(
        f"evaluate {arch}: accuracy {flat['accuracy']:.4f}{at} "
        f"CI {flat['accuracy_ci']} on {len(y)} test images (T={temperature:.3f}, "
        f"ECE {result['calibration']['ece_before']:.4f} → {flat['ece']:.4f})"
    )
    return flat


def monitoring_reference(
    model: Any,
    params: Params,
    size: int,
    info: dict[str, Any],
    p_val: np.ndarray,
    classes: list[str],
    threshold: float,
) -> dict[str, Any]:
    """The drift reference stored with the served model (`medimg.monitoring.profile`): train
    sample + val properties and embeddings, val's served probabilities and decisions."""
    cfg = params.monitoring.reference
    feature_model = with_embedding(model) if cfg.embedding_components > 0 else None
    decided = [classes[i] for i in predicted_labels(p_val, threshold)]
    return reference_profile(
        feature_model,
        params.paths.split,
        size,
        int(info["images"]["train"]),
        p_val,
        decided,
        classes,
        cfg,
        params.seed,
    )


SIZES = ("params", "keras_bytes", "int8_bytes")  # counts: tags (a re-evaluation may change them)


def _log_test_results(
    params: Params, run_info: dict, flat: dict, files: list[Path], fingerprint: str
) -> None:
    """The test numbers into the training run (store configured by `run`), linked to its
    logged model and the split."""
    paths = params.paths
    with tracking.run(run_id=run_info["run_id"]):
        dataset = tracking.split_dataset(paths.split_manifest, params.dataset.name, fingerprint)
        values = {k: v for k, v in flat.items() if not k.endswith("_ci") and k not in SIZES}
        for name, ci in flat.items():
            if name.endswith("_ci") and ci[0] is not None:
                values |= {f"{name}_low": ci[0], f"{name}_high": ci[1]}
        link = {"model_id": run_info.get("model_id"), "dataset": dataset}
        tracking.log_metrics(values, prefix="test_", **link)
        sizes = {f"test_{k}": flat[k] for k in SIZES if flat.get(k) is not None}
        tracking.set_tags({"eval_fingerprint": fingerprint, **sizes})
        for file in files:
            tracking.log_artifact(file, "eval")
