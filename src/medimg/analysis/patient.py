"""Patient-level diagnosis: from a smear's cells to an estimated parasitemia and a call.

A clinician diagnoses a smear, not a cell. Each patient's cells are aggregated into

- the **estimated parasitemia**: the share of the patient's cells called parasitized at the
  served cell threshold. This is the estimate (reported, thresholded, scored) because it is
  what microscopy counts (infected cells / cells examined) and what `medimg predict` shows
  cell by cell, so the number and the cell calls can never disagree. The mean calibrated
  probability is reported beside it (`mean_probability`): with good calibration it estimates
  the share without the false-positive excess a high-sensitivity cell threshold adds, but it
  is not a count a reader can check against the cells;
- the **patient call**: infected when that parasitemia is >= the patient threshold.

The true parasitemia is the share of the patient's cells labelled parasitized, and a patient
is infected when any cell is. The patient threshold is chosen on the validation patients (the
same target-sensitivity logic as the cell threshold, see `patient_threshold`) and applied
unchanged to test. Intervals resample patients (`medimg.analysis.stats.bootstrap_ci` with one
row per patient).

Pure functions: arrays and frames in, numbers and frames out.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from sklearn.exceptions import UndefinedMetricWarning

from medimg.analysis.metrics import threshold_for_sensitivity
from medimg.analysis.stats import bootstrap_ci

ThresholdRule = Literal["point", "midpoint"]
INFECTED, HEALTHY = "infected", "healthy"
RATES = ("patient_sensitivity", "patient_specificity", "parasitemia_mae")


def aggregate_cells(
    patients: Sequence[str],
    p_pos: ArrayLike,
    cell_threshold: float,
    y_true: ArrayLike | None = None,
) -> pd.DataFrame:
    """One row per patient (sorted by id): cells, called cells, estimated parasitemia, mean
    probability; with labels also parasitized cells, true parasitemia and `infected`.

    A cell is called parasitized when p >= `cell_threshold`, as in `binary_metrics` and
    `medimg predict`.
    """
    p = np.asarray(p_pos, dtype=np.float64)
    if p.ndim != 1 or len(patients) != p.shape[0]:
        raise ValueError("patients and p_pos must be 1-D with one entry per cell")
    cells = pd.DataFrame({"patient": list(patients), "called": p >= cell_threshold, "p": p})
    if y_true is not None:
        cells["parasitized"] = np.asarray(y_true).astype(int) == 1
    grouped = cells.groupby("patient", sort=True)
    table = pd.DataFrame(
        {
            "cells": grouped.size(),
            "called_cells": grouped["called"].sum().astype(int),
            "estimated_parasitemia": grouped["called"].mean(),
            "mean_probability": grouped["p"].mean(),
        }
    )
    if y_true is not None:
        table["parasitized_cells"] = grouped["parasitized"].sum().astype(int)
        table["true_parasitemia"] = grouped["parasitized"].mean()
        table["infected"] = table["parasitized_cells"] > 0
    return table.reset_index()


def call_patients(parasitemia: ArrayLike, threshold: float | None) -> np.ndarray:
    """Infected when parasitemia >= threshold; with no threshold (a model evaluated before
    patient thresholds existed), when any cell is called: no count can justify less."""
    share = np.asarray(parasitemia, dtype=np.float64)
    return share > 0.0 if threshold is None else share >= threshold


def patient_threshold(
    infected: ArrayLike, parasitemia: ArrayLike, target: float, rule: ThresholdRule = "midpoint"
) -> float:
    """The patient threshold for `target` sensitivity on these (validation) patients.

    `point`: the highest threshold whose val patient sensitivity is >= `target`
    (`threshold_for_sensitivity`, the cell rule): it sits exactly on the least parasitized
    infected patient it must catch, so a new patient just below that value is missed.
    `midpoint` (default): halfway down from there to the next lower val parasitemia (or 0).
    No val patient lies in that gap, so val sensitivity and specificity are unchanged, and
    with ~20 val patients the gap is wide: the boundary is put where the data are silent,
    the max-margin choice, rather than on an observed patient. With no infected val patient
    sensitivity is undefined and the threshold is 0.0 (everyone called; a RuntimeWarning).
    """
    y = np.asarray(infected).astype(int)
    share = np.asarray(parasitemia, dtype=np.float64)
    with warnings.catch_warnings():  # sklearn's ROC warnings on a one-class val set
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        point = threshold_for_sensitivity(y, share, target) if y.any() else None
    if point is None:
        warnings.warn("no infected val patient: patient threshold 0.0", RuntimeWarning, 2)
        return 0.0
    point = min(point, 1.0)  # roc_curve may return inf above the top score
    if rule == "point":
        return float(point)
    below = share[share < point]
    return float((point + (below.max() if below.size else 0.0)) / 2.0)


def _rate(infected: np.ndarray, called: np.ndarray, positive: bool) -> float | None:
    mask = infected == positive
    return float(np.mean(called[mask] == positive)) if mask.any() else None


def _interval(values: dict[str, Any]) -> list[float | None]:
    return [values["low"], values["high"]]


def patient_metrics(
    table: pd.DataFrame, threshold: float, n_resamples: int, ci: float, seed: int
) -> dict[str, Any]:
    """Flat patient-level figures on a labelled `aggregate_cells` table at `threshold`:
    counts, sensitivity, specificity (over patients) and parasitemia MAE (estimated vs true
    share, and the same for the mean probability), each with a patient-bootstrap CI."""
    infected = table["infected"].to_numpy(dtype=bool)
    called = call_patients(table["estimated_parasitemia"], threshold)
    truth = table["true_parasitemia"].to_numpy(dtype=np.float64)
    mae = lambda t, e: float(np.mean(np.abs(e - t)))  # noqa: E731
    specs = {
        "patient_sensitivity": (infected, called, lambda y, c: _rate(y, c, True)),
        "patient_specificity": (infected, called, lambda y, c: _rate(y, c, False)),
        "parasitemia_mae": (truth, table["estimated_parasitemia"].to_numpy(), mae),
        "parasitemia_mae_mean_probability": (truth, table["mean_probability"].to_numpy(), mae),
    }
    out: dict[str, Any] = {
        "patients": len(table),
        "infected_patients": int(infected.sum()),
        "healthy_patients": int((~infected).sum()),
        "patient_threshold": float(threshold),
    }
    for name, (y, s, fn) in specs.items():
        boot = bootstrap_ci(y, s, None, fn, n_resamples, ci, seed)
        out |= {name: boot["point"], f"{name}_ci": _interval(boot)}
    return out


def patient_frame(table: pd.DataFrame, threshold: float | None) -> pd.DataFrame:
    """patients.csv: one row per patient with its call (and label when known)."""
    called = call_patients(table["estimated_parasitemia"], threshold)
    cols = ["patient", "cells", "parasitized_cells", "called_cells", "true_parasitemia"]
    cols += ["estimated_parasitemia", "mean_probability"]
    frame = table[[c for c in cols if c in table]].copy()
    frame["call"] = np.where(called, INFECTED, HEALTHY)
    if "infected" in table:
        frame["label"] = np.where(table["infected"], INFECTED, HEALTHY)
    return frame


def evaluate_patients(
    val: tuple[Sequence[str], ArrayLike, ArrayLike],
    test: tuple[Sequence[str], ArrayLike, ArrayLike],
    cell_threshold: float,
    target: float,
    rule: ThresholdRule = "midpoint",
    n_resamples: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """(patient-level figures, patients.csv frame): the patient threshold chosen on the val
    patients (`val` = (patients, labels, probabilities)), applied unchanged to `test`."""
    val_table = aggregate_cells(val[0], val[2], cell_threshold, val[1])
    threshold = patient_threshold(
        val_table["infected"], val_table["estimated_parasitemia"], target, rule
    )
    test_table = aggregate_cells(test[0], test[2], cell_threshold, test[1])
    figures = patient_metrics(test_table, threshold, n_resamples, ci, seed)
    val_called = call_patients(val_table["estimated_parasitemia"], threshold)
    val_infected = val_table["infected"].to_numpy(dtype=bool)
    figures |= {
        "estimate": "share of cells called parasitized at the cell threshold",
        "cell_threshold": float(cell_threshold),
        "target_sensitivity": float(target),
        "threshold_rule": rule,
        "chosen_on": "val",
        "val_patients": len(val_table),
        "val_patient_sensitivity": _rate(val_infected, val_called, True),
        "val_patient_specificity": _rate(val_infected, val_called, False),
    }
    return figures, patient_frame(test_table, threshold)
