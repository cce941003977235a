"""Patient-level diagnosis on tiny hand-made smears: every number can be checked by hand."""

from __future__ import annotations

import numpy as np
import pytest

from medimg.analysis.patient import (
    aggregate_cells,
    call_patients,
    evaluate_patients,
    patient_frame,
    patient_metrics,
    patient_threshold,
)

# A: 3 cells, 2 parasitized; B: 2 healthy cells; C: 4 cells, 1 parasitized (low parasitemia)
PATIENTS = ["A", "A", "A", "B", "B", "C", "C", "C", "C"]
Y = np.array([1, 0, 1, 0, 0, 1, 0, 0, 0])
P = np.array([0.9, 0.2, 0.5, 0.1, 0.6, 0.7, 0.1, 0.2, 0.3])


def test_aggregate_counts_cells_called_at_the_cell_threshold():
    table = aggregate_cells(PATIENTS, P, 0.5, Y).set_index("patient")
    assert table["cells"].to_dict() == {"A": 3, "B": 2, "C": 4}
    assert table["called_cells"].to_dict() == {"A": 2, "B": 1, "C": 1}  # p == 0.5 is called
    assert table.loc["A", "estimated_parasitemia"] == pytest.approx(2 / 3)
    assert table.loc["B", "estimated_parasitemia"] == pytest.approx(0.5)
    assert table.loc["C", "mean_probability"] == pytest.approx(0.325)
    assert table["parasitized_cells"].to_dict() == {"A": 2, "B": 0, "C": 1}
    assert table.loc["C", "true_parasitemia"] == pytest.approx(0.25)
    assert table["infected"].to_dict() == {"A": True, "B": False, "C": True}
    unlabelled = aggregate_cells(PATIENTS, P, 0.5)
    assert "infected" not in unlabelled and "true_parasitemia" not in unlabelled
    with pytest.raises(ValueError):
        aggregate_cells(PATIENTS[:-1], P, 0.5)


def test_call_is_parasitemia_at_or_above_the_threshold_or_any_called_cell_without_one():
    share = np.array([0.0, 0.1, 0.2, 0.3])
    assert call_patients(share, 0.2).tolist() == [False, False, True, True]
    assert call_patients(share, None).tolist() == [False, True, True, True]


def test_patient_threshold_point_and_midpoint_rules():
    infected = np.array([True, True, False, False])
    share = np.array([0.5, 0.3, 0.1, 0.0])
    # all infected must be caught: the point is the least parasitized infected patient ...
    assert patient_threshold(infected, share, 1.0, "point") == pytest.approx(0.3)
    # ... the midpoint lies halfway down to the next lower val value (healthy 0.1)
    assert patient_threshold(infected, share, 1.0, "midpoint") == pytest.approx(0.2)
    assert patient_threshold(infected, share, 0.5, "point") == pytest.approx(0.5)
    assert patient_threshold(infected, share, 0.5, "midpoint") == pytest.approx(0.4)
    # the midpoint keeps val's calls: the same patients as at the point
    for target in (0.5, 1.0):
        point = patient_threshold(infected, share, target, "point")
        middle = patient_threshold(infected, share, target)
        assert (call_patients(share, point) == call_patients(share, middle)).all()
    # nothing below the lowest val value: halfway to 0
    assert patient_threshold(infected[:2], share[:2], 1.0) == pytest.approx(0.15)
    with pytest.warns(RuntimeWarning, match="no infected val patient"):
        assert patient_threshold(~infected[:1], share[:1], 0.95) == 0.0


def test_patient_metrics_at_a_fixed_threshold_with_patient_bootstrap_cis():
    table = aggregate_cells(PATIENTS, P, 0.5, Y)
    # estimated A 2/3, B 1/2, C 1/4; at 0.6 only A is called: sens 1/2, spec 1
    out = patient_metrics(table, 0.6, n_resamples=200, ci=0.9, seed=0)
    assert (out["patients"], out["infected_patients"], out["healthy_patients"]) == (3, 2, 1)
    assert out["patient_sensitivity"] == pytest.approx(0.5)
    assert out["patient_specificity"] == pytest.approx(1.0)
    # |2/3 - 2/3| + |1/2 - 0| + |1/4 - 1/4| over 3 patients
    assert out["parasitemia_mae"] == pytest.approx(0.5 / 3)
    mean_p_error = abs(0.8 - 2 / 3) + abs(0.35 - 0) + abs(0.325 - 0.25)
    assert out["parasitemia_mae_mean_probability"] == pytest.approx(mean_p_error / 3)
    for name in ("patient_sensitivity", "patient_specificity", "parasitemia_mae"):
        low, high = out[f"{name}_ci"]
        assert low <= out[name] <= high
    # resampling patients: the MAE's interval spans one patient's error to the largest mean
    assert out["parasitemia_mae_ci"][0] == pytest.approx(0.0)
    assert out["parasitemia_mae_ci"][1] <= 0.5
    assert patient_metrics(table, 0.6, 0, 0.9, 0)["patient_sensitivity_ci"] == [None, None]


def test_evaluate_patients_chooses_on_val_and_applies_unchanged_to_test():
    # val: infected V1 at 0.5 called, healthy V2 at 0.0 -> point 0.5, midpoint 0.25
    val = (["V1", "V1", "V2", "V2"], np.array([1, 0, 0, 0]), np.array([0.9, 0.1, 0.1, 0.2]))
    figures, frame = evaluate_patients(val, (PATIENTS, Y, P), 0.5, 1.0, "midpoint", 100)
    assert figures["patient_threshold"] == pytest.approx(0.25)
    assert figures["val_patient_sensitivity"] == 1.0 and figures["val_patients"] == 2
    # test at 0.25: A (2/3), B (1/2) and C (1/4) all called -> sens 1, spec 0
    assert figures["patient_sensitivity"] == 1.0 and figures["patient_specificity"] == 0.0
    assert figures["cell_threshold"] == 0.5 and figures["chosen_on"] == "val"
    assert list(frame["patient"]) == ["A", "B", "C"]
    assert list(frame["call"]) == ["infected"] * 3
    assert list(frame["label"]) == ["infected", "healthy", "infected"]
    assert {"cells", "true_parasitemia", "estimated_parasitemia"} <= set(frame.columns)

    point, _ = evaluate_patients(val, (PATIENTS, Y, P), 0.5, 1.0, "point", 100)
    assert point["patient_threshold"] == pytest.approx(0.5)
    assert point["patient_specificity"] == 0.0 and point["patient_sensitivity"] == 0.5


def test_patient_frame_without_labels_has_no_label_column():
    frame = patient_frame(aggregate_cells(PATIENTS, P, 0.5), 0.4)
    assert list(frame.columns) == [
        "patient",
        "cells",
        "called_cells",
        "estimated_parasitemia",
        "mean_probability",
        "call",
    ]
    assert list(frame["call"]) == ["infected", "infected", "healthy"]
