"""The model card builder (pure): what a run recorded becomes the card's fields, missing
records stay empty and are named, and limitations are generated from the numbers."""

from __future__ import annotations

import json

import pytest

from medimg.analysis.card import (
    REQUIRED,
    CardSources,
    build_card,
    card_markdown,
    missing_required,
    summary_markdown,
)
from medimg.config import CardConfig

DETAILS = {
    "architecture": "compact_cnn",
    "accuracy": 0.9,
    "sensitivity": 0.92,
    "specificity": 0.88,
    "roc_auc": 0.95,
    "ci": {
        "accuracy": {"low": 0.7, "high": 0.95},  # 0.25 wide: a limitation at wide_ci 0.1
        "roc_auc": {"low": 0.93, "high": 0.97},
    },
    "operating_point": {
        "threshold": 0.31,
        "rule": "bootstrap_lower",
        "target_sensitivity": 0.95,
        "chosen_on": "val",
        "accuracy": 0.88,
        "sensitivity": 0.96,
    },
    "calibration": {"temperature": 1.7, "ece_before": 0.08, "ece_after": 0.02},
    "patient_level": {
        "patients": 12,
        "patient_sensitivity": 1.0,
        "patient_sensitivity_ci": [0.8, 1.0],
    },
}
SLICES = {
    "min_images": 30,
    "slices": [
        {
            "name": "class.Parasitized",
            "images": 300,
            "patients": 20,
            "too_small": False,
            "metrics": {"accuracy": 0.91},
            "ci": {"accuracy": [0.88, 0.94]},
        },
        {
            "name": "brightness.low",
            "images": 200,
            "patients": 15,
            "too_small": False,
            "metrics": {"accuracy": 0.6},
            "ci": {"accuracy": [0.55, 0.65]},
        },
        {
            "name": "source.siteB",
            "images": 12,
            "patients": 2,
            "too_small": True,
            "metrics": {"accuracy": 0.5},
            "ci": {"accuracy": [0.2, 0.8]},
        },
    ],
}
SPLIT = {
    "fingerprint": "fp-123",
    "classes": ["Uninfected", "Parasitized"],
    "positive_class": "Parasitized",
    "patients": {"train": 70, "val": 15, "test": 15},
    "images": {"train": 700, "val": 150, "test": 150},
}


def sources(**changes) -> CardSources:
    base = dict(
        name="malaria-classifier",
        version="3",
        run_id="r" * 32,
        params={"train.epochs": "8", "plan.image_size": "96", "dataset.name": "malaria"},
        tags={
            "architecture": "compact_cnn",
            "git_commit": "abc123",
            "dataset_fingerprint": "fp-123",
        },
        artifacts={
            "details": DETAILS,
            "summary": {"params": 1234, "keras_bytes": 56789},
            "slices": SLICES,
        },
        artifact_names=("details.json", "gradcam_Parasitized.png", "gradcam_Uninfected.png"),
        split=SPLIT,
        created="2026-11-30T06:00:00Z",
        registered_by="ci-bot",
    )
    return CardSources(**(base | changes))


def test_card_fields_come_from_the_run_records() -> None:
    card = build_card(sources(), CardConfig(), {"accuracy": 0.8})
    md = card["model_details"]
    assert (md["name"], md["version"], md["architecture"]) == (
        "malaria-classifier",
        "3",
        "compact_cnn",
    )
    assert (md["params_count"], md["size_bytes"], md["git_commit"]) == (1234, 56789, "abc123")
    assert md["registered_by"] == "ci-bot"
    data = card["model_parameters"]["data"]
    assert data["fingerprint"] == "fp-123" and data["classes"] == ["Uninfected", "Parasitized"]
    assert data["splits"]["test"] == {"patients": 15, "images": 150}
    qa = card["quantitative_analysis"]
    assert qa["at_0_5"]["accuracy"] == {"value": 0.9, "ci": [0.7, 0.95]}
    assert qa["served"]["threshold"] == 0.31 and qa["served"]["rule"] == "bootstrap_lower"
    assert qa["served"]["metrics"]["sensitivity"]["value"] == 0.96
    assert qa["calibration"] == {"temperature": 1.7, "ece_before": 0.08, "ece_after": 0.02}
    assert qa["patient_level"]["patient_sensitivity_ci"] == [0.8, 1.0]
    assert qa["graphics"] == ["gradcam_Parasitized.png", "gradcam_Uninfected.png"]
    assert card["considerations"]["intended_use"] == CardConfig().intended_use
    assert missing_required(card) == []
    json.dumps(card)  # JSON-ready


def test_limitations_name_slices_under_floor_small_slices_and_wide_cis() -> None:
    lims = build_card(sources(), CardConfig(), {"accuracy": 0.8})["considerations"]["limitations"]
    text = "\n".join(lims)
    assert "brightness.low" in text and "accuracy 0.6000 < 0.8" in text
    assert "class.Parasitized: under" not in text  # 0.91 is above the floor
    assert "source.siteB" in text  # too small (12 images); not gated, but named
    assert "slice source.siteB: under" not in text
    assert "accuracy at 0.5: 95% CI [0.7000, 0.9500]" in text
    assert "roc_auc at 0.5" not in text  # 0.04 wide


def test_absent_slices_and_patient_results_are_stated_not_invented() -> None:
    details = {k: v for k, v in DETAILS.items() if k != "patient_level"}
    card = build_card(sources(artifacts={"details": details}), CardConfig())
    qa = card["quantitative_analysis"]
    assert qa["slices"] == [] and qa["patient_level"] == {}
    lims = " ".join(card["considerations"]["limitations"])
    assert "no slice results" in lims and "no patient-level results" in lims
    assert card["model_details"]["params_count"] is None  # no summary: unknown, not zero


def test_metrics_fall_back_to_the_run_metrics_and_tags() -> None:
    src = sources(
        artifacts={},
        metrics={"test_accuracy": 0.8, "test_accuracy_ci_low": 0.7, "test_accuracy_ci_high": 0.85},
        tags={
            "architecture": "tiny",
            "git_commit": "c",
            "eval_fingerprint": "fp-9",
            "operating_threshold": "0.4",
            "test_params": "99",
        },
        split={**SPLIT, "fingerprint": "another-split"},
    )
    card = build_card(src, CardConfig())
    assert card["quantitative_analysis"]["at_0_5"]["accuracy"] == {"value": 0.8, "ci": [0.7, 0.85]}
    assert card["quantitative_analysis"]["served"]["threshold"] == 0.4
    assert card["model_details"]["params_count"] == 99
    data = card["model_parameters"]["data"]
    assert data["fingerprint"] == "fp-9" and data["splits"] == {}  # another split's counts: no


@pytest.mark.parametrize(
    ("changes", "cfg", "field"),
    [
        ({}, CardConfig(intended_use="  "), "considerations.intended_use"),
        ({}, CardConfig(out_of_scope=""), "considerations.out_of_scope"),
        (
            {"tags": {"architecture": "a", "dataset_fingerprint": "f"}},
            CardConfig(),
            "model_details.git_commit",
        ),
        (
            {"tags": {"architecture": "a", "git_commit": "c"}, "split": None},
            CardConfig(),
            "model_parameters.data.fingerprint",
        ),
        ({"artifacts": {}}, CardConfig(), "quantitative_analysis.at_0_5.accuracy"),
    ],
)
def test_missing_required_names_the_empty_field(changes, cfg, field) -> None:
    assert field in REQUIRED
    assert missing_required(build_card(sources(**changes), cfg)) == [field]


def test_markdown_has_every_section_and_the_summary_links_the_card() -> None:
    card = build_card(sources(), CardConfig(), {"accuracy": 0.8})
    text = card_markdown(card)
    for heading in (
        "Model details",
        "Intended use",
        "Out of scope",
        "Training and evaluation data",
        "Metrics",
        "Operating threshold",
        "Calibration",
        "Slices",
        "Patient-level results",
        "Grad-CAM examples",
        "Limitations",
    ):
        assert f"## {heading}" in text
    assert "| accuracy | 0.9000 [0.7000, 0.9500] | 0.8800 |" in text
    assert "| test | 15 | 150 |" in text and "gradcam_Uninfected.png" in text
    summary = summary_markdown(card, "artifact card/model_card.md")
    assert "malaria-classifier v3" in summary and "ci-bot" in summary
    assert "artifact card/model_card.md" in summary and len(summary) < 4900


def test_card_reads_the_served_headline_and_the_0_5_figures_apart() -> None:
    """Since issue 18 details.json's headline and CIs are at the served threshold and the 0.5
    rates sit under `at_0.5`: the card must not show served numbers as "at 0.5"."""
    served = {"accuracy": 0.88, "sensitivity": 0.96, "specificity": 0.8}
    details = DETAILS | served | {"at_0.5": {"accuracy": 0.9, "sensitivity": 0.92}}
    details["operating_point"] = DETAILS["operating_point"] | served
    arts = {"details": details, "summary": {"accuracy": 0.88}}
    qa = build_card(sources(artifacts=arts), CardConfig(), {})["quantitative_analysis"]
    assert qa["at_0_5"]["accuracy"] == {"value": 0.9, "ci": None}
    assert qa["at_0_5"]["roc_auc"]["ci"] == [0.93, 0.97]  # threshold-free: its CI stands
    assert qa["served"]["metrics"]["accuracy"] == {"value": 0.88, "ci": [0.7, 0.95]}
