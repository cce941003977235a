"""Temperature scaling: fitted on labels, identity at T=1, ranking preserved, ECE reduced."""

from __future__ import annotations

import numpy as np
import pytest

from medimg.analysis.calibration import apply_temperature, fit_temperature
from medimg.analysis.metrics import expected_calibration_error


def _overconfident(n: int = 4000, seed: int = 0):
    """Labels drawn from true probabilities q; the 'model' reports q sharpened 3x."""
    rng = np.random.default_rng(seed)
    logit = rng.normal(0, 1.5, n)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(int)
    return y, 1 / (1 + np.exp(-3 * logit))


def test_fit_recovers_the_sharpening_and_lowers_ece():
    y, p = _overconfident()
    t = fit_temperature(y, p)
    assert t == pytest.approx(3.0, rel=0.15)
    calibrated = apply_temperature(p, t)
    assert expected_calibration_error(y, calibrated) < expected_calibration_error(y, p) / 2
    assert np.array_equal(np.argsort(calibrated), np.argsort(p))  # ranking (AUC) unchanged


def test_identity_and_softmax_rows():
    p = np.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(apply_temperature(p, 1.0), p)
    rows = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    soft = apply_temperature(rows, 2.0)
    np.testing.assert_allclose(soft.sum(axis=1), 1.0)
    assert (soft.argmax(1) == rows.argmax(1)).all() and soft.max() < rows.max()


def test_one_class_present_keeps_t_at_one():
    assert fit_temperature(np.ones(10), np.full(10, 0.8)) == 1.0
