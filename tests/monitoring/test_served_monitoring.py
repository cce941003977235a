"""The watched model end to end (slow): the champion served by `mlflow models serve` on
127.0.0.1 with its request log on, clean then shifted requests over HTTP, `medimg monitor` on
each window (exit 0, then 3) with its MLflow run and HTML report; then the log's store is
killed mid-traffic (its folder replaced by a file) and brought back: every request is still
answered, and the monitoring report counts the failed writes.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medimg.monitoring.log_store import log_health, read_window
from tests.commands.test_monitor import brighter, monitor, monitoring_runs, planted
from tests.commands.test_predict import NAME, train_and_register
from tests.test_pyfunc_classifier import mlflow_serve, post, stop

pytestmark = pytest.mark.slow
FLUSH_S = 1.0


@pytest.fixture(scope="module")
def reg(tmp_path_factory):
    return train_and_register(tmp_path_factory.mktemp("watched"))


@contextlib.contextmanager
def serving(reg, log: Path, flush_s: float):
    """The champion served, logging to `log`; yields (url, process), always stopped."""
    env = {
        "MEDIMG_REQUEST_LOG": str(log),
        "MEDIMG_REQUEST_LOG_FLUSH_SECONDS": str(flush_s),
        "MEDIMG_MODEL_NAME": NAME,
        "MEDIMG_MODEL_ALIAS": "champion",
    }
    server_log = log.with_name(f"{log.name}.server.log")
    uri, tracking = f"models:/{NAME}@champion", reg.params.mlflow.tracking_uri
    with mlflow_serve(uri, tracking, server_log, env) as served:
        yield served


@pytest.fixture(scope="module")
def served(reg, tmp_path_factory):
    """(url, log folder) of a champion served with a 1 s flush interval."""
    log = tmp_path_factory.mktemp("served") / "requests"
    with serving(reg, log, FLUSH_S) as (url, _):
        yield url, log


def png64(x: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def send(url: str, images: np.ndarray, per_request: int = 5) -> list[int]:
    """POST the images as base64 PNG, `per_request` a request; the HTTP status of each."""
    codes = []
    for i in range(0, len(images), per_request):
        rows = [[png64(x)] for x in images[i : i + per_request]]
        resp = post(url, {"dataframe_split": {"columns": ["image"], "data": rows}})
        if resp.status_code == 200:
            assert len(resp.json()["predictions"]) == len(rows)
        codes.append(resp.status_code)
    return codes


def logged_rows(log: Path) -> int:
    parts = sorted(log.glob("part-*.parquet")) if log.is_dir() else []
    return sum(len(pd.read_parquet(p, columns=["sha256"])) for p in parts)


def wait_rows(log: Path, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while logged_rows(log) < n:
        assert time.monotonic() < deadline, f"{logged_rows(log)} rows logged, waiting for {n}"
        time.sleep(0.3)


def test_served_champion_is_watched_clean_passes_shifted_fails(reg, served, tmp_path):
    url, log = served
    assert set(send(url, planted(50, seed=21))) == {200}
    wait_rows(log, 50)
    clean = tmp_path / "clean"
    assert monitor(reg, "--log", str(log), "--last", "50", "--out", str(clean)) == 0

    assert set(send(url, brighter(planted(50, seed=22)))) == {200}
    wait_rows(log, 100)
    shifted = tmp_path / "shifted"
    assert monitor(reg, "--log", str(log), "--last", "50", "--out", str(shifted)) == 3

    rows = read_window(log)  # what the server wrote: who answered, and what was asked
    assert set(rows["model_name"]) == {NAME} and set(rows["model_alias"]) == {"champion"}
    assert rows["model_id"].nunique() == 1 and rows["emb_0"].notna().all()
    for out, verdict in ((clean, False), (shifted, True)):
        summary = json.loads((out / "summary.json").read_text())
        assert summary["drifted"] is verdict
        assert "<html" in (out / "report.html").read_text().lower()
        run = [r for r in monitoring_runs(reg) if r.info.run_id == summary["mlflow_run_id"]]
        assert run and run[0].data.metrics["drifted"] == float(verdict)


def test_killed_log_store_never_fails_a_request_and_the_report_counts_it(reg, served, tmp_path):
    url, log = served
    before = logged_rows(log)
    assert set(send(url, planted(20, seed=23))) == {200}
    wait_rows(log, before + 20)

    aside = log.with_name("requests.aside")
    log.rename(aside)
    log.write_text("the store is gone")  # a file where the folder was: every write fails
    try:
        codes = send(url, planted(30, seed=24))  # while the writer fails
        time.sleep(5 * FLUSH_S)  # its flushes come and fail
    finally:
        log.unlink()
        aside.rename(log)
    assert codes == [200] * 6  # every request answered

    assert set(send(url, planted(30, seed=25))) == {200}  # the store is back
    wait_rows(log, before + 50)
    settled = lambda h: h["logged"] == h["written"] + h["lost"] + h["dropped"]  # noqa: E731
    deadline = time.monotonic() + 30  # the status is written just after each part
    while not settled(log_health(log)) and time.monotonic() < deadline:
        time.sleep(0.2)
    out = tmp_path / "after"
    assert monitor(reg, "--log", str(log), "--last", "50", "--out", str(out), "--no-mlflow") == 0
    health = json.loads((out / "summary.json").read_text())["log"]
    assert health["errors"] >= 1 and health["lost"] >= 1, health  # the dead store's batches
    assert health["logged"] == health["written"] + health["lost"] + health["dropped"], health
    assert "FileExistsError" in health["last_error"] or "NotADirectory" in health["last_error"]
    report = (out / "report.html").read_text()
    assert "lost" in report and str(health["lost"]) in report
    shutil.rmtree(out)


def test_stopping_the_server_writes_what_it_had_queued(reg, tmp_path):
    log = tmp_path / "requests"
    with serving(reg, log, flush_s=600) as (url, proc):  # no flush before the stop
        assert set(send(url, planted(20, seed=26))) == {200}
        assert logged_rows(log) == 0
        stop(proc)  # SIGTERM, as a service manager stops it
    assert logged_rows(log) == 20
