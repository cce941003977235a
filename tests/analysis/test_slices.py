from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medimg.analysis.slices import (
    gate_slices,
    patient_size_slices,
    plot_rows,
    property_slices,
    quantile_edges,
    slice_report,
    source_slices,
    tracked_metrics,
    with_slice_checks,
    worst_markdown,
)
from medimg.config import GateConfig, SliceConfig, SliceGateConfig
from medimg.promotion import decide

CLASSES = ["Uninfected", "Parasitized"]


def _props(paths: list[str], brightness: np.ndarray) -> pd.DataFrame:
    n = len(paths)
    return pd.DataFrame(
        {
            "path": paths,
            "brightness": brightness,
            "contrast": np.linspace(0.1, 0.3, n),
            "saturation": np.zeros(n),  # grey: constant, so no saturation slices
            "sharpness": np.linspace(10.0, 500.0, n),
            "size": np.full(n, 96.0 * 96.0),
        }
    )


def _case(n: int = 600, seed: int = 0):
    """Binary test set of 30 patients; the model fails on the darkest third of the images."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    patients = [f"P{i % 30}" for i in range(n)]
    paths = [f"site{'AB'[i % 2]}/img{i}.png" for i in range(n)]
    brightness = rng.uniform(0, 1, n)
    pred = y.copy()
    dark = brightness < 1 / 3
    flip = dark & (rng.uniform(0, 1, n) < 0.5)
    pred[flip] = 1 - pred[flip]
    val = _props([f"v{i}" for i in range(300)], np.linspace(0, 1, 300))
    val_patients = [f"V{i % 20}" for i in range(300)]
    return y, pred, patients, paths, _props(paths, brightness), val, val_patients


def _report(cfg: SliceConfig | None = None, **kw):
    y, pred, patients, paths, test, val, val_patients = _case(**kw)
    return slice_report(
        y,
        pred,
        patients,
        paths,
        CLASSES,
        test,
        val,
        val_patients,
        cfg or SliceConfig(source=r"^(site\w)/"),
        threshold=0.4,
        resamples=50,
        ci=0.95,
        seed=0,
    )


def _slice(report: dict, name: str) -> dict:
    return next(s for s in report["slices"] if s["name"] == name)


def test_quantile_edges_come_from_the_reference_and_collapse_on_ties():
    assert quantile_edges(np.arange(9.0), 3) == pytest.approx([8 / 3, 16 / 3])
    assert quantile_edges(np.full(5, 2.0), 3).size == 0  # constant: no slices
    assert quantile_edges(np.array([1.0, 1, 1, 1, 2]), 3).size == 1  # two values: two bins


def test_property_bins_use_val_edges_not_test_quantiles():
    val = pd.DataFrame({"brightness": np.linspace(0, 1, 99)})
    test = pd.DataFrame({"brightness": [0.9, 0.95, 0.99, 0.1]})  # all but one bright
    masks, defs = property_slices(test, val, ["brightness"], 3)
    assert masks["brightness.high"].tolist() == [True, True, True, False]
    assert masks["brightness.low"].tolist() == [False, False, False, True]
    assert (
        defs["brightness.low"]["range"][0] is None and defs["brightness.high"]["range"][1] is None
    )


def test_the_dark_slice_shows_the_failure_the_headline_hides():
    report = _report()
    names = {s["name"] for s in report["slices"]}
    assert {"class.Uninfected", "class.Parasitized", "patients.many_cells"} <= names
    assert {"brightness.low", "brightness.mid", "brightness.high", "source.siteA"} <= names
    assert not any(n.startswith("saturation.") or n.startswith("size.") for n in names)
    low, high = _slice(report, "brightness.low"), _slice(report, "brightness.high")
    assert low["metrics"]["accuracy"] < 0.8 < high["metrics"]["accuracy"] == 1.0
    lo, hi = low["ci"]["accuracy"]
    assert lo <= low["metrics"]["accuracy"] <= hi
    assert low["patients"] == 30 and not low["too_small"]
    assert report["threshold"] == 0.4 and report["bins_from"] == "val"
    parasitized = _slice(report, "class.Parasitized")
    assert parasitized["metrics"]["sensitivity"] == parasitized["metrics"]["accuracy"]
    assert parasitized["metrics"]["specificity"] is None and "precision" in parasitized["metrics"]
    worst = plot_rows(report)
    assert worst["slice"].iloc[0] == "brightness.low"  # the plot lists the worst first


def test_small_slices_are_flagged():
    report = _report(SliceConfig(min_images=10_000))
    assert all(s["too_small"] for s in report["slices"])
    report = _report(SliceConfig(min_patients=31))
    assert all(s["too_small"] for s in report["slices"])


def test_multiclass_slices_report_per_class_recall():
    rng = np.random.default_rng(1)
    classes = ["CNV", "DME", "DRUSEN", "NORMAL"]
    y = rng.integers(0, 4, 200)
    pred = np.where(y == 2, 3, y)  # DRUSEN always called NORMAL
    paths = [f"p{i}" for i in range(200)]
    props = _props(paths, rng.uniform(0, 1, 200))
    report = slice_report(
        y,
        pred,
        [f"P{i % 12}" for i in range(200)],
        paths,
        classes,
        props,
        props,
        [f"P{i % 12}" for i in range(200)],
        SliceConfig(),
        threshold=None,
        resamples=20,
        ci=0.95,
        seed=0,
    )
    drusen = _slice(report, "class.DRUSEN")
    assert drusen["metrics"]["accuracy"] == 0.0 and drusen["metrics"]["recall.DRUSEN"] == 0.0
    assert _slice(report, "class.NORMAL")["metrics"]["precision"] < 1.0
    assert set(_slice(report, "brightness.mid")["metrics"]) >= {"accuracy", "recall.CNV"}
    assert report["task"] == "multiclass"


def test_patient_size_and_source_slices():
    masks, defs = patient_size_slices(["a", "a", "a", "b"], ["x", "x", "y", "y"])
    assert masks["patients.many_cells"].tolist() == [True, True, True, False]
    assert defs["patients.few_cells"]["cells_per_patient_edge"] == 2
    masks, _ = source_slices(["s1/a.png", "s2/b.png", "c.png"], r"^(s\d)/")
    assert {k: v.tolist() for k, v in masks.items()} == {
        "source.s1": [True, False, False],
        "source.s2": [False, True, False],
        "source.unmatched": [False, False, True],
    }


def test_mlflow_names_and_compare_table():
    report = _report()
    flat = tracked_metrics(report)
    assert (
        flat["slice/brightness.low/accuracy"]
        == _slice(report, "brightness.low")["metrics"]["accuracy"]
    )
    assert "slice/class.Uninfected/specificity" in flat
    assert "slice/class.Parasitized/specificity" not in flat  # None: not logged
    text = worst_markdown({"tiny": report}, n=2)
    assert "| tiny | brightness.low |" in text and text.count("| tiny |") == 2


def _with_low(report: dict, accuracy: float) -> dict:
    slices = [
        s | {"metrics": s["metrics"] | {"accuracy": accuracy}}
        if s["name"] == "brightness.low"
        else s
        for s in report["slices"]
    ]
    return report | {"slices": slices}


def test_gate_refuses_a_slice_regression_although_overall_accuracy_improves():
    champion_slices = _with_low(_report(), 0.90)
    candidate_slices = _with_low(_report(), 0.70)
    cfg = GateConfig(min_accuracy=0.5, max_regression=0.01)
    overall = decide({"accuracy": 0.95}, {"accuracy": 0.90}, None, cfg)
    assert overall["passed"]  # the headline alone would promote it
    verdict = with_slice_checks(
        overall, gate_slices(candidate_slices, champion_slices, cfg.slices, cfg.max_regression)
    )
    assert not verdict["passed"]
    (reason,) = verdict["reasons"]
    low = _slice(candidate_slices, "brightness.low")
    assert reason.startswith("slice brightness.low: accuracy 0.7000 is 0.2000 below")
    assert "champion's 0.9000" in reason and f"n={low['images']} images, 30 patients" in reason
    failed = [c for c in verdict["checks"] if not c["passed"]]
    assert failed[0]["slice"] == "brightness.low" and failed[0]["champion"] == 0.9


def test_gate_floors_and_too_small_slices():
    report = _with_low(_report(), 0.5)
    floors = SliceGateConfig(min_accuracy=0.6)
    result = gate_slices(report, None, floors, 0.01)
    assert [r.split(":")[0] for r in result["reasons"]] == ["slice brightness.low"]
    assert "gate.slices.min_accuracy 0.6" in result["reasons"][0]
    small = report | {
        "slices": [s | {"too_small": s["name"] == "brightness.low"} for s in report["slices"]]
    }
    assert gate_slices(small, None, floors, 0.01)["reasons"] == []  # not gated
    assert gate_slices(report, report, SliceGateConfig(enabled=False), 0.0)["checks"] == []
    # a champion slice with another definition (other bin edges) is not compared
    moved = report | {
        "slices": [s | {"range": [0.0, 0.1]} if "range" in s else s for s in report["slices"]]
    }
    worse = _with_low(report, 0.1)
    assert gate_slices(worse, moved, SliceGateConfig(), 0.01)["reasons"] == []
    assert gate_slices(worse, report, SliceGateConfig(), 0.01)["reasons"]


def test_register_refuses_a_candidate_whose_slice_regressed_and_medimg_gate_agrees(
    tmp_path, capsys
):
    from medimg import tracking
    from medimg.commands.gate import gate
    from medimg.io import write_json
    from medimg.register import run
    from tests.conftest import log_candidate, tiny_params

    params = tiny_params(tmp_path, train={"architectures": ["tiny"]}, gate={"min_accuracy": 0.5})
    params.paths.classes_json.parent.mkdir(parents=True, exist_ok=True)
    write_json(params.paths.classes_json, {"fingerprint": "fp1"})
    correct = np.ones(200, bool)

    def candidate(accuracy: float, low: float) -> None:
        correct[:] = True
        correct[: round((1 - accuracy) * 200)] = False
        params.paths.eval_metrics("tiny").parent.mkdir(parents=True, exist_ok=True)
        run_id = log_candidate(params, "tiny", correct.copy())
        slices = params.paths.eval_reports("tiny") / "slices.json"
        write_json(slices, _with_low(_report(), low))
        with tracking.run(run_id=run_id):  # as evaluate logs it: eval/slices.json
            tracking.log_artifact(slices, "eval")

    candidate(0.90, low=0.90)
    assert run(params)["promoted"]
    candidate(0.95, low=0.70)  # better overall, worse on dark images
    record = run(params)
    assert record["candidate"]["accuracy"] == 0.95 and record["champion_before"]["accuracy"] == 0.9
    assert not record["passed"] and not record["promoted"]
    assert (
        len(record["reasons"]) == 1
        and "slice brightness.low: accuracy 0.7000" in (record["reasons"][0])
    )
    compare = (Path(params.paths.reports) / "compare.md").read_text()
    assert "## Worst slices" in compare and "| tiny | brightness.low |" in compare
    capsys.readouterr()
    assert gate(params) == 1  # the re-check sees the slice too
    assert "slice brightness.low" in capsys.readouterr().out


def test_worst_slice_metrics_names_the_lowest_gated_slice():
    from medimg.analysis.slices import worst_slice_metrics

    def row(name, acc, small=False):
        return {"name": name, "too_small": small, "metrics": {"accuracy": acc}}

    report = {"slices": [row("a", 0.9), row("tiny", 0.1, small=True), row("b", 0.7)]}
    assert worst_slice_metrics(report) == {"worst_slice": "b", "worst_slice_accuracy": 0.7}
    assert worst_slice_metrics(None) == {} and worst_slice_metrics({"slices": []}) == {}
