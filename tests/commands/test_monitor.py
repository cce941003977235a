"""`medimg monitor`: a window of the served model's request log against the reference stored
with the version, in process (the served model is the registered pyfunc, loaded as `mlflow
models serve` loads it; the HTTP server itself is in tests/monitoring/test_served_monitoring.py).

The champion is the tiny model of `tests.commands.test_predict`, logged with the reference
evaluate builds (its own function) from planted-square images: dark noise, bright squares.
Clean requests are new planted images; the shift brightens them (+90 grey levels), which
moves brightness, colour and the embedding far outside the reference.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medimg import cli
from tests.commands.test_predict import NAME, train_and_register
from tests.conftest import planted_image


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    return train_and_register(tmp_path_factory.mktemp("monitor"))


def planted(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack(
        [
            np.asarray(Image.open(io.BytesIO(planted_image(i % 2, rng))).convert("RGB"))
            for i in range(n)
        ]
    )


def brighter(x: np.ndarray) -> np.ndarray:
    return np.clip(x.astype(np.int16) + 90, 0, 255).astype(np.uint8)


def serve(reg, monkeypatch, log: Path, keep_images: bool = False):
    """The champion as `mlflow models serve` loads it, logging to `log`."""
    import mlflow

    monkeypatch.setenv("MEDIMG_REQUEST_LOG", str(log))
    monkeypatch.setenv("MEDIMG_REQUEST_LOG_KEEP_IMAGES", "1" if keep_images else "0")
    mlflow.set_tracking_uri(reg.params.mlflow.tracking_uri)
    return mlflow.pyfunc.load_model(f"models:/{NAME}@champion")


def send(model, images: np.ndarray, per_request: int = 10) -> None:
    for i in range(0, len(images), per_request):
        model.predict(images[i : i + per_request])
    assert model.unwrap_python_model().request_log.flush()


def monitor(reg, *argv: str) -> int:
    with pytest.raises(SystemExit) as done:
        cli.main(["--params", str(reg.params_file), "monitor", *argv])
    return int(done.value.code)


def monitoring_runs(reg) -> list:
    import mlflow

    mlflow.set_tracking_uri(reg.params.mlflow.tracking_uri)
    exp = mlflow.get_experiment_by_name("medimg-malaria-monitoring")
    assert exp is not None, "no monitoring experiment"
    # shown in the UI's model-training view, beside the training experiment, not as GenAI
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    runs = mlflow.MlflowClient().search_runs([exp.experiment_id], order_by=["start_time ASC"])
    return list(runs)


def test_clean_window_passes_shifted_window_fails_and_each_check_is_a_run(
    reg, monkeypatch, tmp_path, capsys
):
    log = tmp_path / "log"
    model = serve(reg, monkeypatch, log)
    served = model.unwrap_python_model()
    assert served.request_log.embedding is not None  # the version's reference reached it

    send(model, planted(60, seed=11))
    clean = tmp_path / "clean"
    assert monitor(reg, "--log", str(log), "--last", "60", "--out", str(clean)) == 0
    summary = json.loads((clean / "summary.json").read_text())
    assert summary["n"] == 60 and summary["drifted"] is False and summary["reasons"] == []
    assert set(summary["groups"]) == {"properties", "embedding", "predictions"}
    assert summary["model"]["version"] == reg.version
    assert "no drift" in capsys.readouterr().out
    assert "no drift" in (clean / "report.html").read_text()

    send(model, brighter(planted(60, seed=12)))
    shifted = tmp_path / "shifted"
    assert monitor(reg, "--log", str(log), "--last", "60", "--out", str(shifted)) == 3
    out = capsys.readouterr().out
    assert "DRIFT" in out and "properties/brightness: KS" in out
    summary = json.loads((shifted / "summary.json").read_text())
    assert summary["window"]["n"] == 60  # the last 60: only the shifted requests
    assert summary["groups"]["properties"]["brightness"]["drifted"]
    assert any(r.startswith("embedding/") for r in summary["reasons"])

    runs = monitoring_runs(reg)
    assert [r.data.tags["verdict"] for r in runs] == ["ok", "drift"]
    assert [r.data.metrics["drifted"] for r in runs] == [0.0, 1.0]
    assert {r.data.tags["model_version"] for r in runs} == {reg.version}
    assert runs[1].data.metrics["drift_properties_brightness"] > 0.9
    assert runs[0].data.metrics["n_requests"] == 60
    model_id = runs[1].data.tags["model_id"]
    import mlflow

    linked = mlflow.MlflowClient().get_logged_model(model_id)  # the version's logged model
    assert {m.key for m in linked.metrics} >= {"drifted", "ood_share"}
    artifacts = {
        f.path for f in mlflow.MlflowClient().list_artifacts(runs[1].info.run_id, "monitoring")
    }
    assert artifacts == {"monitoring/summary.json", "monitoring/report.html"}


def test_window_selects_by_time_and_too_small_windows_never_alarm(reg, monkeypatch, tmp_path):
    log = tmp_path / "log"
    model = serve(reg, monkeypatch, log)
    send(model, brighter(planted(10, seed=13)))
    out = tmp_path / "small"
    # 10 shifted requests: reported, but under monitoring.drift.min_requests (25): exit 0
    code = monitor(
        reg, "--log", str(log), "--since", "2000-01-01", "--out", str(out), "--no-mlflow"
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 10 and not summary["enough_requests"]
    assert summary["groups"]["properties"]["brightness"]["statistic"] > 0.9
    assert monitor(reg, "--log", str(log), "--since", "2999-01-01", "--no-mlflow") == 1


def test_export_files_kept_images_by_decided_class(reg, monkeypatch, tmp_path):
    log = tmp_path / "log"
    model = serve(reg, monkeypatch, log, keep_images=True)
    images = planted(12, seed=14)
    send(model, images, per_request=4)
    out = tmp_path / "export"
    assert monitor(reg, "export", "--log", str(log), "--last", "12", "--out", str(out)) == 0
    table = pd.read_csv(out / "predictions.csv")
    assert len(table) == 12
    for row in table.itertuples():
        assert row.file.split("/")[0] == row.decision  # filed under the class it was given
    sent = {img.tobytes() for img in images}
    got = {np.asarray(Image.open(out / f).convert("RGB")).tobytes() for f in table["file"]}
    assert got == sent  # the pixels scored, losslessly


def test_bad_inputs_are_one_line_errors(reg, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("MEDIMG_REQUEST_LOG", raising=False)
    assert monitor(reg) == 2
    assert "no request log" in capsys.readouterr().err
    assert monitor(reg, "--log", str(tmp_path / "nowhere")) == 1
    assert "no request log folder" in capsys.readouterr().err
    log = tmp_path / "log"
    send(serve(reg, monkeypatch, log), planted(4, seed=15), per_request=4)
    bad = tmp_path / "ref.json"
    bad.write_text("{")
    assert monitor(reg, "--log", str(log), "--reference", str(bad)) == 1
    assert f"{bad}: not a readable reference JSON" in capsys.readouterr().err
    assert monitor(reg, "export", "--log", str(log), "--out", str(tmp_path / "x")) == 1
    assert "no kept images" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_monitor_never_imports_tensorflow(reg, tmp_path):
    """A scheduled check on a small box: `medimg monitor` loads no model, so no TensorFlow
    (5 s and ~430 MB of start-up)."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom medimg import cli\n"
        "try:\n    cli.main(sys.argv[1:])\nexcept SystemExit as e:\n    print('exit', e.code)\n"
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    argv = ["--params", str(reg.params_file), "monitor", "--log", str(tmp_path / "none")]
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120
    )
    assert out.stdout.split() == ["exit", "1", "False", "False"], out.stderr[-2000:]
