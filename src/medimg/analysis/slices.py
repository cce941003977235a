"""Slices: test metrics on subsets of the test images, and the gate's checks on them.

A model can gain overall accuracy while getting worse on dark smears, blurred scans, one
class or one site; the headline hides it. The evaluate stage reports each slice (per class,
per patient size, per image-property bin, per declared source) with patient-bootstrap CIs
(`reports/eval/<arch>/slices.json`) and the gate refuses a candidate whose gated slice is
under a floor or worse than the champion's same slice (`gate_slices`).

Slice definitions are fixed before test is looked at: property bins are quantiles of the
*val* images' properties (val is streamed by evaluate anyway, is patient-disjoint from test
and has the training distribution; test quantiles would move the edges with the data being
judged) and the few/many-cells patient groups split at val's median cells per patient. The
same split gives the champion and the candidate the same slices, so their slices compare.

Every function here is pure (arrays and dicts in, JSON-ready dicts out).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from medimg.analysis.stats import bootstrap_ci
from medimg.config import SliceConfig, SliceGateConfig

Metric = Callable[[np.ndarray, np.ndarray], float | None]
BIN_NAMES = {2: ("low", "high"), 3: ("low", "mid", "high")}
WORST_ROWS = 10  # per architecture in compare.md


def _rate(y: np.ndarray, pred: np.ndarray, cls: int) -> float | None:
    mask = y == cls
    return float(np.mean(pred[mask] == cls)) if mask.any() else None


def _precision(y: np.ndarray, pred: np.ndarray, cls: int) -> float | None:
    called = pred == cls
    return float(np.mean(y[called] == cls)) if called.any() else None


def _accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(pred == y))


# ------------------------------------------------------------------------------ definitions


def quantile_edges(reference: np.ndarray, bins: int) -> np.ndarray:
    """Inner bin edges: the 1/bins, ..., (bins-1)/bins quantiles of `reference`, duplicates
    dropped (a property with few distinct values gets fewer bins); empty when constant."""
    ref = np.asarray(reference, dtype=np.float64)
    ref = ref[np.isfinite(ref)]
    if ref.size == 0 or ref.min() == ref.max():
        return np.zeros(0)
    edges = np.unique(np.quantile(ref, np.arange(1, bins) / bins))
    return edges[edges < ref.max()]  # an edge at the max would leave the top bin empty


def bin_names(n_bins: int) -> tuple[str, ...]:
    return BIN_NAMES.get(n_bins, tuple(f"q{i + 1}of{n_bins}" for i in range(n_bins)))


def property_slices(
    test: pd.DataFrame, val: pd.DataFrame, names: Sequence[str], bins: int
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Masks over `test`'s rows per property bin, and each bin's definition.

    Bin i holds edges[i-1] < value <= edges[i] (the lowest bin has no lower bound, the
    highest no upper bound); a property constant on val makes no slices.
    """
    masks: dict[str, np.ndarray] = {}
    defs: dict[str, dict[str, Any]] = {}
    for prop in names:
        edges = quantile_edges(val[prop].to_numpy(), bins)
        if edges.size == 0:
            continue
        index = np.searchsorted(edges, test[prop].to_numpy(dtype=np.float64), side="left")
        bounds = [None, *(float(e) for e in edges), None]
        for i, label in enumerate(bin_names(edges.size + 1)):
            name = f"{prop}.{label}"
            masks[name] = index == i
            defs[name] = {"kind": "property", "property": prop, "range": bounds[i : i + 2]}
    return masks, defs


def patient_size_slices(
    patients: Sequence[str], val_patients: Sequence[str]
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Images of patients with few cells (<= val's median cells per patient) vs many."""
    val_counts = pd.Series(list(val_patients)).value_counts()
    if val_counts.empty:
        return {}, {}
    edge = float(val_counts.median())
    counts = pd.Series(list(patients)).map(pd.Series(list(patients)).value_counts()).to_numpy()
    few = counts <= edge
    spec = {"kind": "patient_size", "cells_per_patient_edge": edge}
    return (
        {"patients.few_cells": few, "patients.many_cells": ~few},
        {"patients.few_cells": spec, "patients.many_cells": spec},
    )


def source_slices(
    paths: Sequence[str], pattern: str
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """One slice per source tag: group 1 of `pattern` searched in the path (or the whole
    match without a group); paths it does not match are `source.unmatched`."""
    regex = re.compile(pattern)

    def tag(path: str) -> str:
        found = regex.search(path)
        if found is None:
            return "unmatched"
        return found.group(1) if regex.groups else found.group(0)

    tags = np.array([tag(p) for p in paths], dtype=object)
    masks = {f"source.{t}": tags == t for t in sorted(set(tags))}
    return masks, {name: {"kind": "source", "pattern": pattern} for name in masks}


# ---------------------------------------------------------------------------------- metrics


def _slice_metrics(y: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> dict[str, Metric]:
    """The metrics measured on a slice's rows: binary → accuracy, sensitivity, specificity;
    multi-class → accuracy and the recall of each class present."""
    fns: dict[str, Metric] = {"accuracy": _accuracy}
    if len(classes) == 2:
        fns["sensitivity"] = lambda a, b: _rate(a, b, 1)
        fns["specificity"] = lambda a, b: _rate(a, b, 0)
        return fns
    for k in np.unique(y):
        fns[f"recall.{classes[int(k)]}"] = lambda a, b, k=int(k): _rate(a, b, k)
    return fns


def _measure(
    y: np.ndarray,
    pred: np.ndarray,
    groups: np.ndarray,
    fns: dict[str, Metric],
    resamples: int,
    ci: float,
    seed: int,
) -> tuple[dict[str, float | None], dict[str, list[float | None]]]:
    values, intervals = {}, {}
    for name, fn in fns.items():
        boot = bootstrap_ci(y, pred, groups, fn, resamples, ci, seed)
        values[name] = boot["point"]
        intervals[name] = [boot["low"], boot["high"]]
    return values, intervals


def slice_report(
    y: np.ndarray,
    pred: np.ndarray,
    patients: Sequence[str],
    paths: Sequence[str],
    classes: Sequence[str],
    test_props: pd.DataFrame,
    val_props: pd.DataFrame,
    val_patients: Sequence[str],
    cfg: SliceConfig,
    *,
    threshold: float | None,
    resamples: int,
    ci: float,
    seed: int,
) -> dict[str, Any]:
    """Every slice of the test set with its size, metrics and patient-bootstrap CIs.

    `pred`: the served decisions (binary: at the operating threshold, recorded here).
    `test_props`/`val_props`: `medimg.data.shards.split_properties` frames (joined by path).
    Slices with no test image are left out; those under `cfg.min_images` images or
    `cfg.min_patients` patients are kept with `too_small: true` and are not gated.
    """
    y, pred = np.asarray(y), np.asarray(pred)
    groups = np.asarray(patients, dtype=object)
    masks: dict[str, np.ndarray] = {}
    defs: dict[str, dict[str, Any]] = {}
    for k, cls in enumerate(classes):
        masks[f"class.{cls}"], defs[f"class.{cls}"] = y == k, {"kind": "class", "class": cls}
    parts = [patient_size_slices(patients, val_patients)]
    if cfg.properties:
        test = test_props.set_index("path").reindex(list(paths))
        if test.isna().any().any():
            raise ValueError("test_props has no properties for some test paths")
        parts.append(property_slices(test, val_props, cfg.properties, cfg.bins))
    if cfg.source:
        parts.append(source_slices(paths, cfg.source))
    for m, d in parts:
        masks |= m
        defs |= d
    slices = []
    for name, mask in masks.items():
        if not mask.any():
            continue
        ys, ps, gs = y[mask], pred[mask], groups[mask]
        n_patients = len(set(gs))
        values, intervals = _measure(
            ys, ps, gs, _slice_metrics(ys, ps, classes), resamples, ci, seed
        )
        if defs[name]["kind"] == "class":
            k = list(classes).index(defs[name]["class"])
            precision = bootstrap_ci(
                y, pred, groups, lambda a, b, k=k: _precision(a, b, k), resamples, ci, seed
            )
            values["precision"] = precision["point"]
            intervals["precision"] = [precision["low"], precision["high"]]
        too_small = int(mask.sum()) < cfg.min_images or n_patients < cfg.min_patients
        slices.append(
            {
                "name": name,
                **defs[name],
                "images": int(mask.sum()),
                "patients": n_patients,
                "too_small": too_small,
                "metrics": values,
                "ci": intervals,
            }
        )
    return {
        "task": "binary" if len(classes) == 2 else "multiclass",
        "threshold": threshold,
        "bins_from": "val",
        "min_images": cfg.min_images,
        "min_patients": cfg.min_patients,
        "ci": ci,
        "bootstrap": resamples,
        "slices": slices,
    }


# -------------------------------------------------------------------------------- reporting


def worst(report: dict[str, Any], n: int | None = None) -> list[dict[str, Any]]:
    """Gated slices (not too small), lowest accuracy first."""
    gated = [s for s in report.get("slices", []) if not s["too_small"]]
    ranked = sorted(gated, key=lambda s: (s["metrics"]["accuracy"], s["name"]))
    return ranked if n is None else ranked[:n]


def worst_slice_metrics(report: dict[str, Any] | None) -> dict[str, Any]:
    """The worst gated slice's name and accuracy, for `reports/eval/<arch>.json`: one column
    pair that `dvc exp show` puts beside the headline (empty when there are no slices)."""
    ranked = worst(report or {}, 1)
    if not ranked:
        return {}
    return {
        "worst_slice": ranked[0]["name"],
        "worst_slice_accuracy": ranked[0]["metrics"]["accuracy"],
    }


def plot_rows(report: dict[str, Any]) -> pd.DataFrame:
    """The DVC plot's data: every slice, worst accuracy first (too small ones marked)."""
    rows = [
        {
            "slice": s["name"] + (" (too small)" if s["too_small"] else ""),
            "accuracy": s["metrics"]["accuracy"],
            "images": s["images"],
            "patients": s["patients"],
            "too_small": s["too_small"],
        }
        for s in report.get("slices", [])
    ]
    frame = pd.DataFrame(rows, columns=["slice", "accuracy", "images", "patients", "too_small"])
    return frame.sort_values(["accuracy", "slice"], kind="stable").reset_index(drop=True)


def metric_name(slice_name: str, metric: str) -> str:
    """`slice/<name>/<metric>`, with characters MLflow refuses in a key replaced by `_`."""
    clean = re.sub(r"[^A-Za-z0-9_.\- ]", "_", slice_name)
    return f"slice/{clean}/{metric}"


def tracked_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Every slice's defined metrics and size, as flat MLflow metrics."""
    flat: dict[str, float] = {}
    for s in report.get("slices", []):
        values = {**s["metrics"], "images": s["images"], "patients": s["patients"]}
        for metric, value in values.items():
            if value is not None:
                flat[metric_name(s["name"], metric)] = float(value)
    return flat


def _f(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def worst_markdown(reports: dict[str, dict[str, Any]], n: int = WORST_ROWS) -> str:
    """compare.md's table: each architecture's `n` worst gated slices by accuracy."""
    lines = [
        "## Worst slices",
        "",
        "| architecture | slice | images | patients | accuracy [95% CI] | sensitivity "
        "| specificity |",
        "|" + "---|" * 7,
    ]
    small = 0
    for arch, report in reports.items():
        small += sum(s["too_small"] for s in report.get("slices", []))
        for s in worst(report, n):
            m, lo_hi = s["metrics"], s["ci"].get("accuracy", [None, None])
            lines.append(
                f"| {arch} | {s['name']} | {s['images']} | {s['patients']} "
                f"| {_f(m['accuracy'])} [{_f(lo_hi[0])}, {_f(lo_hi[1])}] "
                f"| {_f(m.get('sensitivity'))} | {_f(m.get('specificity'))} |"
            )
    lines += [
        "",
        f"Slices from reports/eval/<arch>/slices.json; {small} slice(s) under "
        "evaluate.slices.min_images/min_patients are not listed and not gated.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- gate


def _size(s: dict[str, Any]) -> str:
    return f"n={s['images']} images, {s['patients']} patients"


def gate_slices(
    candidate: dict[str, Any] | None,
    champion: dict[str, Any] | None,
    cfg: SliceGateConfig,
    max_regression: float,
) -> dict[str, Any]:
    """Pure: the slice checks of the gate, each with its numbers, and a reason per failure.

    Every gated (not too small) candidate slice must reach the `min_*` floors; and where the
    champion's slices.json has the same slice (same name and definition, also not too small),
    no metric of `cfg.metrics` may drop by more than `cfg.max_regression` (null:
    `max_regression`, the gate's). A refusal names the slice, both values and its size.
    """
    checks: list[dict[str, Any]] = []
    reasons: list[str] = []
    if not cfg.enabled or candidate is None:
        return {"checks": checks, "reasons": reasons}
    floors = {
        "accuracy": cfg.min_accuracy,
        "sensitivity": cfg.min_sensitivity,
        "specificity": cfg.min_specificity,
    }
    bound = cfg.max_regression if cfg.max_regression is not None else max_regression
    theirs = {s["name"]: s for s in (champion or {}).get("slices", []) if not s["too_small"]}
    for s in candidate.get("slices", []):
        if s["too_small"]:
            continue
        for metric, floor in floors.items():
            value = s["metrics"].get(metric)
            if floor is None or value is None:
                continue
            ok = value >= floor
            checks.append(
                {"check": f"slice_min_{metric}", "slice": s["name"], "value": value}
                | {"bound": floor, "images": s["images"], "patients": s["patients"], "passed": ok}
            )
            if not ok:
                reasons.append(
                    f"slice {s['name']}: {metric} {value:.4f} is below "
                    f"gate.slices.min_{metric} {floor} ({_size(s)})"
                )
        champ = theirs.get(s["name"])
        if champ is None or champ.get("range") != s.get("range"):
            continue
        for metric in cfg.metrics:
            mine, before = s["metrics"].get(metric), champ["metrics"].get(metric)
            if mine is None or before is None:
                continue
            drop = before - mine
            ok = drop <= bound + 1e-12
            checks.append(
                {"check": "slice_regression", "slice": s["name"], "metric": metric}
                | {"value": mine, "champion": before, "drop": drop, "bound": bound}
                | {"images": s["images"], "patients": s["patients"], "passed": ok}
            )
            if not ok:
                reasons.append(
                    f"slice {s['name']}: {metric} {mine:.4f} is {drop:.4f} below the "
                    f"champion's {before:.4f} ({_size(s)}; champion n={champ['images']}; "
                    f"gate.slices.max_regression {bound})"
                )
    return {"checks": checks, "reasons": reasons}


def with_slice_checks(verdict: dict[str, Any], slices: dict[str, Any]) -> dict[str, Any]:
    """The gate's verdict with the slice checks added: it passes only if both pass."""
    reasons = [*verdict["reasons"], *slices["reasons"]]
    return verdict | {
        "checks": [*verdict["checks"], *slices["checks"]],
        "reasons": reasons,
        "passed": bool(verdict["passed"]) and not slices["reasons"],
    }
