"""Evaluation metrics as plain, JSON-ready numbers.

The evaluate stage writes these dicts straight to `metrics.json` (tracked by DVC) and to MLflow,
so every value is a python `float`/`int`/`None`/`list`/`dict`: no numpy scalars, no NaN. A metric
that is undefined on the data at hand (an AUC with one class present, a precision with no
positive prediction) is `None` or 0 by a documented rule rather than a warning or a crash,
because a small or skewed test split must still produce a report.

Conventions: labels are integer class indices; for binary problems class 1 is the positive
class (the caller maps e.g. Parasitized to 1) and a sample is called positive when its
probability is `>= threshold`, the same rule `sklearn.metrics.roc_curve` uses for its thresholds.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn import metrics as skm

# ---------------------------------------------------------------------------------- validation


def predicted_labels(probs: ArrayLike, threshold: float = 0.5) -> np.ndarray:
    """Class indices from model outputs: binary (N,) or (N, 1) sigmoid → p >= threshold;
    (N, K) softmax → argmax. The one decision rule of evaluation, scoring and the edge file."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1 or (p.ndim == 2 and p.shape[1] == 1):
        return (p.reshape(-1) >= threshold).astype(np.int64)
    if p.ndim == 2:
        return np.argmax(p, axis=1)
    raise ValueError(f"predictions must be (N,), (N, 1) or (N, K), got shape {p.shape}")


def _labels(y_true: ArrayLike) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"y_true must be a non-empty 1-D array, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0):
        raise ValueError("y_true must hold integer class indices")
    return y.astype(np.int64)


def _binary(y_true: ArrayLike, p_pos: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = _labels(y_true)
    p = np.asarray(p_pos, dtype=np.float64)
    if p.shape != y.shape:
        raise ValueError(f"p_pos shape {p.shape} does not match y_true shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("binary y_true must only hold 0 and 1")
    if not np.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise ValueError("p_pos must be finite probabilities in [0, 1]")
    return y, p


def _multiclass(y_true: ArrayLike, probs: ArrayLike, n_classes: int) -> tuple[np.ndarray, ...]:
    y = _labels(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (y.size, n_classes):
        raise ValueError(
            f"probs shape {p.shape} is not (n_samples, n_classes) = {(y.size, n_classes)}"
        )
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y_true holds a class index outside 0..{n_classes - 1}")
    if not np.isfinite(p).all():
        raise ValueError("probs must be finite")
    return y, p


def _ratio(num: float, den: float) -> float:
    """0/0 is reported as 0.0, matching sklearn's `zero_division=0` for the other rates."""
    return float(num / den) if den else 0.0


def _jsonable(obj: Any) -> Any:
    """Turn numpy scalars/arrays (and NaN) into what `json.dumps` writes without surprises."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | np.ndarray):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return None if math.isnan(obj) else float(obj)
    return obj


def _mcc(y: np.ndarray, y_pred: np.ndarray) -> float:
    """sklearn defines MCC as 0 when a row/column of the table is empty; only silence its hint."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return float(skm.matthews_corrcoef(y, y_pred))


# --------------------------------------------------------------------------------- calibration


def _calibration_bins(y_true: ArrayLike, probs: ArrayLike, n_bins: int) -> dict[str, np.ndarray]:
    """Per-bin confidence, observed frequency and count on equal-width bins (lo, hi].

    1-D `probs` are binary positive-class probabilities compared with the positive rate;
    2-D `probs` are reduced to the top label and compared with top-label accuracy.
    """
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim not in (1, 2):
        raise ValueError(f"probs must be 1-D (binary) or 2-D (multiclass), got shape {p.shape}")
    if p.ndim == 1:
        y, conf = _binary(y_true, p)
        hit = y.astype(np.float64)
    else:
        y, p = _multiclass(y_true, p, p.shape[1])
        conf, hit = p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges[1:-1], conf, side="left"), 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    safe = np.maximum(count, 1)
    return {
        "edges": edges,
        "count": count,
        "confidence": np.bincount(idx, weights=conf, minlength=n_bins) / safe,
        "observed": np.bincount(idx, weights=hit, minlength=n_bins) / safe,
    }


def _ece(b: dict[str, np.ndarray]) -> float:
    gap = np.abs(b["observed"] - b["confidence"])
    return float(np.sum(gap * b["count"]) / b["count"].sum())


def expected_calibration_error(y_true: ArrayLike, probs: ArrayLike, n_bins: int = 10) -> float:
    """Count-weighted mean |observed - predicted| over equal-width bins.

    Accuracy alone hides over-confidence; a screening threshold chosen on probabilities is only
    meaningful when they are calibrated, so the report carries ECE next to the Brier score.
    Binary: `probs` is P(positive) per sample. Multiclass: (N, K) and the top label is used.
    """
    return _ece(_calibration_bins(y_true, probs, n_bins))


def reliability_curve(y_true: ArrayLike, probs: ArrayLike, n_bins: int = 10) -> dict[str, Any]:
    """The points of a reliability diagram (non-empty bins only) plus the bin edges and ECE."""
    b = _calibration_bins(y_true, probs, n_bins)
    keep = b["count"] > 0
    return _jsonable(
        {
            "edges": b["edges"],
            "bin_lower": b["edges"][:-1][keep],
            "bin_upper": b["edges"][1:][keep],
            "mean_predicted": b["confidence"][keep],
            "observed": b["observed"][keep],
            "count": b["count"][keep],
            "ece": _ece(b),
        }
    )


# -------------------------------------------------------------------------------------- binary


def _ranking_scores(y: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
    """AUCs need both classes; with one present they are undefined, not 0.5 or 1."""
    if np.unique(y).size < 2:
        return {"roc_auc": None, "pr_auc": None}
    return {
        "roc_auc": float(skm.roc_auc_score(y, p)),
        "pr_auc": float(skm.average_precision_score(y, p)),
    }


def binary_metrics(
    y_true: ArrayLike, p_pos: ArrayLike, threshold: float = 0.5, *, n_bins: int = 10
) -> dict[str, Any]:
    """Threshold, ranking and calibration metrics of a binary classifier, class 1 positive.

    Sensitivity and specificity are reported separately because a screening test is judged on
    missed infections (sensitivity) at an acceptable false-alarm rate, which accuracy blends.
    """
    y, p = _binary(y_true, p_pos)
    y_pred = predicted_labels(p, threshold)
    cm = skm.confusion_matrix(y, y_pred, labels=[0, 1])
    tn, fp, fn, tp = (int(v) for v in cm.ravel())
    return {
        "threshold": float(threshold),
        "accuracy": float(skm.accuracy_score(y, y_pred)),
        "precision": _ratio(tp, tp + fp),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        **_ranking_scores(y, p),
        "mcc": _mcc(y, y_pred),
        "brier": float(skm.brier_score_loss(y, p, labels=[0, 1])),
        "ece": expected_calibration_error(y, p, n_bins),
        "confusion_matrix": cm.tolist(),
        "tn": tn,
        "fp": fp,
        "fn": fn,
        "tp": tp,
        "support": {"negative": tn + fp, "positive": tp + fn, "total": int(y.size)},
    }


# ---------------------------------------------------------------------------------- multiclass


def _specificities(cm: np.ndarray) -> np.ndarray:
    """One-vs-rest TN / (TN + FP) per class, straight from the confusion matrix."""
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    tn = cm.sum() - cm.sum(axis=1) - fp
    den = tn + fp
    return np.divide(tn, den, out=np.zeros(len(cm)), where=den > 0)


def _ovr_aucs(y: np.ndarray, p: np.ndarray) -> list[float | None]:
    """One-vs-rest ROC AUC per class; None for a class that is absent (or alone) in y."""
    out: list[float | None] = []
    for k in range(p.shape[1]):
        yk = (y == k).astype(np.int64)
        out.append(float(skm.roc_auc_score(yk, p[:, k])) if 0 < yk.sum() < yk.size else None)
    return out


def _macro(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def multiclass_metrics(
    y_true: ArrayLike, probs: ArrayLike, class_names: Sequence[str], *, n_bins: int = 10
) -> dict[str, Any]:
    """Macro and per-class metrics for K-class probabilities (argmax decision).

    Macro averages weigh every class equally so a rare class (e.g. DRUSEN in OCT2017) cannot be
    hidden by the frequent ones; the macro ROC AUC averages only the classes where it is defined.
    """
    names = [str(c) for c in class_names]
    y, p = _multiclass(y_true, probs, len(names))
    labels = list(range(len(names)))
    y_pred = p.argmax(axis=1)
    cm = skm.confusion_matrix(y, y_pred, labels=labels)
    prec, rec, f1, support = skm.precision_recall_fscore_support(
        y, y_pred, labels=labels, zero_division=0
    )
    spec, aucs = _specificities(cm), _ovr_aucs(y, p)
    per_class = {
        name: {
            "precision": float(prec[k]),
            "sensitivity": float(rec[k]),
            "specificity": float(spec[k]),
            "f1": float(f1[k]),
            "roc_auc": aucs[k],
            "support": int(support[k]),
        }
        for k, name in enumerate(names)
    }
    report = skm.classification_report(
        y, y_pred, labels=labels, target_names=names, output_dict=True, zero_division=0
    )
    return _jsonable(
        {
            "accuracy": float(skm.accuracy_score(y, y_pred)),
            "precision": float(prec.mean()),
            "sensitivity": float(rec.mean()),
            "specificity": float(spec.mean()),
            "f1": float(f1.mean()),
            "roc_auc": _macro(aucs),
            "mcc": _mcc(y, y_pred),
            "brier": float(skm.brier_score_loss(y, p, labels=labels)),
            "ece": expected_calibration_error(y, p, n_bins),
            "confusion_matrix": cm.tolist(),
            "class_names": names,
            "per_class": per_class,
            "classification_report": report,
            "support": int(y.size),
        }
    )


# ----------------------------------------------------------------------------------- threshold


def threshold_for_sensitivity(y_true: ArrayLike, p_pos: ArrayLike, target: float) -> float:
    """The highest threshold whose sensitivity on these (validation) data is >= `target`.

    Highest, because among thresholds meeting the sensitivity floor it has the best
    specificity. Positives are `p >= threshold`, as in `binary_metrics`.

    Fallback: with no positive sample in `y_true` sensitivity is undefined, so 0.0 is returned
    (everything flagged positive, the safe side for a screening test) with a RuntimeWarning.
    With at least one positive every target in (0, 1] is reachable at the lowest score.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    y, p = _binary(y_true, p_pos)
    if not y.any():
        msg = "no positive sample: sensitivity is undefined, returning threshold 0.0"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return 0.0
    _, tpr, thresholds = skm.roc_curve(y, p, drop_intermediate=False)
    first = int(np.argmax(tpr >= target - 1e-12))
    return float(thresholds[first])
