"""The operating threshold's rules: the bootstrap margin, and the cap on what it may cost."""

from __future__ import annotations

import numpy as np

from medimg.analysis.operating import operating_threshold, specificity_capped
from medimg.config import EvaluateConfig


def _val(seed: int = 0, patients: int = 12, cells: int = 20):
    rng = np.random.default_rng(seed)
    y = rng.random(patients * cells) < 0.5
    p = np.clip(np.where(y, rng.normal(0.7, 0.2, y.size), rng.normal(0.3, 0.2, y.size)), 0, 1)
    groups = [f"P{i // cells}" for i in range(y.size)]
    return y.astype(int), p, groups


def _specificity(y, p, t):
    return float(np.mean(p[y == 0] < t))


def test_cap_bounds_the_specificity_the_margin_costs():
    y, p, _ = _val()
    point, low = 0.6, 0.05
    t = specificity_capped(y, p, low, point, 0.05)
    assert low <= t <= point
    assert _specificity(y, p, t) >= _specificity(y, p, point) - 0.05 - 1e-12
    # the lowest such threshold: one step lower would cost more than the cap
    lower = p[p < t]
    if lower.size and lower.max() >= low:
        assert _specificity(y, p, lower.max()) < _specificity(y, p, point) - 0.05


def test_no_cap_or_a_loose_cap_keeps_the_bootstrap_threshold():
    y, p, groups = _val(1)
    free = EvaluateConfig(bootstrap=200, max_specificity_cost=None)
    loose = EvaluateConfig(bootstrap=200, max_specificity_cost=1.0)
    t_free, rule = operating_threshold(y, p, groups, free, 0)
    t_loose, _ = operating_threshold(y, p, groups, loose, 0)
    assert t_free == rule["bootstrap_threshold"] == t_loose
    t_tight, tight_rule = operating_threshold(y, p, groups, EvaluateConfig(bootstrap=200), 0)
    assert t_free <= t_tight <= tight_rule["point_threshold"]
    assert tight_rule["max_specificity_cost"] == 0.05


def test_zero_cost_is_the_point_threshold():
    y, p, groups = _val(2)
    cfg = EvaluateConfig(bootstrap=200, max_specificity_cost=0.0)
    t, rule = operating_threshold(y, p, groups, cfg, 0)
    assert _specificity(y, p, t) == _specificity(y, p, rule["point_threshold"])
