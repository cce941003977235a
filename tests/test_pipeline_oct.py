"""The second dataset end to end, offline: `dvc repro` with `dataset.name: oct2017` on the
synthetic OCT generator (4 classes, grayscale JPEG B-scans, CLASS-PATIENT-N names), shrunk to
96 patients at 256x248 px so it stays a few-minute test, yet large enough that compact_cnn
learns it: a broken 4-class path (labels shuffled, one class dropped, argmax on the wrong
axis) lands near chance, 0.25, and fails the floor."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.test_pipeline import _copy_repo, _sh

pytestmark = pytest.mark.slow

CLASSES = ["CNV", "DME", "DRUSEN", "NORMAL"]
# compact_cnn scored 0.75 on this set's test patients in the proxy run (best-val epoch of 12);
# chance is 0.25 and the largest class ~0.3, so 0.5 separates learning from a broken path.
ACCURACY_FLOOR = 0.5


def _oct_params(params_file) -> None:
    params = yaml.safe_load(params_file.read_text())
    params["dataset"].update({"name": "oct2017", "source": "synthetic"})
    params["dataset"]["synthetic_oct"].update(
        {"patients": 96, "images_per_patient": [8, 10], "width_choices": [256], "height": 248}
    )
    params["validate"].update({"classes": CLASSES, "modes": ["L"], "formats": ["JPEG"]})
    params["train"].update({"architectures": ["compact_cnn"], "epochs": 12, "overrides": {}})
    params["evaluate"].update(
        {"bootstrap": 50, "gradcam_examples": 2, "tflite_int8": False, "benchmark_images": 8}
    )
    params["gate"].update({"min_accuracy": ACCURACY_FLOOR})
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
    metrics = json.loads((repo / "reports" / "eval" / "compact_cnn.json").read_text())
    assert metrics["accuracy"] >= ACCURACY_FLOOR, metrics
    assert metrics["accuracy_ci_low"] is not None
    details = json.loads((repo / "reports" / "eval" / "compact_cnn" / "details.json").read_text())
    test = details  # the test split's metrics, at the top of details.json
    per_class = test["per_class"]
    assert list(per_class) == CLASSES
    assert sum(c["support"] for c in per_class.values()) == test["support"]
    # every class is predicted and found: a path that drops or merges a class fails here
    assert all(c["support"] > 0 and c["sensitivity"] > 0 for c in per_class.values()), per_class
    assert sum(map(sum, test["confusion_matrix"])) == test["support"]
    promotion = json.loads((repo / "reports" / "promotion.json").read_text())
    assert promotion["model_name"] == "oct2017-classifier" and promotion["promoted"]
    assert "Running stage" not in _sh(["dvc", "repro"], repo).stdout
