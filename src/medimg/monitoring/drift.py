"""Drift of a window of requests against a reference (`reference.build_reference`).

Two questions, two checks:

- *Has the population moved?* `property_drift`: per property, the Kolmogorov-Smirnov
  statistic D of the window against the reference CDF, computed directly (not with
  `scipy.stats.ks_2samp` on samples rebuilt from the quantiles, which would invent ties and
  cost memory). The reference CDF is piecewise linear between the stored quantiles, with a
  jump where quantiles tie (size, width, height are integers). The p-value treats the test
  as two-sample: the reference is itself n_ref images, so the effective size is
  n_eff = n * n_ref / (n + n_ref) and p = `scipy.stats.kstwo.sf(D, round(n_eff))`.
  A property drifts when D > min_statistic + c, c the KS critical value at level
  alpha / number of properties (Bonferroni: ten tests per window). That tests "the true
  distance exceeds min_statistic", not "the distributions differ": by the triangle
  inequality D <= D_true + noise, and noise <= c with probability 1 - alpha/k, so a window
  whose population is within min_statistic of the reference is flagged with probability at
  most alpha/k per property. A plain p-value test (D > c) alarms on new patients' normal
  stain variation (D ~ 0.25 on real cells) once windows are large enough to see it, and
  D > min_statistic alone alarms on small windows' noise; the sum does neither, at the cost
  that a small window only notices a large shift (n=25: D > ~0.67).
- *Is this request something the model has never seen?* `out_of_distribution`: a request
  whose any property lies outside the reference's [0.1%, 99.9%] quantile range widened by
  `tolerance` times that range (an OCT scan sent to a cell model: saturation 0). One such
  request is not drift (0.1% tails are hit by chance: 0.9% of new patients' clean cells on
  the real set, mostly saturation); a window is flagged when their share exceeds `max_ood_share`.

Everything is pure: reference dict + column-wise window properties (`properties_table`'s
output) in, plain dicts out, so a job can log them anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import stats

ALPHA = 0.01
# KS distance below which a shift is not reported, however small its p-value. Cells of two
# disjoint groups of NIH patients (bench/monitor.py: 100 reference patients vs the other 40,
# three random splits) differ by up to D = 0.27 (saturation, contrast): stain and smear vary
# from patient to patient, and new patients are not drift. 0.3 sits just above that. The
# window's sampling noise is added on top (property_drift), not folded into this number.
MIN_STATISTIC = 0.3
OOD_LOW, OOD_HIGH = 0.001, 0.999
OOD_TOLERANCE = 0.1
MAX_OOD_SHARE = 0.1


def _quantiles(reference: Mapping[str, Any], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(levels, values) of one property, as arrays."""
    levels = np.asarray(reference["levels"], dtype=np.float64)
    values = np.asarray(reference["properties"][name]["quantiles"], dtype=np.float64)
    return levels, values


def reference_cdf(
    reference: Mapping[str, Any], name: str, x: np.ndarray, *, left: bool = False
) -> np.ndarray:
    """P(X <= x) (or P(X < x) with `left`) under the reference of property `name`.

    Piecewise linear between stored quantiles; where quantiles tie the CDF jumps (the left
    limit is the run's first level, the right limit its last), so a discrete property is
    not smeared into a continuous one."""
    levels, q = _quantiles(reference, name)
    x = np.asarray(x, dtype=np.float64)
    j = np.searchsorted(q, x, side="left" if left else "right")
    inside = (j > 0) & (j < q.size)
    jj = np.clip(j, 1, q.size - 1)
    q0, q1 = q[jj - 1], q[jj]
    l0, l1 = levels[jj - 1], levels[jj]
    span = np.where(q1 > q0, q1 - q0, 1.0)
    frac = np.clip((x - q0) / span, 0.0, 1.0)
    interp = l0 + frac * (l1 - l0)
    return np.where(inside, interp, np.where(j == 0, 0.0, 1.0))


def ks_statistic(reference: Mapping[str, Any], name: str, sample: np.ndarray) -> float:
    """The KS distance sup |F_window - F_reference| of one property: both one-sided gaps
    at each sorted sample point, using the CDF's right limit for the upper gap and its left
    limit for the lower one (exact for a reference CDF with jumps)."""
    x = np.sort(np.asarray(sample, dtype=np.float64))
    n = x.size
    if n == 0:
        raise ValueError("empty window")
    i = np.arange(1, n + 1, dtype=np.float64)
    d_plus = np.max(i / n - reference_cdf(reference, name, x))
    d_minus = np.max(reference_cdf(reference, name, x, left=True) - (i - 1) / n)
    return float(max(d_plus, d_minus, 0.0))


def property_drift(
    reference: Mapping[str, Any],
    window_props: Mapping[str, np.ndarray],
    *,
    alpha: float = ALPHA,
    min_statistic: float = MIN_STATISTIC,
) -> dict[str, dict[str, Any]]:
    """Per property of the reference present in `window_props`: statistic (KS D), p_value
    (of "no difference at all", for reading), critical (c at the Bonferroni level), drifted
    (D > min_statistic + c: see the module docstring), and the window's and reference's means
    (what a person reads first: darker? blurrier?)."""
    names = [n for n in reference["properties"] if n in window_props]
    if not names:
        raise ValueError("the window has none of the reference's properties")
    threshold = alpha / len(names)
    n_ref = int(reference["n"])
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        sample = np.asarray(window_props[name], dtype=np.float64)
        d = ks_statistic(reference, name, sample)
        n_eff = max(1, round(sample.size * n_ref / (sample.size + n_ref)))
        p = float(stats.kstwo.sf(d, n_eff))
        critical = float(stats.kstwo.isf(threshold, n_eff))
        out[name] = {
            "statistic": d,
            "p_value": p,
            "critical": critical,
            "drifted": bool(d > min_statistic + critical),
            "window_mean": float(sample.mean()),
            "reference_mean": float(reference["properties"][name]["mean"]),
        }
    return out


def ood_bounds(
    reference: Mapping[str, Any], *, tolerance: float = OOD_TOLERANCE
) -> dict[str, tuple[float, float]]:
    """Per property, the accepted [low, high]: the reference's 0.1%..99.9% quantile range
    widened on each side by `tolerance` times its width (so a constant property, width 0,
    accepts only its value)."""
    levels = np.asarray(reference["levels"], dtype=np.float64)
    lo_i = int(np.argmin(np.abs(levels - OOD_LOW)))
    hi_i = int(np.argmin(np.abs(levels - OOD_HIGH)))
    bounds = {}
    for name, prop in reference["properties"].items():
        lo, hi = float(prop["quantiles"][lo_i]), float(prop["quantiles"][hi_i])
        pad = tolerance * (hi - lo)
        bounds[name] = (lo - pad, hi + pad)
    return bounds


def out_of_distribution(
    reference: Mapping[str, Any],
    window_props: Mapping[str, np.ndarray],
    *,
    tolerance: float = OOD_TOLERANCE,
) -> tuple[np.ndarray, list[list[str]]]:
    """Per request: whether it is out of distribution, and which properties put it there."""
    bounds = ood_bounds(reference, tolerance=tolerance)
    names = [n for n in bounds if n in window_props]
    n = len(np.asarray(window_props[names[0]])) if names else 0
    reasons: list[list[str]] = [[] for _ in range(n)]
    for name in names:
        lo, hi = bounds[name]
        values = np.asarray(window_props[name], dtype=np.float64)
        for i in np.flatnonzero((values < lo) | (values > hi)):
            reasons[int(i)].append(name)
    flags = np.array([bool(r) for r in reasons], dtype=bool)
    return flags, reasons


# ------------------------------------------------------------------------- a served window

GROUPS = ("properties", "embedding", "predictions")
MAX_LISTED_OOD = 200  # out-of-distribution requests listed one by one in the summary


def reference_group(reference: Mapping[str, Any], group: str) -> Mapping[str, Any] | None:
    """The reference of one group: the top level for image properties, else its sub-dict of
    the same shape; None when the reference has no such group."""
    ref = reference if group == "properties" else reference.get(group)
    return ref if isinstance(ref, Mapping) and isinstance(ref.get("properties"), Mapping) else None


def check_window(
    reference: Mapping[str, Any],
    window: Mapping[str, np.ndarray],
    *,
    alpha: float = ALPHA,
    min_statistic: Mapping[str, float] | None = None,
    tolerance: float = OOD_TOLERANCE,
    max_ood_share: float = MAX_OOD_SHARE,
    min_requests: int = 25,
    decisions: np.ndarray | None = None,
    ids: np.ndarray | None = None,
) -> dict[str, Any]:
    """The verdict on a window of served requests (`medimg monitor`), JSON-serialisable.

    Three groups of columns, each tested against its part of the reference with the KS rule of
    `property_drift`: the image properties, the embedding components (`emb_i`) and the served
    probabilities (`p_<class>`); `alpha` is shared over the groups present (each splits its
    share over its columns). Plus the out-of-distribution share (per-request flags, from the
    properties) and, with `decisions`, the decided-class shares beside the reference's.
    `min_statistic`: per group (default MIN_STATISTIC each). A window under `min_requests` is
    reported but never drifted. `reasons`: one line per finding, naming what and how much.
    """
    floors = {g: MIN_STATISTIC for g in GROUPS} | dict(min_statistic or {})
    n = len(next(iter(window.values()))) if window else 0
    present = {}
    for group in GROUPS:
        ref = reference_group(reference, group)
        if ref is None:
            continue
        cols = {}
        for name in ref.get("properties", {}):
            if name in window:
                values = np.asarray(window[name], dtype=np.float64)
                values = values[np.isfinite(values)]
                if values.size:
                    cols[name] = values
        if cols:
            present[group] = (ref, cols)
    groups: dict[str, Any] = {}
    reasons: list[str] = []
    enough = n >= min_requests
    for group, (ref, cols) in present.items():
        rows = property_drift(ref, cols, alpha=alpha / len(present), min_statistic=floors[group])
        for name, r in rows.items():
            r["threshold"] = floors[group] + r["critical"]
            r["drifted"] = bool(r["drifted"] and enough)
            if r["drifted"]:
                reasons.append(
                    f"{group}/{name}: KS {r['statistic']:.3f} > {r['threshold']:.3f} (window "
                    f"mean {r['window_mean']:.4g}, reference {r['reference_mean']:.4g})"
                )
        groups[group] = rows
    ood: dict[str, Any] = {"share": 0.0, "count": 0, "flagged": False, "properties": {}}
    ood["max_share"] = max_ood_share
    if n:
        flags, why = out_of_distribution(reference, window, tolerance=tolerance)
        counts: dict[str, int] = {}
        for r in why:
            for name in r:
                counts[name] = counts.get(name, 0) + 1
        share = float(flags.mean())
        listed = [
            {"id": None if ids is None else str(ids[i]), "properties": why[i]}
            for i in np.flatnonzero(flags)[:MAX_LISTED_OOD]
        ]
        ood |= {"share": share, "count": int(flags.sum()), "properties": counts}
        ood |= {"flagged": bool(share > max_ood_share and enough), "requests": listed}
        if ood["flagged"]:
            reasons.append(
                f"out of distribution: {ood['count']}/{n} requests ({share:.1%} > "
                f"{max_ood_share:.0%}), by {', '.join(sorted(counts))}"
            )
    summary: dict[str, Any] = {
        "n": n,
        "enough_requests": enough,
        "drifted": bool(reasons),
        "reasons": reasons,
        "groups": groups,
        "ood": ood,
        "thresholds": {
            "alpha": alpha,
            "min_statistic": floors,
            "max_ood_share": max_ood_share,
            "ood_tolerance": tolerance,
            "min_requests": min_requests,
        },
    }
    predictions = reference.get("predictions") or {}
    if decisions is not None and "class_share" in predictions:
        decided = np.asarray(decisions).astype(str)
        classes = list(predictions["class_share"])
        summary["class_share"] = {
            "window": {c: float(np.mean(decided == c)) if n else 0.0 for c in classes},
            "reference": dict(predictions["class_share"]),
        }
    return summary


def drift_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The numbers a monitoring run logs every time (not only on drift): each column's KS
    distance as `drift_<group>_<column>`, the OOD share, the verdict as 0/1, the window size."""
    out: dict[str, float] = {
        "n_requests": float(summary["n"]),
        "drifted": float(bool(summary["drifted"])),
        "ood_share": float(summary["ood"]["share"]),
    }
    for group, rows in summary["groups"].items():
        for name, r in rows.items():
            out[f"drift_{group}_{name}"] = float(r["statistic"])
        if rows:
            out[f"drift_{group}_max"] = max(float(r["statistic"]) for r in rows.values())
    for name, share in (summary.get("class_share") or {}).get("window", {}).items():
        out[f"class_share_{name}"] = float(share)
    return out
