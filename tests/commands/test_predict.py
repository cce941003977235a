"""`medimg predict / explain / export` and the pure input handling behind them and serving.

One tiny model is trained (1 epoch, `fit`), logged as the serving pyfunc and registered as
champion once per module; a second tiny model trained to separate the planted squares (40
quick epochs, saved as a `.keras` file) carries the int8 parity check, which a 1-epoch model
with every probability near 0.5 could fail by chance.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from medimg import cli, tracking
from medimg.classifier_logging import ServingConfig, log_classifier
from medimg.commands.export import MIN_AGREEMENT
from medimg.commands.predict import collect_paths, format_rows
from medimg.io import write_json
from medimg.scoring import result_frame
from tests.conftest import nih_name, png_bytes, tiny_params, write_split_dir

NAME = "malaria-classifier"
CLASSES = ["Uninfected", "Parasitized"]


def tiny_reference(params, model_file: Path) -> dict:
    """The monitoring reference evaluate would store for this model (its own function), with
    val scored at 0.5."""
    from medimg.data.shards import stream_split
    from medimg.evaluate import monitoring_reference
    from medimg.io import read_json
    from medimg.models.loading import load_model
    from medimg.scoring import probabilities

    model = load_model(model_file)
    score = {"p": lambda x: probabilities(model, x)}
    _, _, _, out = stream_split(params.paths.split, "val", 32, score)
    info = read_json(params.paths.classes_json)
    return monitoring_reference(model, params, 32, info, out["p"], CLASSES, 0.5)


def train_and_register(tmp: Path) -> SimpleNamespace:
    """`fit` tiny for 1 epoch, log its served model (models from code), register it as champion."""
    from medimg.train import fit

    params = tiny_params(tmp)
    write_split_dir(params)
    result = fit(params, "tiny")
    example = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    model_file, config = params.paths.model_file("tiny"), ServingConfig(CLASSES, 32)
    reference = tmp / "reference.json"  # the drift reference, as evaluate stores it
    write_json(reference, tiny_reference(params, model_file))
    uri, _ = log_classifier(
        model_file, config, example, run_id=result["run_id"], reference=reference
    )  # as evaluate
    version = tracking.register_version(uri, NAME, {"architecture": "tiny"})
    tracking.set_alias(NAME, "champion", version)
    params_file = tmp / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    return SimpleNamespace(
        params=params, params_file=params_file, run_id=result["run_id"], version=version, uri=uri
    )


@pytest.fixture(scope="module")
def reg(tmp_path_factory) -> SimpleNamespace:
    return train_and_register(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def separating_model(reg, tmp_path_factory) -> Path:
    """A tiny model that has learnt the split's planted squares, as a `.keras` file."""
    import keras

    from medimg.models import build_model
    from tests.conftest import load_arrays

    x, y, _, _ = load_arrays(reg.params.paths.split, "train", 32)
    keras.utils.set_random_seed(0)
    model = build_model("tiny", (32, 32, 3), 2)
    model.compile(keras.optimizers.Adam(0.03), "binary_crossentropy")
    model.fit(x, y.astype("float32"), batch_size=16, epochs=40, verbose=0)
    path = tmp_path_factory.mktemp("keras") / "separating.keras"
    model.save(path)
    return path


def medimg(reg: SimpleNamespace, *argv: str) -> int:
    """Run the CLI in-process; the exit code."""
    with pytest.raises(SystemExit) as done:
        cli.main(["--params", str(reg.params_file), *argv])
    return int(done.value.code)


def image_file(path: Path, mode: str = "RGB", size: int = 40, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(size, mode=mode, seed=seed))
    return path


# ------------------------------------------------------------------------------------- paths


def test_collect_paths_walks_folders_expands_globs_and_reports_missing(tmp_path):
    a = image_file(tmp_path / "a.png")
    nested = image_file(tmp_path / "cells" / "x" / "y" / "deep.JPG")
    image_file(tmp_path / "cells" / ".hidden" / "skip.png")
    (tmp_path / "cells" / "notes.txt").write_text("not an image")
    notes = tmp_path / "notes.md"
    notes.write_text("named explicitly")
    g1, g2 = image_file(tmp_path / "g" / "1.png", seed=1), image_file(tmp_path / "g" / "2.png")

    files, problems = collect_paths(
        [
            str(a),
            str(tmp_path / "cells"),
            str(tmp_path / "g" / "*.png"),
            str(notes),
            str(a),
            str(tmp_path / "missing.png"),
            str(tmp_path / "nothing" / "*.png"),
        ]
    )
    assert files == [a, nested, g1, g2, notes]  # folder walk skips .txt and hidden; no dupes
    assert problems == [
        (str(tmp_path / "missing.png"), "no such file or directory"),
        (str(tmp_path / "nothing" / "*.png"), "no such file or directory"),
    ]
    recursive, _ = collect_paths([str(tmp_path / "**" / "*.png")])
    assert set(recursive) == {a, g1, g2}  # `**` crosses folders but not into hidden ones


def test_a_folder_lists_every_image_suffix_validate_keeps(tmp_path):
    """One suffix list: a .ppm or .pgm cell that validate kept is predicted, not skipped."""
    from medimg.data.images import decode_image
    from medimg.data.manifest import is_junk

    folder = tmp_path / "cells"
    folder.mkdir()
    ppm, pgm = folder / "a.ppm", folder / "b.PGM"
    ppm.write_bytes(png_bytes(40, fmt="PPM"))
    pgm.write_bytes(png_bytes(40, mode="L", fmt="PPM"))
    files, problems = collect_paths([str(folder)])
    assert files == [ppm, pgm] and problems == []
    assert not any(is_junk(f"cell_images/Parasitized/{f.name}", ()) for f in files)
    assert decode_image(ppm.read_bytes()).shape == decode_image(pgm.read_bytes()).shape


def test_formats():
    frame = result_frame(np.array([0.9, 0.2]), CLASSES, 0.5)
    frame.insert(0, "path", ["a.png", "dir/b.png"])
    table = format_rows(frame, "table").splitlines()
    assert table[0].split() == ["path", "class", "probability", "p_Parasitized", "threshold"]
    assert table[2].split() == ["dir/b.png", "Uninfected", "0.8000", "0.2000", "0.5000"]
    records = json.loads(format_rows(frame, "json"))
    assert records[0] == {
        "path": "a.png",
        "class": "Parasitized",
        "probability": 0.9,
        "p_Parasitized": 0.9,
        "threshold": 0.5,
    }
    assert pd.read_csv(io.StringIO(format_rows(frame, "csv"))).shape == (2, 5)


# ------------------------------------------------------------------------------- predict CLI


def test_predict_reports_broken_files_and_predicts_the_rest(reg, tmp_path, capsys):
    folder = tmp_path / "cells"
    good = [
        image_file(folder / "rgb.png", seed=1),
        image_file(folder / "sub" / "grey.png", "L"),
        image_file(folder / "sub" / "alpha.png", "RGBA", size=50),
    ]
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out.csv"

    code = medimg(reg, "predict", str(folder), "--format", "csv", "-o", str(out))
    assert code == 1
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("error:")] == [
        f"error: {folder / 'broken.png'}: corrupt image (Truncated File Read)"
    ]
    frame = pd.read_csv(out)
    assert sorted(frame["path"]) == sorted(str(p) for p in good)
    assert set(frame["class"]) <= set(CLASSES)
    assert frame["probability"].between(0.5, 1).all() and frame["p_Parasitized"].between(0, 1).all()
    assert (frame["threshold"] == 0.5).all()


def test_predict_log_has_no_mlflow_download_bar(reg, tmp_path, capsys):
    """stderr is not a terminal here (as in `medimg predict DIR 2>err`): no progress spam."""
    image = image_file(tmp_path / "cell.png", seed=3)
    assert medimg(reg, "predict", str(image), "--model", "champion") == 0
    assert "Downloading artifacts" not in capsys.readouterr().err


def test_predict_json_and_table_with_a_quoted_glob(reg, tmp_path, capsys):
    for i in range(3):
        image_file(tmp_path / f"cell{i}.png", seed=i)
    assert medimg(reg, "predict", str(tmp_path / "cell*.png"), "--format", "json") == 0
    records = json.loads(capsys.readouterr().out)
    assert [Path(r["path"]).name for r in records] == ["cell0.png", "cell1.png", "cell2.png"]
    assert set(records[0]) == {"path", "class", "probability", "p_Parasitized", "threshold"}

    assert medimg(reg, "predict", str(tmp_path), "--batch-size", "2") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["path", "class", "probability"] and len(lines) == 4


def test_predict_without_paths_exits_2(reg, tmp_path, capsys):
    assert medimg(reg, "predict") == 2
    assert "no image paths given" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert medimg(reg, "predict", str(tmp_path / "empty")) == 2
    assert "no image files found" in capsys.readouterr().err


def test_model_specs_resolve_to_the_same_model(reg, tmp_path, capsys):
    image = image_file(tmp_path / "cell.png", seed=7)
    keras_file = str(reg.params.paths.model_file("tiny"))
    specs = [
        "champion",
        reg.version,
        reg.run_id,
        reg.uri,
        f"runs:/{reg.run_id}/classifier",
        f"models:/{NAME}@champion",
        f"models:/{NAME}/{reg.version}",
        keras_file,
    ]
    probs = set()
    for spec in specs:
        assert medimg(reg, "predict", str(image), "--model", spec, "--format", "csv") == 0, spec
        probs.add(
            round(float(pd.read_csv(io.StringIO(capsys.readouterr().out))["p_Parasitized"][0]), 6)
        )
    assert len(probs) == 1

    assert medimg(reg, "predict", str(image), "--model", "challenger") == 1
    assert "malaria-classifier: no alias 'challenger'" in capsys.readouterr().err
    assert medimg(reg, "predict", str(image), "--model", str(tmp_path / "nope.keras")) == 1
    assert "nope.keras: model file not found" in capsys.readouterr().err


def test_threshold_comes_from_the_version_tag_unless_overridden(reg, tmp_path, capsys):
    from mlflow import MlflowClient

    image = image_file(tmp_path / "cell.png", seed=7)
    MlflowClient().set_model_version_tag(NAME, reg.version, "operating_threshold", "0.99")
    try:
        assert medimg(reg, "predict", str(image), "--format", "json") == 0
        row = json.loads(capsys.readouterr().out)[0]
        assert row["threshold"] == 0.99 and row["class"] == "Uninfected"
        assert medimg(reg, "predict", str(image), "--format", "json", "--threshold", "0.01") == 0
        row = json.loads(capsys.readouterr().out)[0]
        assert row["threshold"] == 0.01 and row["class"] == "Parasitized"
    finally:
        MlflowClient().delete_model_version_tag(NAME, reg.version, "operating_threshold")


def test_predict_by_patient_pools_the_cells_and_calls_at_the_stored_patient_threshold(
    reg, tmp_path, capsys
):
    """NIH names give the patient (C33P1thinF_... -> C33, in both class folders); names that
    do not parse make their folder one patient. The rows agree with the per-cell output, and
    the call uses the version's `patient_threshold` tag unless overridden."""
    from mlflow import MlflowClient

    folder = tmp_path / "smears"
    image_file(folder / "Parasitized" / nih_name(33, 1), seed=1)
    image_file(folder / "Uninfected" / nih_name(33, 2), seed=2)
    image_file(folder / "Uninfected" / nih_name(7, 3), seed=3)
    image_file(folder / "ward" / "cell_a.png", seed=4)
    image_file(folder / "ward" / "cell_b.png", seed=5)
    assert medimg(reg, "predict", str(folder), "--format", "json") == 0
    cells = json.loads(capsys.readouterr().out)
    assert medimg(reg, "predict", str(folder), "--format", "json", "--by-patient") == 0
    rows = {r["patient"]: r for r in json.loads(capsys.readouterr().out)}
    ward = str(folder / "ward")
    assert {k: r["cells"] for k, r in rows.items()} == {"C33": 2, "C7": 1, ward: 2}
    owner = lambda path: "C33" if "C33P" in path else "C7" if "C7P" in path else ward  # noqa: E731
    for patient, row in rows.items():
        called = [c["class"] == "Parasitized" for c in cells if owner(c["path"]) == patient]
        assert row["parasitized_cells"] == sum(called)
        assert row["parasitemia"] == pytest.approx(sum(called) / len(called))
        # no patient threshold stored with this model: infected on any called cell
        assert row["call"] == ("infected" if any(called) else "healthy")
        assert row["patient_threshold"] is None

    # cell threshold 0: every cell parasitized, parasitemia 1 -> infected at any threshold
    MlflowClient().set_model_version_tag(NAME, reg.version, "patient_threshold", "0.75")
    try:
        argv = ["predict", str(folder), "--format", "json", "--by-patient", "--threshold", "0"]
        assert medimg(reg, *argv) == 0
        rows = json.loads(capsys.readouterr().out)
        assert {r["parasitemia"] for r in rows} == {1.0}
        assert {r["call"] for r in rows} == {"infected"}
        assert {r["patient_threshold"] for r in rows} == {0.75}
        # cell threshold 1: no cell called, parasitemia 0 -> healthy unless the threshold is 0
        argv[-1] = "1"
        assert medimg(reg, *argv) == 0
        assert {r["call"] for r in json.loads(capsys.readouterr().out)} == {"healthy"}
        assert medimg(reg, *argv, "--patient-threshold", "0") == 0
        rows = json.loads(capsys.readouterr().out)
        assert {r["call"] for r in rows} == {"infected"}
        assert {r["patient_threshold"] for r in rows} == {0.0}
        assert medimg(reg, *argv, "--patient-threshold", "2") == 2
        assert "patient threshold must be in [0, 1]" in capsys.readouterr().err
    finally:
        MlflowClient().delete_model_version_tag(NAME, reg.version, "patient_threshold")

    assert medimg(reg, "predict", str(folder), "--by-patient") == 0  # the table
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "patient",
        "cells",
        "parasitized_cells",
        "parasitemia",
        "call",
        "patient_threshold",
    ]
    assert len(lines) == 4


# ------------------------------------------------------------------------------- explain CLI


def test_explain_writes_an_overlay_png(reg, tmp_path, capsys):
    image = image_file(tmp_path / "cell.png", size=300, seed=2)
    out = tmp_path / "out" / "overlay.png"
    assert medimg(reg, "explain", str(image), "-o", str(out)) == 0
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width == 300 and 300 < img.height <= 300 + 40
    assert f"explain {image}: " in capsys.readouterr().out
    assert not list(out.parent.glob(".*"))  # atomic: no temporary left behind

    small = image_file(tmp_path / "small.png", size=32)
    assert medimg(reg, "explain", str(small), "-o", str(tmp_path / "small_cam.png")) == 0
    with Image.open(tmp_path / "small_cam.png") as img:
        assert img.width == 256  # upscaled so the title stays readable

    (tmp_path / "junk.png").write_text("nope")
    assert medimg(reg, "explain", str(tmp_path / "junk.png"), "-o", str(tmp_path / "j.png")) == 3
    assert "junk.png: not an image" in capsys.readouterr().err


# -------------------------------------------------------------------------------- export CLI


def test_export_none_writes_the_default_file_and_logs_to_the_run(reg, capsys):
    from mlflow import MlflowClient

    assert medimg(reg, "export", "--format", "tflite", "--quantize", "none") == 0
    dest = Path(reg.params.paths.models) / "export" / f"{NAME}-v{reg.version}-none.tflite"
    assert dest.read_bytes()[4:8] == b"TFL3"
    assert "agreement 1.0000" in capsys.readouterr().out
    metrics = MlflowClient().get_run(reg.run_id).data.metrics
    assert metrics["tflite_none_bytes"] == dest.stat().st_size
    assert metrics["tflite_none_agreement"] == 1.0
    # deciding alike on every test image, the file is exactly as accurate as the Keras model
    from medimg.models.loading import load_model
    from medimg.scoring import predicted_labels, probabilities
    from tests.conftest import load_arrays

    x, y, _, _ = load_arrays(reg.params.paths.split, "test", 32)
    keras_probs = probabilities(load_model(reg.params.paths.model_file("tiny")), x)
    keras_accuracy = float(np.mean(predicted_labels(keras_probs, 0.5) == y))
    assert metrics["tflite_none_test_accuracy"] == pytest.approx(keras_accuracy)


def test_export_int8_of_a_keras_file(reg, separating_model, tmp_path, capsys):
    out = tmp_path / "edge" / "model_int8.tflite"
    code = medimg(
        reg, "export", "--quantize", "int8", "--model", str(separating_model), "-o", str(out)
    )
    assert code == 0
    assert out.read_bytes()[4:8] == b"TFL3"
    text = capsys.readouterr().out
    assert "agreement 1.0000" in text and "TFLite test accuracy 1.0000" in text
    assert "not logged" in text  # a plain .keras file has no MLflow run


def test_export_parity_failure_exits_nonzero_with_the_agreement(reg, tmp_path, monkeypatch, capsys):
    below = MIN_AGREEMENT - 0.0025  # one image in 400 short of the floor
    monkeypatch.setattr("medimg.analysis.edge.agreement", lambda *a, **k: below)
    out = tmp_path / "never.tflite"
    code = medimg(reg, "export", "--quantize", "none", "-o", str(out))
    assert code != 0
    assert f"agreement {below:.4f}" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setattr("medimg.analysis.edge.agreement", lambda *a, **k: MIN_AGREEMENT)
    assert medimg(reg, "export", "--quantize", "none", "-o", str(out)) == 0  # the floor passes
    assert out.exists()


def test_export_without_a_split_is_a_data_error(reg, tmp_path, capsys):
    params = tiny_params(tmp_path / "other", mlflow=reg.params.mlflow.model_dump())
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    with pytest.raises(SystemExit) as done:
        cli.main(["--params", str(params_file), "export"])
    assert done.value.code == 3
    assert "no test shards" in capsys.readouterr().err
