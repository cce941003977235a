"""`predict --by-patient`'s pure part: which patient a cell is, which threshold, the rows."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest

from medimg.commands.by_patient import by_patient, patient_of, pick_patient_threshold
from medimg.config import NIH_PATIENT_REGEX
from medimg.errors import MedimgError

NIH = re.compile(NIH_PATIENT_REGEX)
CLASSES = ["Uninfected", "Parasitized"]


def test_patient_is_the_nih_name_else_the_folder():
    assert patient_of("x/Parasitized/C33P1thinF_IMG_20150619_114756a_cell_179.png", NIH) == "C33"
    assert patient_of("x/Uninfected/C37BP2_thinF_IMG_1_cell_2.png", NIH) == "C37"
    assert patient_of("ward7/bed2/cell_1.png", NIH) == "ward7/bed2"


def test_patient_threshold_override_then_stored_then_none():
    assert pick_patient_threshold(0.2, {"patient_threshold": 0.4}) == 0.2
    assert pick_patient_threshold(None, {"patient_threshold": 0.4}) == 0.4
    assert pick_patient_threshold(None, {}) is None
    with pytest.raises(MedimgError, match=r"must be in \[0, 1\]"):
        pick_patient_threshold(1.5, {})


def test_rows_pool_a_patients_cells_across_folders():
    cells = pd.DataFrame(
        {
            "path": [
                "s/Parasitized/C33P1thinF_a.png",
                "s/Uninfected/C33P1thinF_b.png",
                "s/Uninfected/C33P1thinF_c.png",
                "s/Uninfected/C7P2thinF_d.png",
                "s/ward/e.png",
            ],
            "p_Parasitized": [0.9, 0.6, 0.1, 0.2, 0.5],
        }
    )
    rows = by_patient(cells, CLASSES, 0.5, NIH, 0.5).set_index("patient")
    assert rows["cells"].to_dict() == {"C33": 3, "C7": 1, "s/ward": 1}
    assert rows["parasitized_cells"].to_dict() == {"C33": 2, "C7": 0, "s/ward": 1}
    assert rows.loc["C33", "parasitemia"] == pytest.approx(2 / 3)
    assert rows["call"].to_dict() == {"C33": "infected", "C7": "healthy", "s/ward": "infected"}
    assert (rows["patient_threshold"] == 0.5).all()
    strict = by_patient(cells, CLASSES, 0.5, NIH, 0.7).set_index("patient")
    assert strict["call"].to_dict() == {"C33": "healthy", "C7": "healthy", "s/ward": "infected"}
    unset = by_patient(cells, CLASSES, 0.5, NIH, None)
    assert math.isnan(unset["patient_threshold"].iloc[0])
    assert by_patient(cells.iloc[:0], CLASSES, 0.5, NIH, None).empty
    with pytest.raises(MedimgError, match="binary"):
        by_patient(cells, ["a", "b", "c"], 0.5, NIH, None)
