"""`medimg predict --by-patient`: the cells' predictions as one row per patient (smear).

A clinician diagnoses a smear, not a cell: the cells of one patient are pooled into an
estimated parasitemia and a call at the patient threshold stored with the model
(`medimg.analysis.patient` holds the rule; evaluate chose the threshold on val patients).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medimg.analysis.patient import aggregate_cells, patient_frame
from medimg.data.manifest import patient_id
from medimg.errors import MedimgError

COLUMNS = ["patient", "cells", "parasitized_cells", "parasitemia", "call", "patient_threshold"]


def patient_of(path: str | Path, pattern: re.Pattern[str]) -> str:
    """The patient a cell image belongs to: from its NIH file name (`C33P1thinF_...` → `C33`,
    the validate stage's `patient_regex`), else its folder, so one folder = one patient when
    names do not parse."""
    path = Path(path)
    return patient_id(path.name, pattern) or str(path.parent)


def pick_patient_threshold(override: float | None, info: Mapping[str, Any]) -> float | None:
    """`--patient-threshold`, else the one stored with the model (version tag, then the served
    model's config: `resolve_model` merges both into `patient_threshold`), else None: a model
    evaluated before patient thresholds existed calls a patient on any called cell."""
    value = override if override is not None else info.get("patient_threshold")
    if value is None:
        return None
    if not 0.0 <= float(value) <= 1.0:
        raise MedimgError(f"patient threshold must be in [0, 1], got {value}", exit_code=2)
    return float(value)


def by_patient(
    cells: pd.DataFrame,
    classes: Sequence[str],
    cell_threshold: float,
    pattern: re.Pattern[str],
    threshold: float | None,
) -> pd.DataFrame:
    """One row per patient from `predict_files`' cell rows: cells, cells called parasitized
    (at `cell_threshold`, as in the cell rows), parasitemia (their share) and the call
    (`infected`/`healthy`)."""
    if len(classes) != 2:
        raise MedimgError("--by-patient needs a binary model (a positive class)", exit_code=2)
    if cells.empty:
        return pd.DataFrame(columns=COLUMNS)
    patients = [patient_of(p, pattern) for p in cells["path"]]
    table = aggregate_cells(patients, cells[f"p_{classes[1]}"], cell_threshold)
    frame = patient_frame(table, threshold).rename(
        columns={"called_cells": "parasitized_cells", "estimated_parasitemia": "parasitemia"}
    )
    frame["patient_threshold"] = float("nan") if threshold is None else threshold
    return frame[COLUMNS]
