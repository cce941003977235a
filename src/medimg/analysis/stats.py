"""Uncertainty and paired comparison: patient-level bootstrap CIs, rank AUC, McNemar.

Cells of one patient are not independent, so intervals resample patients, not cells; the
promotion gate compares two models on the same test images with McNemar's test.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

MCNEMAR_EXACT_BELOW = 25


# ----------------------------------------------------------------------------------- bootstrap


def rank_auc(y_true: ArrayLike, p_pos: ArrayLike) -> float:
    """Binary ROC AUC as the Mann-Whitney U statistic (ties get average ranks).

    Equal to `sklearn.metrics.roc_auc_score` but without its input validation, which makes it
    ~15x faster inside a 1,000-resample bootstrap. Raises ValueError with one class present, so
    `bootstrap_ci` skips such resamples.
    """
    y = np.asarray(y_true).astype(bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both classes")
    ranks = stats.rankdata(p_pos)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _group_layout(groups: ArrayLike | None, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ordered by group, and each group's start offset and size in that order."""
    if groups is None:
        return np.arange(n), np.arange(n), np.ones(n, dtype=np.int64)
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups shape {g.shape} does not match {n} rows")
    _, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return order, starts, counts


def _resample_rows(
    order: np.ndarray, starts: np.ndarray, counts: np.ndarray, drawn: np.ndarray
) -> np.ndarray:
    """Row indices of the drawn groups, concatenated, without a python loop over groups."""
    sizes = counts[drawn]
    ends = np.cumsum(sizes)
    offsets = np.repeat(starts[drawn] - (ends - sizes), sizes)
    return order[offsets + np.arange(ends[-1])]


def _safe_metric(fn: Callable[..., Any], y: np.ndarray, s: np.ndarray) -> float | None:
    """The metric as a float, or None when it is undefined on this sample."""
    try:
        value = fn(y, s)
    except (ValueError, ZeroDivisionError):
        return None
    if value is None or not np.isfinite(value):
        return None
    return float(value)


def bootstrap_ci(
    y_true: ArrayLike,
    scores: ArrayLike,
    groups: ArrayLike | None,
    metric_fn: Callable[[np.ndarray, np.ndarray], float | None],
    n_resamples: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Percentile confidence interval of `metric_fn(y, scores)` by a cluster bootstrap.

    Cells of one patient are correlated, so resampling rows would understate the variance;
    whole groups (patients) are drawn with replacement instead. `groups=None` treats every row
    as its own group. Resamples where the metric is undefined (it raises ValueError, returns
    None or NaN, e.g. an AUC with one class) are skipped; `n_resamples` in the result is the
    number actually used, `n_requested` the number drawn. Same seed, same interval.
    """
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    y, s = np.asarray(y_true), np.asarray(scores)
    if y.shape[0] == 0 or y.shape[0] != s.shape[0]:
        raise ValueError("y_true and scores must have the same, non-zero number of rows")
    order, starts, counts = _group_layout(groups, y.shape[0])
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, counts.size, size=(n_resamples, counts.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        point = _safe_metric(metric_fn, y, s)
        values = [
            _safe_metric(metric_fn, y[rows], s[rows])
            for rows in (_resample_rows(order, starts, counts, d) for d in drawn)
        ]
    kept = np.array([v for v in values if v is not None], dtype=np.float64)
    low = high = None
    if kept.size:
        tail = (1.0 - ci) / 2.0 * 100.0
        low, high = (float(v) for v in np.percentile(kept, [tail, 100.0 - tail]))
    return {
        "point": point,
        "low": low,
        "high": high,
        "ci": float(ci),
        "n_resamples": int(kept.size),
        "n_requested": int(n_resamples),
        "n_groups": int(counts.size),
    }


# ------------------------------------------------------------------------------------- mcnemar


def mcnemar(a_correct: ArrayLike, b_correct: ArrayLike) -> dict[str, Any]:
    """McNemar's test that two classifiers scored on the same items have equal error rates.

    Only the discordant items carry information: `b01` = A wrong & B right, `b10` = A right &
    B wrong. Below 25 discordant pairs the chi-square approximation is poor, so the exact
    two-sided binomial test is used (`statistic` = min(b01, b10)); otherwise the chi-square
    with continuity correction, max(|b01 - b10| - 1, 0)^2 / (b01 + b10), 1 degree of freedom.
    """
    a = np.asarray(a_correct).astype(bool)
    b = np.asarray(b_correct).astype(bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("a_correct and b_correct must be 1-D arrays of the same length")
    b01, b10 = int(np.sum(~a & b)), int(np.sum(a & ~b))
    n = b01 + b10
    if n < MCNEMAR_EXACT_BELOW:
        k = min(b01, b10)
        p_value = stats.binomtest(k, n, 0.5).pvalue if n else 1.0
        statistic, method = float(k), "exact"
    else:
        statistic = max(abs(b01 - b10) - 1, 0) ** 2 / n
        p_value, method = stats.chi2.sf(statistic, df=1), "chi2_cc"
    return {
        "b01": b01,
        "b10": b10,
        "statistic": float(statistic),
        "p_value": float(min(p_value, 1.0)),
        "method": method,
    }
