"""Patient-level diagnosis on real cells: a clinician diagnoses a smear, not a cell.

    python bench/patient_level.py --val /tmp/medimg-real/predictions_val.csv
                                  --test /tmp/medimg-real/predictions_test.csv
                                  [--cell-threshold T] [--target 0.95] [--rule midpoint]

Reads per-cell predictions (CSV: path, patient, label (1 or 'Parasitized' = positive), p =
the served P(Parasitized); `bench/threshold_rules.py` writes them for compact_cnn on the dev
set). The cell threshold is `--cell-threshold` (the served model's), else chosen on val by
the project's rule (`medimg.analysis.operating.operating_threshold`, params.yaml's defaults). Then
`medimg.analysis.patient.evaluate_patients` does what the evaluate stage does: patient
threshold chosen on val patients, applied unchanged to test; sensitivity, specificity (over
patients) and parasitemia MAE with 95% patient-bootstrap CIs. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medimg.analysis.operating import operating_threshold
from medimg.analysis.patient import aggregate_cells, evaluate_patients
from medimg.analysis.stats import bootstrap_ci
from medimg.config import NIH_PATIENT_REGEX, EvaluateConfig, PatientConfig


def read_predictions(path: Path, positive: str = "Parasitized") -> pd.DataFrame:
    """path, patient, y (0/1), p; the patient from the NIH file name when the column is
    missing, labels given as class names mapped to 1 for `positive`."""
    frame = pd.read_csv(path)
    if "patient" not in frame:
        pattern = re.compile(NIH_PATIENT_REGEX)
        frame["patient"] = [pattern.search(Path(p).name).group(1) for p in frame["path"]]
    label = frame["label"]
    frame["y"] = (label == positive).astype(int) if label.dtype == object else label.astype(int)
    frame["patient"] = frame["patient"].astype(str)
    return frame[["path", "patient", "y", "p"]]


def _cell_rates(frame: pd.DataFrame, threshold: float, seed: int) -> dict[str, dict[str, Any]]:
    """Cell-level sensitivity/specificity at the cell threshold, patient-bootstrap CIs: the
    figures the patient call is compared with."""
    y, p, groups = frame["y"].to_numpy(), frame["p"].to_numpy(), frame["patient"].to_numpy()

    def rate(cls: int):
        def fn(yy: np.ndarray, pp: np.ndarray) -> float | None:
            mask = yy == cls
            return float(np.mean((pp[mask] >= threshold) == bool(cls))) if mask.any() else None

        return fn

    return {
        name: bootstrap_ci(y, p, groups, rate(cls), 1000, 0.95, seed)
        for name, cls in (("sensitivity", 1), ("specificity", 0))
    }


def _fmt(value: float | None, ci: list[float | None] | None = None) -> str:
    if value is None:
        return "–"
    text = f"{value:.3f}"
    if ci and ci[0] is not None:
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def table(
    val: pd.DataFrame,
    test: pd.DataFrame,
    cell_threshold: float | None,
    cfg: PatientConfig,
    seed: int,
) -> tuple[str, pd.DataFrame]:
    """The markdown table (test patients; the val figures the thresholds were chosen on) and
    the per-patient rows."""
    evaluate_cfg = EvaluateConfig()
    cell_rule = "given"
    if cell_threshold is None:
        cell_threshold, rule = operating_threshold(
            val["y"].to_numpy(),
            val["p"].to_numpy(),
            list(val["patient"]),
            evaluate_cfg,
            seed,
        )
        cell_rule = f"{rule['rule']} on val, target {evaluate_cfg.target_sensitivity}"
    figures, rows = evaluate_patients(
        (list(val["patient"]), val["y"], val["p"]),
        (list(test["patient"]), test["y"], test["p"]),
        cell_threshold,
        cfg.target_sensitivity,
        cfg.threshold_rule,
        1000,
        0.95,
        seed,
    )
    cells = _cell_rates(test, cell_threshold, seed)
    val_table = aggregate_cells(list(val["patient"]), val["p"], cell_threshold, val["y"])
    f, mean_p = figures, "parasitemia_mae_mean_probability"
    lines = [
        "| | test (95% patient-bootstrap CI) |",
        "|---|---|",
        f"| patients (infected / healthy) | {f['patients']} ({f['infected_patients']} / "
        f"{f['healthy_patients']}); val {f['val_patients']} "
        f"({int(val_table['infected'].sum())} / {int((~val_table['infected']).sum())}) |",
        f"| cells | {len(test)} (val {len(val)}) |",
        f"| cell threshold | {cell_threshold:.4f} ({cell_rule}) |",
        f"| patient threshold (parasitemia) | {f['patient_threshold']:.4f} ({cfg.threshold_rule} "
        f"on val, target {cfg.target_sensitivity}; val sensitivity "
        f"{_fmt(f['val_patient_sensitivity'])}, specificity "
        f"{_fmt(f['val_patient_specificity'])}) |",
        f"| patient sensitivity | {_fmt(f['patient_sensitivity'], f['patient_sensitivity_ci'])} |",
        f"| patient specificity | {_fmt(f['patient_specificity'], f['patient_specificity_ci'])} |",
        f"| parasitemia MAE (called share) | "
        f"{_fmt(f['parasitemia_mae'], f['parasitemia_mae_ci'])} |",
        f"| parasitemia MAE (mean probability) | {_fmt(f[mean_p], f[mean_p + '_ci'])} |",
        f"| cell sensitivity, specificity at the cell threshold | {_boot(cells['sensitivity'])}, "
        f"{_boot(cells['specificity'])} |",
    ]
    missed = rows[(rows["label"] == "infected") & (rows["call"] == "healthy")]
    false = rows[(rows["label"] == "healthy") & (rows["call"] == "infected")]
    notes = [
        f"missed infected patients: {_patients(missed)}",
        f"healthy patients called infected: {_patients(false)}",
    ]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n", rows


def _boot(boot: dict[str, Any]) -> str:
    return _fmt(boot["point"], [boot["low"], boot["high"]])


def _patients(rows: pd.DataFrame) -> str:
    if rows.empty:
        return "none"
    return ", ".join(
        f"{r.patient} ({r.cells} cells, true {r.true_parasitemia:.2f}, "
        f"estimated {r.estimated_parasitemia:.2f})"
        for r in rows.itertuples()
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--val", type=Path, required=True)
    parser.add_argument("--test", type=Path, required=True)
    parser.add_argument("--cell-threshold", type=float, default=None)
    defaults = PatientConfig()
    parser.add_argument("--target", type=float, default=defaults.target_sensitivity)
    parser.add_argument("--rule", choices=["point", "midpoint"], default=defaults.threshold_rule)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--per-patient", type=Path, default=None, help="write patients.csv")
    args = parser.parse_args(argv)
    for path in (args.val, args.test):
        if not path.exists():
            print(f"{path}: not found", file=sys.stderr)
            return 2
    cfg = PatientConfig(target_sensitivity=args.target, threshold_rule=args.rule)
    val, test = read_predictions(args.val), read_predictions(args.test)
    text, rows = table(val, test, args.cell_threshold, cfg, args.seed)
    sys.stdout.write(text)
    if args.per_patient is not None:
        rows.to_csv(args.per_patient, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
