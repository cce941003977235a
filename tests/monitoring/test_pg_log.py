"""The request log in PostgreSQL: a real `RequestLog` writing to a real PostgreSQL (pgserver),
read back by `medimg monitor`'s `read_window` / `log_health`; the database stopped, restarted
and hung mid-traffic, a database that never answers, a serving role with only the documented
grants.

One server per module (`medimg.tracking.server._postgres`: always stopped, whatever happens),
in a folder outside pytest's basetemp (as tests/tracking/test_server.py explains: run as root,
pgserver runs PostgreSQL as user `pgserver`, which needs the folder's parents open, and another
pytest session would close /tmp/pytest-of-root again). One database per test.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from PIL import Image

from medimg.monitoring import pg_log
from medimg.monitoring.log_store import LogError, log_health, read_window
from medimg.monitoring.request_log import RequestLog
from tests.monitoring.test_request_log import answer, image

pytestmark = pytest.mark.slow

# What one log_request may take, whatever the database does. A request that waited on the
# database would wait seconds (a 3 s connect timeout, the 5 s hang below); typical calls take
# ~1 ms, and a call now and then takes ~50 ms on two shared cores (the writer thread holds
# the GIL while it hashes and measures the previous request's images).
REQUEST_BOUND_S = 0.25


class Postgres:
    """The module's server: its URLs, and stopping / starting / suspending it."""

    def __init__(self, server) -> None:
        self.server = server
        self.database = ""  # the current test's database (`db`) and its URL
        self.url_ = ""

    def url(self, database: str, user: str = "postgres") -> str:
        return self.server.get_postmaster_info().get_uri(user=user, database=database)

    def running(self) -> bool:
        """Whether PostgreSQL runs: `pg_ctl -w stop` returns once its pid file is gone (its
        process may linger as a zombie where nothing reaps it)."""
        return (self.server.pgdata / "postmaster.pid").exists()

    def stop(self) -> None:
        import pgserver

        pgserver.pg_ctl(
            ["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user
        )

    def start(self) -> None:
        if not self.running():
            self.server.ensure_postgres_running()  # same pgdata, same socket: same URLs

    def processes(self) -> list[psutil.Process]:
        postmaster = psutil.Process(self.server.get_pid())
        return [postmaster, *postmaster.children(recursive=True)]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    from medimg.tracking.server import _postgres

    folder = Path(tempfile.mkdtemp(prefix="medimg-pglog-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, folder, ignore_errors=True)
        try:
            server = stack.enter_context(_postgres(folder / "pgdata"))
        except Exception as err:  # no pgserver wheel, or no way to run it here
            pytest.skip(f"pgserver cannot start a PostgreSQL here: {err}")
        yield Postgres(server)


@pytest.fixture
def db(postgres, request) -> Iterator[Postgres]:
    """A fresh database of the running server; `db.url_` is its URL."""
    import psycopg

    postgres.start()
    name = "t_" + re.sub(r"\W", "_", request.node.name)[:50].lower()
    with psycopg.connect(postgres.url("postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    postgres.database = name
    postgres.url_ = postgres.url(name)
    yield postgres
    for proc in postgres.processes() if postgres.running() else []:
        with contextlib.suppress(psutil.Error):
            proc.resume()
    postgres.start()  # for the next test, whatever this one left


def send(log: RequestLog, seeds, durations: list[float] | None = None) -> list[tuple]:
    """One request of one image per seed; the (before, after) time of each call."""
    spans = []
    for seed in seeds:
        before = datetime.now(UTC)
        start = time.perf_counter()
        log.log_request([image(seed)], answer(1))
        if durations is not None:
            durations.append(time.perf_counter() - start)
        spans.append((before, datetime.now(UTC)))
    return spans


def sorted_columns(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[sorted(frame.columns)]


def test_requests_logged_to_the_database_read_back_as_the_parquet_log_reads(
    db, tmp_path, monkeypatch
):
    monkeypatch.setenv("MEDIMG_REQUEST_LOG", db.url_)
    monkeypatch.setenv("MEDIMG_MODEL_NAME", "malaria-classifier")
    monkeypatch.setenv("MEDIMG_MODEL_VERSION", "3")
    monkeypatch.delenv("MEDIMG_MODEL_ALIAS", raising=False)
    logs = [
        RequestLog.from_env(flush_seconds=60, model_id="m-1"),
        RequestLog(tmp_path / "parts", flush_seconds=60, model_id="m-1"),
        RequestLog(db.url_, flush_seconds=60, model_id="m-2"),
    ]
    assert logs[0].url == db.url_ and logs[1].url is None
    spans = []
    for i in range(6):  # requests of two images (one time each); a NaN probability in one
        images = [image(2 * i), image(2 * i + 1, 30, 17)]
        frame = answer(2)
        if i == 2:
            frame.loc[1, "p_Parasitized"] = float("nan")
        before = datetime.now(UTC)
        logs[0].log_request(images, frame)
        spans += [(before, datetime.now(UTC))] * 2
        logs[1].log_request(images, frame)
        logs[2].log_request([image(100 + i)], answer(1))
    for log in logs:
        assert log.flush()
        log.close()
    assert [log.errors for log in logs] == [0, 0, 0], logs[0].last_error

    got = read_window(db.url_, model_id="m-1")
    want = read_window(tmp_path / "parts", model_id="m-1")
    assert len(got) == 12 and got["time"].is_monotonic_increasing
    assert str(got["time"].dtype) == str(want["time"].dtype) == "datetime64[us, UTC]"
    assert all(a <= t <= b for t, (a, b) in zip(got["time"], spans, strict=True))
    pd.testing.assert_frame_equal(
        sorted_columns(got.drop(columns="time")), sorted_columns(want.drop(columns="time"))
    )
    assert np.isnan(got["p_Parasitized"][5])  # NaN: stored as JSON null, read back as NaN

    last = read_window(db.url_, model_id="m-1", last=5)
    pd.testing.assert_frame_equal(last, got.iloc[-5:].reset_index(drop=True))
    cut = got["time"][6]
    since = read_window(db.url_, model_id="m-1", since=cut.isoformat())
    pd.testing.assert_frame_equal(since, got[got["time"] >= cut].reset_index(drop=True))
    until = read_window(db.url_, model_id="m-1", until=cut.tz_convert(None).isoformat())
    pd.testing.assert_frame_equal(until, got[got["time"] < cut].reset_index(drop=True))
    other = read_window(db.url_, model_id="m-2")
    assert list(other["model_id"]) == ["m-2"] * 6 and len(read_window(db.url_)) == 18
    columns = ["decision", "brightness", "model_id"]
    assert list(read_window(db.url_, columns=columns).columns) == ["time", *columns]
    assert list(read_window(tmp_path / "parts", columns=columns).columns) == ["time", *columns]

    health = log_health(db.url_)
    assert health["processes"] == 2 and health["written"] == 18 and health["errors"] == 0


def test_the_database_stopped_mid_traffic_fails_no_request_and_its_errors_are_reported(db):
    log = RequestLog(db.url_, flush_every=4, flush_seconds=60, model_id="m")
    before_stop = send(log, range(4))
    assert log.flush() and log.written == 4 and log.errors == 0

    durations: list[float] = []
    db.stop()
    try:
        for seed in range(100, 112):  # three batches of 4 reach the writer while it is down
            send(log, [seed], durations)
            time.sleep(0.01)
        assert log.flush()
        assert log.errors == 3 and log.lost == 12 and log.written == 4
        assert log.last_error.startswith("write: OperationalError")
    finally:
        db.start()
    assert max(durations) < REQUEST_BOUND_S, durations
    errors = log.errors

    after_start = send(log, range(200, 205))
    assert log.flush()
    log.close()
    assert log.written == 9 and log.errors == errors and log.lost == 12

    window = read_window(db.url_, model_id="m")
    spans = before_stop + after_start
    assert len(window) == 9  # what was logged while the database was down is lost, counted
    assert all(a <= t <= b for t, (a, b) in zip(window["time"], spans, strict=True))
    health = log_health(db.url_)  # the status upsert after the restart carries the counts
    assert health["processes"] == 1 and health["logged"] == 21
    assert (health["written"], health["lost"], health["errors"]) == (9, 12, 3)
    assert health["last_error"].startswith("write: OperationalError")


def test_a_restart_between_two_flushes_loses_nothing(db):
    log = RequestLog(db.url_, flush_seconds=60, model_id="m")
    send(log, [1])
    assert log.flush() and log.written == 1
    db.stop()
    db.start()  # the writer's kept connection is dead now
    send(log, [2, 3])
    assert log.flush()
    log.close()
    assert (log.written, log.errors, log.lost) == (3, 0, 0), log.last_error
    assert len(read_window(db.url_, model_id="m")) == 3


def test_a_hung_database_never_makes_a_request_wait(db):
    log = RequestLog(db.url_, flush_every=1, flush_seconds=60, model_id="m")
    send(log, [1])
    assert log.flush() and log.written == 1  # the writer holds a connection
    processes = db.processes()
    for proc in processes:
        proc.suspend()
    resume = threading.Timer(5.0, lambda: [p.resume() for p in processes])
    resume.start()  # a request path that waits on the database waits this long, then fails
    durations: list[float] = []
    try:
        for seed in range(10, 20):
            send(log, [seed], durations)
            time.sleep(0.02)
        assert max(durations) < REQUEST_BOUND_S, durations
        assert log.written == 1  # the writer is stuck in its COPY, the requests are not
    finally:
        resume.cancel()
        for proc in processes:
            proc.resume()
    assert log.flush(timeout=30)
    log.close()
    assert (log.written, log.errors) == (11, 0), log.last_error
    assert len(read_window(db.url_, model_id="m")) == 11


def test_a_role_with_the_documented_grants_logs_and_reads_but_cannot_create_or_delete(db):
    import psycopg

    grants = [line.strip() for line in pg_log.__doc__.splitlines() if "GRANT " in line]
    assert len(grants) == 2
    with psycopg.connect(db.url_, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS medimg_serving")
        conn.execute("CREATE ROLE medimg_serving LOGIN")
    url = db.url(db.database, user="medimg_serving")

    log = RequestLog(url, flush_seconds=60, model_id="m")
    send(log, [1])
    assert log.flush()  # no tables yet, and no right to create them: counted, not raised
    assert (log.errors, log.lost) == (1, 1) and "permission denied" in log.last_error

    pg_log.create_tables(db.url_)  # the admin, once
    with psycopg.connect(db.url_, autocommit=True) as conn:
        for grant in grants:
            conn.execute(grant)
    send(log, [2, 3])
    assert log.flush()
    log.close()
    assert (log.written, log.errors) == (2, 1)
    assert len(read_window(url, model_id="m")) == 2
    assert log_health(url)["written"] == 2
    with psycopg.connect(url) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute("DELETE FROM medimg_requests")


def test_kept_images_need_an_images_folder_with_a_database_log(db, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIMG_REQUEST_LOG", db.url_)
    monkeypatch.setenv("MEDIMG_REQUEST_LOG_KEEP_IMAGES", "1")
    monkeypatch.delenv("MEDIMG_REQUEST_LOG_IMAGES", raising=False)
    refused = RequestLog.from_env(flush_seconds=60, model_id="a")
    assert not refused.keep_images and refused.errors == 1
    assert "MEDIMG_REQUEST_LOG_IMAGES" in refused.last_error
    send(refused, [1])
    assert refused.flush()
    refused.close()

    monkeypatch.setenv("MEDIMG_REQUEST_LOG_IMAGES", str(tmp_path / "kept"))
    kept = RequestLog.from_env(flush_seconds=60, model_id="b")
    send(kept, [1])
    assert kept.flush()
    kept.close()
    assert "image_file" not in read_window(db.url_, model_id="a")
    path = Path(read_window(db.url_, model_id="b")["image_file"][0])
    assert path.is_absolute() and path.parent == tmp_path / "kept" / "images"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image(1))
    health = log_health(db.url_)
    assert health["errors"] == 1 and "MEDIMG_REQUEST_LOG_IMAGES" in health["last_error"]


def test_a_url_made_a_path_or_a_dead_database_is_a_one_line_log_error(tmp_path):
    with pytest.raises(LogError, match="lost its '//'"):
        read_window(Path("postgresql://user@host/db"))
    dead = f"postgresql://user:secret@/db?host={tmp_path}"  # no server on that socket
    start = time.monotonic()
    with pytest.raises(LogError, match="unreachable") as err:
        read_window(dead)
    assert "secret" not in str(err.value) and "\n" not in str(err.value)
    health = log_health(dead)
    assert health["processes"] == 0 and health["last_error"].startswith("status unreadable")
    assert time.monotonic() - start < 2 * pg_log.CONNECT_TIMEOUT_S


def test_a_database_that_never_answers_costs_the_writer_one_connect_timeout_per_flush(tmp_path):
    import socket

    silent = socket.socket(socket.AF_UNIX)  # accepts connections, never says a word
    silent.bind(str(tmp_path / ".s.PGSQL.5432"))
    silent.listen(8)
    try:
        log = RequestLog(f"postgresql://user@/db?host={tmp_path}", flush_seconds=60)
        durations: list[float] = []
        send(log, range(3), durations)
        start = time.monotonic()
        assert log.flush(timeout=30)
        took = time.monotonic() - start
        log.close()
    finally:
        silent.close()
    assert max(durations) < REQUEST_BOUND_S, durations
    assert pg_log.CONNECT_TIMEOUT_S - 0.5 < took < pg_log.CONNECT_TIMEOUT_S + 2
    assert (log.errors, log.lost, log.written) == (1, 3, 0)
    assert "timeout" in log.last_error.lower(), log.last_error


def test_medimg_monitor_checks_a_database_log(db, tmp_path, monkeypatch, capsys):
    """The served champion logging to PostgreSQL, `medimg monitor --log postgresql://...`:
    exit 0 on a clean window, 3 on a brightened one, and the password never printed."""
    from tests.commands.test_monitor import brighter, monitor, planted, send, serve
    from tests.commands.test_predict import train_and_register

    reg = train_and_register(tmp_path / "reg")
    model = serve(reg, monkeypatch, db.url_)  # MEDIMG_REQUEST_LOG = the database URL
    send(model, planted(40, seed=31))
    assert monitor(reg, "--log", db.url_, "--last", "40", "--out", str(tmp_path / "a")) == 0
    send(model, brighter(planted(40, seed=32)))
    assert monitor(reg, "--log", db.url_, "--last", "40", "--out", str(tmp_path / "b")) == 3
    assert "properties/brightness" in capsys.readouterr().out
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["window"]["n"] == 40 and summary["log"]["written"] >= 80
