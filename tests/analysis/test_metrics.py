"""medimg.analysis.metrics against sklearn and hand-computed values."""

from __future__ import annotations

import json
import math
import time
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from medimg.analysis.metrics import (
    binary_metrics,
    expected_calibration_error,
    multiclass_metrics,
    reliability_curve,
    threshold_for_sensitivity,
)
from medimg.analysis.stats import bootstrap_ci, mcnemar, rank_auc

Y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
P = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9, 0.2, 0.55, 0.65, 0.05])


def test_binary_metrics_agree_with_sklearn() -> None:
    m = binary_metrics(Y, P, threshold=0.5)
    pred = (P >= 0.5).astype(int)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(Y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(Y, pred))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(Y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(Y, pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(Y, P))
    assert m["pr_auc"] == pytest.approx(skm.average_precision_score(Y, P))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(Y, pred))
    assert m["brier"] == pytest.approx(skm.brier_score_loss(Y, P))
    assert m["confusion_matrix"] == skm.confusion_matrix(Y, pred).tolist()
    # 5 negatives, one of them (0.8) above the threshold -> specificity 4/5.
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (4, 1, 1, 4)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["support"] == {"negative": 5, "positive": 5, "total": 10}
    json.dumps(m, allow_nan=False)


def test_binary_metrics_threshold_moves_the_decision() -> None:
    m = binary_metrics(Y, P, threshold=0.15)
    assert m["sensitivity"] == 1.0
    assert m["tn"] == 2


def test_binary_single_class_is_defined_and_silent() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = binary_metrics([0, 0, 0], [0.1, 0.6, 0.2])
    assert m["roc_auc"] is None and m["pr_auc"] is None
    assert m["precision"] == 0.0 and m["sensitivity"] == 0.0 and m["mcc"] == 0.0
    assert m["specificity"] == pytest.approx(2 / 3)
    json.dumps(m, allow_nan=False)


@pytest.mark.parametrize(
    ("y", "p"), [([0, 2], [0.1, 0.2]), ([0, 1], [0.1, 1.2]), ([0, 1], [0.1]), ([], [])]
)
def test_binary_rejects_bad_input(y: list, p: list) -> None:
    with pytest.raises(ValueError):
        binary_metrics(y, p)


def _three_class() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 60)
    logits = rng.normal(size=(60, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


def test_multiclass_macro_figures_agree_with_sklearn() -> None:
    y, probs = _three_class()
    names = ["CNV", "DME", "NORMAL"]
    m = multiclass_metrics(y, probs, names)
    pred = probs.argmax(axis=1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred, average="macro"))
    assert m["sensitivity"] == pytest.approx(skm.recall_score(y, pred, average="macro"))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    assert m["brier"] == pytest.approx(np.mean(np.sum((probs - np.eye(3)[y]) ** 2, axis=1)))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    cm = np.array(m["confusion_matrix"])
    tn0 = cm[1:, 1:].sum()
    assert m["per_class"]["CNV"]["specificity"] == pytest.approx(tn0 / (tn0 + cm[1:, 0].sum()))
    assert m["classification_report"]["DME"]["recall"] == m["per_class"]["DME"]["sensitivity"]
    json.dumps(m, allow_nan=False)


def test_multiclass_absent_class_has_no_auc() -> None:
    y = np.array([0, 1, 0, 1])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.25, 0.35, 0.4]])
    m = multiclass_metrics(y, probs, ["a", "b", "c"])
    assert m["per_class"]["c"]["roc_auc"] is None
    assert m["roc_auc"] == pytest.approx(1.0)
    json.dumps(m, allow_nan=False)


def test_ece_zero_when_bins_are_calibrated() -> None:
    # Bin (0.2, 0.3]: p=0.25, 1 of 4 positive; bin (0.7, 0.8]: p=0.75, 3 of 4 positive.
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    p = np.array([0.25] * 4 + [0.75] * 4)
    assert expected_calibration_error(y, p) == pytest.approx(0.0)


def test_ece_hand_computed() -> None:
    # Bin (0.8, 0.9]: p=0.9 twice, one positive -> gap 0.4, weight 2/4;
    # bin (0.0, 0.1]: p=0.1 twice, none positive -> gap 0.1, weight 2/4. ECE = 0.25.
    y = np.array([1, 0, 0, 0])
    p = np.array([0.9, 0.9, 0.1, 0.1])
    assert expected_calibration_error(y, p) == pytest.approx(0.25)
    curve = reliability_curve(y, p)
    assert curve["count"] == [2, 2]
    assert curve["observed"] == pytest.approx([0.0, 0.5])
    assert curve["ece"] == pytest.approx(0.25)


def test_ece_multiclass_uses_top_label() -> None:
    y = np.array([0, 1])
    probs = np.array([[0.7, 0.3], [0.7, 0.3]])  # confidence 0.7, accuracy 0.5
    assert expected_calibration_error(y, probs) == pytest.approx(0.2)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95, 1.0])
def test_threshold_reaches_target_sensitivity(target: float) -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.35 * y + 0.65 * rng.random(400), 0, 1)
    t = threshold_for_sensitivity(y, p, target)
    assert binary_metrics(y, p, threshold=t)["sensitivity"] >= target
    # Highest such threshold: any higher score as a threshold misses the target.
    higher = p[p > t]
    if higher.size:
        assert binary_metrics(y, p, threshold=higher.min())["sensitivity"] < target


def test_threshold_fallback_without_positives() -> None:
    with pytest.warns(RuntimeWarning):
        assert threshold_for_sensitivity([0, 0], [0.3, 0.6], 0.9) == 0.0


def _patient_data(n_groups: int = 40, n: int = 1000) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(7)
    groups = rng.integers(0, n_groups, n)
    y = rng.integers(0, 2, n)
    p = np.clip(0.3 * y + 0.7 * rng.random(n), 0, 1)
    return y, p, groups


def _accuracy(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(y == (p >= 0.5)))


def test_bootstrap_covers_point_and_is_reproducible() -> None:
    y, p, g = _patient_data()
    a = bootstrap_ci(y, p, g, _accuracy, n_resamples=300, seed=0)
    assert a["low"] <= a["point"] <= a["high"]
    assert a["point"] == pytest.approx(_accuracy(y, p))
    assert a["n_resamples"] == 300 and a["n_groups"] == 40
    assert bootstrap_ci(y, p, g, _accuracy, n_resamples=300, seed=0) == a
    b = bootstrap_ci(y, p, g, _accuracy, n_resamples=300, seed=1)
    assert (b["low"], b["high"]) != (a["low"], a["high"])


def test_bootstrap_resamples_groups_not_rows() -> None:
    y, p, _ = _patient_data(n=200)
    one = bootstrap_ci(y, p, np.zeros(200), _accuracy, n_resamples=50)
    assert one["low"] == one["high"] == one["point"]
    # Every row of a group identical, groups differ: a row bootstrap would give values
    # with many more distinct levels than the 2 groups can produce.
    y2 = np.repeat([1, 0], 100)
    p2 = np.repeat([0.9, 0.9], 100)
    g2 = np.repeat([0, 1], 100)
    seen = {bootstrap_ci(y2, p2, g2, _accuracy, n_resamples=1, seed=s)["low"] for s in range(20)}
    assert seen <= {0.0, 0.5, 1.0}
    assert len(seen) > 1


def test_bootstrap_skips_undefined_resamples() -> None:
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.8, 0.9])
    out = bootstrap_ci(y, p, np.array([0, 0, 1, 1]), rank_auc, n_resamples=200, seed=0)
    assert out["point"] == 1.0
    assert 0 < out["n_resamples"] < 200  # resamples with a single patient have no AUC
    assert out["n_requested"] == 200


def test_rank_auc_matches_sklearn_with_ties() -> None:
    y, p, _ = _patient_data()
    p = np.round(p, 1)
    assert rank_auc(y, p) == pytest.approx(skm.roc_auc_score(y, p))


def test_bootstrap_is_fast() -> None:
    """1,000 resamples of 1,000 rows / 40 patients in < 2 s of this process's CPU time.

    CPU rather than wall time: the test machine is shared, and contention is not our cost.
    """
    y, p, g = _patient_data()
    start = time.process_time()
    out = bootstrap_ci(y, p, g, rank_auc, n_resamples=1000)
    assert time.process_time() - start < 2.0
    assert out["n_resamples"] == 1000


def test_mcnemar_exact_textbook() -> None:
    a = np.r_[np.zeros(1), np.ones(10), np.ones(30)]  # b01 = 1, b10 = 10, 30 both right
    b = np.r_[np.ones(1), np.zeros(10), np.ones(30)]
    out = mcnemar(a, b)
    assert (out["b01"], out["b10"], out["method"]) == (1, 10, "exact")
    assert out["p_value"] == pytest.approx(0.01171875)  # 2 * (1 + 11) / 2**11


def test_mcnemar_chi2_with_continuity_correction() -> None:
    a = np.r_[np.zeros(10), np.ones(30)]  # b01 = 10, b10 = 30
    out = mcnemar(a, 1 - a)
    assert out["method"] == "chi2_cc"
    assert out["statistic"] == pytest.approx((20 - 1) ** 2 / 40)
    # chi-square with 1 dof: sf(x) = erfc(sqrt(x / 2)).
    assert out["p_value"] == pytest.approx(math.erfc(math.sqrt(out["statistic"] / 2)))


def test_mcnemar_identical_classifiers() -> None:
    a = np.array([1, 0, 1, 1, 0], dtype=bool)
    out = mcnemar(a, a)
    assert out["p_value"] == 1.0 and out["b01"] == out["b10"] == 0
