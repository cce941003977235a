"""The operating point: which threshold the served model applies, and the patient-bootstrap CIs
of the rates at it.

The threshold is chosen on val for `evaluate.target_sensitivity` by `evaluate.threshold_rule`
(`bench/threshold_rules.py` measures how each rule transfers to unseen patients); intervals
resample patients, not cells, because cells of one patient are not independent. Pure
functions: the evaluate stage and the benches call them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medimg.analysis.metrics import threshold_for_sensitivity
from medimg.analysis.stats import bootstrap_ci, rank_auc
from medimg.config import EvaluateConfig

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
        "roc_auc": rank_auc,
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
        name: bootstrap_ci(
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

    `point`: the highest threshold reaching the target on val. `bootstrap_lower`: the lower
    (1 - ci) / 2 percentile of that threshold over a patient bootstrap of val, so the target
    still holds for a new set of patients, not just for these 20-odd. `optimism`: the point
    threshold for the target raised by the shortfall a patient bootstrap predicts (see
    `sensitivity_optimism`): on average the target holds on new patients, without the
    specificity the lower percentile gives away.
    """
    target = cfg.target_sensitivity
    point = threshold_for_sensitivity(y_val, p_val, target)
    rule = {"rule": cfg.threshold_rule, "point_threshold": point}
    if cfg.threshold_rule == "point" or cfg.bootstrap == 0:
        return point, rule
    if cfg.threshold_rule == "optimism":
        optimism = sensitivity_optimism(y_val, p_val, groups, target, cfg.bootstrap, seed)
        corrected = min(1.0, target + optimism)
        threshold = min(threshold_for_sensitivity(y_val, p_val, corrected), point)
        return threshold, rule | {"optimism": optimism, "corrected_target": corrected}

    def per_resample(y: np.ndarray, p: np.ndarray) -> float | None:
        return threshold_for_sensitivity(y, p, target) if y.any() else None

    boot = bootstrap_ci(y_val, p_val, groups, per_resample, cfg.bootstrap, cfg.ci, seed)
    low = float(min(boot["low"] if boot["low"] is not None else point, point))
    rule |= {"bootstrap_resamples": boot["n_resamples"], "bootstrap_threshold": low}
    if cfg.max_specificity_cost is None:
        return low, rule
    capped = specificity_capped(y_val, p_val, low, point, cfg.max_specificity_cost)
    return capped, rule | {"max_specificity_cost": cfg.max_specificity_cost}


def specificity_capped(
    y_val: np.ndarray, p_val: np.ndarray, low: float, point: float, cost: float
) -> float:
    """The lowest threshold in [low, point] whose val specificity is at most `cost` below the
    point threshold's.

    The bootstrap's lower percentile buys a sensitivity margin for new patients, but on a
    small val set it can fall far into the negatives (0.04 on the synthetic default: test
    specificity 0.55); this bounds what the margin may cost. With real cells a cost of 0.05
    left the bootstrap threshold almost unchanged (0.311 → 0.324, README "Which threshold
    rule").
    """
    y, p = np.asarray(y_val), np.asarray(p_val, dtype=float)
    negatives = p[y == 0]
    if negatives.size == 0 or low >= point:
        return float(min(low, point))

    def specificity(t: float) -> float:
        return float(np.mean(negatives < t))

    floor = specificity(point) - cost
    candidates = np.unique(np.concatenate([p[(p >= low) & (p <= point)], [low, point]]))
    allowed = [t for t in candidates if specificity(t) >= floor - 1e-12]
    return float(min(allowed))


def patient_resamples(
    groups: list[str] | None, n_rows: int, n: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`n` draws of whole patients with replacement (every row its own patient when `groups`
    is None), the unit that varies between val and the clinic: (rows drawn, rows of the
    patients left out)."""
    keys = np.arange(n_rows) if groups is None else np.asarray(groups)
    _, inverse = np.unique(keys, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    rows = [np.flatnonzero(inverse == g) for g in range(n_groups)]
    rng = np.random.default_rng(seed)
    out = []
    for draw in rng.integers(0, n_groups, (n, n_groups)):
        left_out = np.setdiff1d(np.arange(n_groups), draw)
        held = np.concatenate([rows[g] for g in left_out]) if left_out.size else np.zeros(0, int)
        out.append((np.concatenate([rows[g] for g in draw]), held))
    return out


def sensitivity_optimism(
    y: np.ndarray, p: np.ndarray, groups: list[str] | None, target: float, n: int, seed: int
) -> float:
    """How much sensitivity a threshold picked for `target` loses on patients it was not
    picked on (>= 0): per patient resample of val, the sensitivity at the threshold picked on
    the resample minus that threshold's on the patients the resample left out, averaged.

    The highest threshold that just reaches the target on the data at hand over-promises.
    Measured on the left-out patients, not on the whole of val (Efron's optimism): on real
    cells that version saw a third of the shortfall repeated patient splits showed
    (bench/threshold_rules.py), because val contains the resample's own patients."""
    y, p = np.asarray(y), np.asarray(p)
    if not y.any():
        return 0.0
    gaps = []
    for drawn, held in patient_resamples(groups, len(y), n, seed):
        yb, pb, yh = y[drawn], p[drawn], y[held]
        if not yb.any() or not yh.any():
            continue
        t = threshold_for_sensitivity(yb, pb, target)
        gaps.append(np.mean(pb[yb == 1] >= t) - np.mean(p[held][yh == 1] >= t))
    return float(max(0.0, np.mean(gaps))) if gaps else 0.0
