"""The second dataset end to end, offline: `dvc repro` with `dataset.name: oct2017` on the
synthetic OCT generator (4 classes, grayscale JPEG B-scans, CLASS-PATIENT-N names), shrunk to
a few patients and the `tiny` model so it stays a ~2 minute test."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.test_pipeline import _copy_repo, _sh

pytestmark = pytest.mark.slow

CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]


def _oct_params(params_file) -> None:
    params = yaml.safe_load(params_file.read_text())
    params["dataset"].update({"name": "oct2017", "source": "synthetic"})
    params["dataset"]["synthetic_oct"].update(
        {"patients": 16, "images_per_patient": [4, 5], "width_choices": [160], "height": 144}
    )
    params["validate"].update(
        {"classes": CLASSES, "modes": ["L"], "formats": ["JPEG"], "min_per_class": 8}
    )
    params["train"].update({"architectures": ["tiny"], "epochs": 1, "overrides": {}})
    params["evaluate"].update(
        {"bootstrap": 50, "gradcam_examples": 2, "tflite_int8": False, "benchmark_images": 8}
    )
    params["gate"].update({"min_accuracy": 0.0})
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def test_oct2017_synthetic_repro_end_to_end(tmp_path):
    repo = tmp_path / "repo"
    _copy_repo(repo)
    _oct_params(repo / "params.yaml")
    _sh(["dvc", "repro"], repo)

    validation = json.loads((repo / "reports" / "validation.json").read_text())
    assert validation["success"] and validation["valid"] >= 16 * 4
    classes = json.loads((repo / "data" / "split" / "classes.json").read_text())
    assert classes["classes"] == CLASSES
    metrics = json.loads((repo / "reports" / "eval" / "tiny.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["accuracy_ci_low"] is not None
    summary = json.loads((repo / "reports" / "eval" / "tiny" / "summary.json").read_text())
    assert "accuracy" in summary
    promotion = json.loads((repo / "reports" / "promotion.json").read_text())
    assert promotion["model_name"] == "oct2017-classifier" and promotion["promoted"]
    assert "Running stage" not in _sh(["dvc", "repro"], repo).stdout
