"""The `evaluate` stage: clinical metrics of one architecture on the held-out test patients.

The operating threshold is chosen on the validation split (for `evaluate.target_sensitivity`:
missing an infection costs more than a false alarm) and then applied unchanged to test, so
the reported sensitivity is an honest estimate. Confidence intervals resample patients, not
cells, because cells of one patient are not independent. The same numbers go to DVC
(`reports/eval/<arch>.json`) and into the architecture's MLflow training run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medimg import tracking
from medimg.analysis import metrics as M
from medimg.analysis import stats as S
from medimg.analysis.calibration import apply_temperature, fit_temperature
from medimg.analysis.edge import (
    TFLiteModel,
    compare_edge,
    images_per_second,
    lite_probabilities,
    representative_indices,
    to_tflite,
)
from medimg.config import EvaluateConfig, Params
from medimg.data.shards import stream_split, take_images
from medimg.errors import DataError
from medimg.io import atomic_dir, read_json, write_json, write_text
from medimg.models.loading import load_model
from medimg.scoring import predicted_labels, probabilities
from medimg.serving import ServingConfig, log_serving_model

CI_METRICS = ("accuracy", "sensitivity", "specificity", "roc_auc")


def _rate(y: np.ndarray, pred: np.ndarray, cls: int) -> float | None:
    mask = y == cls
    return float(np.mean(pred[mask] == cls)) if mask.any() else None


def _ci_fn(name: str, threshold: float, binary: bool):
    """A cheap (y, scores) -> float metric for the bootstrap loop, at a fixed threshold."""
    if not binary:
        return lambda y, p: float(np.mean(p.argmax(1) == y))
    fns = {
        "accuracy": lambda y, p: float(np.mean((p >= threshold) == y)),
        "sensitivity": lambda y, p: _rate(y, (p >= threshold).astype(int), 1),
        "specificity": lambda y, p: _rate(y, (p >= threshold).astype(int), 0),
        "roc_auc": S.rank_auc,
    }
    return fns[name]


def confidence_intervals(
    y: np.ndarray,
    probs: np.ndarray,
    groups: list[str],
    cfg: EvaluateConfig,
    seed: int,
    threshold: float,
) -> dict[str, Any]:
    """Patient-level bootstrap CIs of the headline metrics (accuracy only for multi-class)."""
    binary = probs.ndim == 1
    names = CI_METRICS if binary else ("accuracy",)
    return {
        name: S.bootstrap_ci(
            y, probs, groups, _ci_fn(name, threshold, binary), cfg.bootstrap, cfg.ci, seed
        )
        for name in names
    }


def operating_threshold(
    y_val: np.ndarray,
    p_val: np.ndarray,
    groups: list[str] | None,
    cfg: EvaluateConfig,
    seed: int,
) -> tuple[float, dict[str, Any]]:
    """The threshold for `evaluate.target_sensitivity`, and how it was chosen.

    `point`: the highest threshold reaching the target on val. `bootstrap_lower` (default):
    the lower (1 - ci) / 2 percentile of that threshold over a patient bootstrap of val, so
    the target still holds for a new set of patients, not just for these 20-odd.
    """
    target = cfg.target_sensitivity
    point = M.threshold_for_sensitivity(y_val, p_val, target)
    rule = {"rule": cfg.threshold_rule, "point_threshold": point}
    if cfg.threshold_rule == "point" or cfg.bootstrap == 0:
        return point, rule

    def per_resample(y: np.ndarray, p: np.ndarray) -> float | None:
        return M.threshold_for_sensitivity(y, p, target) if y.any() else None

    boot = S.bootstrap_ci(y_val, p_val, groups, per_resample, cfg.bootstrap, cfg.ci, seed)
    low = boot["low"] if boot["low"] is not None else point
    return float(min(low, point)), rule | {"bootstrap_resamples": boot["n_resamples"]}


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
    """Pure: every test metric, the operating threshold and its CIs."""
    if p_test.ndim == 2:
        result = M.multiclass_metrics(y_test, p_test, classes, n_bins=cfg.calibration_bins)
        result["ci"] = confidence_intervals(y_test, p_test, groups, cfg, seed, 0.5)
        return result
    threshold, rule = operating_threshold(y_val, p_val, val_groups, cfg, seed)
    result = M.binary_metrics(y_test, p_test, threshold=0.5, n_bins=cfg.calibration_bins)
    result["positive_class"] = classes[1]
    result["operating_point"] = {
        "target_sensitivity": cfg.target_sensitivity,
        "chosen_on": "val",
        **rule,
        **M.binary_metrics(y_test, p_test, threshold=threshold),
    }
    result["ci"] = confidence_intervals(y_test, p_test, groups, cfg, seed, 0.5)
    return result


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


def gradcam_picks(
    y: np.ndarray, probs: np.ndarray, cls: int, n: int
) -> tuple[list[int], list[int]]:
    """The worst misclassified images of true class `cls` (most confident wrong), then the
    most confident correct ones, n in all."""
    pred = predicted_labels(probs)
    conf = np.where(probs >= 0.5, probs, 1 - probs) if probs.ndim == 1 else probs.max(1)
    idx = np.flatnonzero(y == cls)
    wrong = idx[pred[idx] != cls]
    right = idx[pred[idx] == cls]
    wrong = wrong[np.argsort(-conf[wrong])][: max(n // 2, n - len(right))]
    right = right[np.argsort(-conf[right])][: n - len(wrong)]
    return wrong.tolist(), right.tolist()


def gradcam_figures(
    model: Any,
    images: Callable[[list[int]], np.ndarray],
    y: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    n: int,
) -> dict[str, Any]:
    """Grad-CAM grids of the picked test images; `images(indices)` decodes just those."""
    from medimg.analysis.gradcam import grad_cam
    from medimg.analysis.plots import gradcam_grid

    figures = {}
    pred = predicted_labels(probs)
    for cls, name in enumerate(classes):
        wrong, right = gradcam_picks(y, probs, cls, n)
        picks = wrong + right
        if not picks:
            continue
        x = images(picks)
        heat = grad_cam(model, x)
        titles = [f"{'WRONG' if i in wrong else 'ok'}: {name} → {classes[pred[i]]}" for i in picks]
        figures[name] = gradcam_grid(x / 255.0, heat, titles)
    return figures


def int8_file(model: Any, params: Params, size: int, n_train: int) -> tuple[bytes, TFLiteModel]:
    """The int8 TFLite file, calibrated on a seeded sample of training images (decoded alone)."""
    cfg = params.evaluate
    picks = representative_indices(n_train, cfg.representative_samples, params.seed)
    calibration = take_images(params.paths.split, "train", size, picks.tolist())
    content = to_tflite(model, "int8", representative=calibration)
    return content, TFLiteModel(content, threads=1)


def edge_figures(
    model: Any,
    bench: np.ndarray,
    y_test: np.ndarray,
    keras_probs: np.ndarray,
    lite: tuple[bytes, TFLiteModel, np.ndarray] | None,
) -> tuple[dict[str, Any], bytes | None]:
    """TFLite int8 size, accuracy against the float model, and single-thread images/s."""
    keras_ips = images_per_second(model.predict_on_batch, bench, batch_size=32, min_seconds=1.0)
    result: dict[str, Any] = {"keras_cpu_images_per_s": round(keras_ips, 1)}
    if lite is None:
        return result, None
    check = compare_edge(*lite, keras_probs, y_test)
    result |= {
        "int8_bytes": check.size,
        "int8_accuracy": check.accuracy,
        "int8_agreement": check.agreement,
        "int8_images_per_s_1thread": round(images_per_second(check.lite.predict, bench[:64]), 1),
    }
    return result, check.content


def write_plots(
    out: Path,
    result: dict,
    y: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    cfg: EvaluateConfig,
    figures: dict[str, Any],
    train_reports: Path,
) -> None:
    from medimg.analysis.plots import (
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
    for name, fig in figures.items():
        save_figure(fig, out / f"gradcam_{name}.png")
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
    """The flat numbers `dvc metrics show` and the comparison table use."""
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
    flat |= {f"{k}_ci": [v["low"], v["high"]] for k, v in result["ci"].items()}
    flat |= {"params": train.get("params"), "keras_bytes": train.get("keras_bytes"), **edge}
    calibration = result.get("calibration", {})
    flat |= {k: calibration[k] for k in ("temperature", "ece_before") if k in calibration}
    return flat


COMPARED = ("accuracy", "sensitivity", "specificity", "roc_auc")


def dvc_metrics(flat: dict[str, Any]) -> dict[str, Any]:
    """What `dvc exp show` / `metrics diff` compare: the headline rates with their patient-
    bootstrap CIs, calibration, size and int8 accuracy (the rest is in summary.json)."""
    out: dict[str, Any] = {}
    for name in COMPARED:
        low, high = flat.get(f"{name}_ci") or (None, None)
        out |= {name: flat.get(name), f"{name}_ci_low": low, f"{name}_ci_high": high}
    keep = ("ece", "ece_before", "temperature", "keras_bytes", "int8_accuracy")
    return out | {k: flat.get(k) for k in keep}


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
    edge = int8_file(model, params, size, info["images"]["train"]) if cfg.tflite_int8 else None
    if edge is not None:
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
        "ece_before": M.expected_calibration_error(y, scored["raw"], cfg.calibration_bins),
        "ece_after": result["ece"],
        "tta": cfg.tta,
    }
    images = lambda picks: take_images(paths.split, "test", size, picks)  # noqa: E731
    bench = images(list(range(min(cfg.benchmark_images, len(y)))))
    lite = None if edge_file is None else (*edge_file, scored["int8"])
    edge, int8 = edge_figures(model, bench, y, scored["plain"], lite)
    figures = gradcam_figures(model, images, y, probs, classes, cfg.gradcam_examples)

    flat = headline(result, train_metrics, edge)
    out = paths.eval_reports(arch)
    point = result.get("operating_point", {})
    serving = ServingConfig(
        classes=list(classes),
        image_size=size,
        threshold=float(point.get("threshold", 0.5)),
        tta=cfg.tta,
        temperature=temperature,
        max_image_pixels=params.dataset.limits.max_image_pixels,
    )
    run_info = _log_model(params, run_info, paths.model_file(arch), serving, bench[:2])
    with atomic_dir(out) as tmp:
        write_plots(tmp, result, y, probs, classes, cfg, figures, paths.train_reports(arch))
        if int8 is not None:
            (tmp / "model_int8.tflite").write_bytes(int8)
        write_json(tmp / "details.json", {**result, "edge": edge, "architecture": arch})
        write_json(tmp / "run.json", run_info)  # what register reads: inside this stage's out
        write_json(tmp / "summary.json", flat)  # every headline number, for compare.md
    frame = predictions_frame(scored["paths"], patients, y, probs, classes, 0.5)
    write_text(paths.eval_predictions(arch), frame.to_csv(index=False))
    write_text(paths.eval_roc(arch), roc_csv(y, probs))
    write_json(paths.eval_metrics(arch), dvc_metrics(flat))
    files = [*sorted(out.iterdir()), paths.eval_predictions(arch), paths.eval_roc(arch)]
    _log(params, run_info, flat, files, info["fingerprint"])
    print(
        f"evaluate {arch}: accuracy {flat['accuracy']:.4f} "
        f"CI {flat['accuracy_ci']} on {len(y)} test images (T={temperature:.3f}, "
        f"ECE {result['calibration']['ece_before']:.4f} → {flat['ece']:.4f})"
    )
    return flat


def _log_model(
    params: Params, run_info: dict, keras_file: Path, serving: ServingConfig, example: np.ndarray
) -> dict[str, Any]:
    """The served model into the training run; `run_info` with its URI and id added."""
    tracking.configure(params.mlflow, params.dataset.name)
    with tracking.run(run_id=run_info["run_id"]):
        uri, model_id = log_serving_model(keras_file, serving, example)
    return {**run_info, "model_uri": uri, "model_id": model_id}


SIZES = ("params", "keras_bytes", "int8_bytes")  # counts: tags (a re-evaluation may change them)


def _log(params: Params, run_info: dict, flat: dict, files: list[Path], fingerprint: str) -> None:
    """The test numbers into the training run, linked to its logged model and the split."""
    tracking.configure(params.mlflow, params.dataset.name)
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
