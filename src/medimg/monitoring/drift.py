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


def window_drift(
    reference: Mapping[str, Any],
    window_props: Mapping[str, np.ndarray],
    *,
    alpha: float = ALPHA,
    min_statistic: float = MIN_STATISTIC,
    tolerance: float = OOD_TOLERANCE,
    max_ood_share: float = MAX_OOD_SHARE,
) -> dict[str, Any]:
    """One window's verdict: `drifted` when any property drifted or the share of
    out-of-distribution requests exceeds `max_ood_share`; with the drifted properties'
    names, the OOD share and the per-property detail (JSON-serialisable)."""
    per_property = property_drift(reference, window_props, alpha=alpha, min_statistic=min_statistic)
    flags, reasons = out_of_distribution(reference, window_props, tolerance=tolerance)
    ood_share = float(flags.mean()) if flags.size else 0.0
    drifted_props = [name for name, r in per_property.items() if r["drifted"]]
    ood_props = sorted({name for r in reasons for name in r})
    return {
        "n": int(flags.size),
        "drifted": bool(drifted_props) or ood_share > max_ood_share,
        "drifted_properties": drifted_props,
        "ood_share": ood_share,
        "ood_flagged": ood_share > max_ood_share,
        "ood_properties": ood_props,
        "properties": per_property,
    }
