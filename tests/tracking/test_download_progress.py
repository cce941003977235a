"""MLflow's "Downloading artifacts" progress bar: on a terminal only, never in a log.

`medimg predict DIR 2>err` used to write the bar's carriage-return updates into the log. The
model is a logged artifact folder holding a stand-in `.keras` file: `resolve_model` only finds
the file, so neither TensorFlow nor a trained model is needed.
"""

from __future__ import annotations

import io
import os
import sys

import pytest

from medimg import tracking
from medimg.tracking.registry import PROGRESS_BAR_ENV
from tests.conftest import tiny_params


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def logged_model(tmp_path, monkeypatch) -> str:
    """`runs:/<id>/model`: a run whose `model` artifact folder holds a few files."""
    import mlflow

    monkeypatch.delenv(PROGRESS_BAR_ENV, raising=False)
    params = tiny_params(tmp_path)
    tracking.configure(params.mlflow, params.dataset.name)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.keras").write_bytes(b"not really a model")
    for i in range(3):
        (folder / f"extra{i}.txt").write_text(str(i))
    with tracking.run(run_name="download-progress") as run_id:
        mlflow.log_artifacts(str(folder), artifact_path="model")
    return f"runs:/{run_id}/model"


def test_no_download_bar_when_stderr_is_not_a_terminal(logged_model, tmp_path, capsys):
    assert not sys.stderr.isatty()  # capsys: as `2>err`
    path, _ = tracking.resolve_model(logged_model, "unused", tmp_path / "dl")
    assert path.name == "model.keras"
    run_id = logged_model.removeprefix("runs:/").split("/")[0]
    assert tracking.download_run_artifact(run_id, "model/extra0.txt", tmp_path / "dl2")
    assert "Downloading artifacts" not in capsys.readouterr().err
    assert PROGRESS_BAR_ENV not in os.environ  # set for the download only


def test_download_bar_stays_on_a_terminal(logged_model, tmp_path, monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    tracking.resolve_model(logged_model, "unused", tmp_path / "dl")
    assert "Downloading artifacts" in terminal.getvalue()


def test_a_users_setting_wins(logged_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PROGRESS_BAR_ENV, "true")
    tracking.resolve_model(logged_model, "unused", tmp_path / "dl")
    assert "Downloading artifacts" in capsys.readouterr().err
    assert os.environ[PROGRESS_BAR_ENV] == "true"
