"""Team server end to end: real PostgreSQL (pgserver), real `mlflow server`, real accounts.

One server per module (starting one costs ~10 s on 2 cores); every test that needs it shares
it, and the last one restarts it on the same root. The fixture always stops it and checks that
no PostgreSQL or MLflow process of that root survives.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from medimg.commands import server as server_cmd
from medimg.errors import MedimgError
from medimg.tracking.server import check_credentials, check_reachable

pytestmark = pytest.mark.slow

MODEL = "malaria-classifier"
MEMBER = ("alice", "alice-password-1")
CI = ("ci-bot", "ci-bot-password-1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def survivors(root: Path) -> list[str]:
    """Live processes whose command line or environment mentions `root` (zombies are dead)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            text = " ".join(proc.info["cmdline"] or []) + repr(proc.environ())
        except psutil.Error:
            continue
        if str(root) in text:
            found.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:120]}")
    return found


@contextlib.contextmanager
def server_dir(prefix: str) -> Iterator[Path]:
    """A folder for a server's root, outside pytest's basetemp, removed afterwards.

    Run as root, pgserver runs PostgreSQL as user `pgserver` and opens the root's parents to it;
    any pytest session that starts meanwhile makes /tmp/pytest-of-root private (0700) again, and
    PostgreSQL loses its own data directory (PANIC: pg_control: Permission denied).
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Server:
    """`medimg server start` as a subprocess, always stopped by SIGTERM (then SIGKILL)."""

    def __init__(self, root: Path) -> None:
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = ["start", "--root", str(self.root), "--port", str(self.port), "--workers", "1"]
        self.out = self.root.parent / f"{self.root.name}.out"
        seen = self.out.stat().st_size if self.out.exists() else 0  # a restart's ready line only
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "medimg.cli", "server", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
            )
        deadline = time.monotonic() + 150
        while f"ready at {self.uri}" not in self.out.read_text()[seen:]:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"server did not start:\n{self.out.read_text()[-3000:]}")
            time.sleep(0.3)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            code = proc.wait()
        deadline = time.monotonic() + 10
        while survivors(self.root) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = survivors(self.root)
        for line in left:  # never leave them running, even when the test fails
            psutil.Process(int(line.split()[0])).kill()
        assert not left, f"processes survived the server: {left}"
        return code


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with server_dir("medimg-team-") as folder:
        srv = Server(folder / "root")
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


def as_user(mp: pytest.MonkeyPatch, user: tuple[str, str]) -> None:
    mp.setenv("MLFLOW_TRACKING_USERNAME", user[0])
    mp.setenv("MLFLOW_TRACKING_PASSWORD", user[1])


def cli(*argv: str) -> int:
    """`medimg server ...` in-process; its exit code (MedimgError propagates as in `run`)."""
    parser = argparse.ArgumentParser()
    server_cmd.add_arguments(parser)
    return server_cmd.run(None, parser.parse_args(list(argv)))


@pytest.fixture(scope="module")
def logged(server: Server) -> dict[str, str]:
    """Admin adds a member and a ci account; the member logs a run, ci registers it as champion."""
    return log_and_promote(server)


def log_and_promote(server: Server) -> dict[str, str]:
    """The `logged` fixture's work, for tests that run their own server: run id and version."""
    for (name, password), role in ((MEMBER, "member"), (CI, "ci")):
        assert cli("user", "add", name, "--password", password, "--role", role,
                   "--root", str(server.root)) == 0  # fmt: skip
    client = MlflowClient(server.uri)
    with pytest.MonkeyPatch.context() as mp:
        as_user(mp, MEMBER)
        exp = client.create_experiment("malaria-team")
        run = client.create_run(exp)
        client.log_param(run.info.run_id, "arch", "cnn")
        client.log_metric(run.info.run_id, "val_auc", 0.93)
        client.log_text(run.info.run_id, "hello", "notes.txt")
        client.set_terminated(run.info.run_id)
        as_user(mp, CI)
        version = client.create_model_version(
            MODEL, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
        )
        client.set_registered_model_alias(MODEL, "champion", version.version)
    return {"run_id": run.info.run_id, "version": version.version}


def test_server_starts_with_private_admin_file(server: Server) -> None:
    check_reachable(server.uri)
    assert (server.root / "admin.json").stat().st_mode & 0o777 == 0o600
    assert (server.root / "pgdata" / "PG_VERSION").exists()


def test_member_logs_and_ci_promotes(
    server: Server, logged: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    as_user(monkeypatch, MEMBER)
    client = MlflowClient(server.uri)
    run = client.get_run(logged["run_id"])
    assert run.data.metrics == {"val_auc": 0.93}
    assert [f.path for f in client.list_artifacts(run.info.run_id)] == ["notes.txt"]
    champion = client.get_model_version_by_alias(MODEL, "champion")  # members may read it
    assert (champion.version, champion.run_id) == (logged["version"], logged["run_id"])


def test_member_cannot_register_or_promote(
    server: Server, logged: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    as_user(monkeypatch, MEMBER)
    client = MlflowClient(server.uri)
    attempts = {
        "set alias": lambda: client.set_registered_model_alias(MODEL, "champion", "1"),
        "delete alias": lambda: client.delete_registered_model_alias(MODEL, "champion"),
        "create version": lambda: client.create_model_version(
            MODEL, f"runs:/{logged['run_id']}/model", run_id=logged["run_id"]
        ),
    }
    for what, attempt in attempts.items():
        with pytest.raises(MlflowException) as err:
            attempt()
        assert err.value.get_http_status_code() == 403, what
    assert client.get_model_version_by_alias(MODEL, "champion").version == logged["version"]


def test_unreachable_uri_fails_fast() -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(MedimgError, match="unreachable") as err:
        check_reachable(uri)
    assert time.monotonic() - start < 10
    assert uri in str(err.value)


def test_bad_password_names_the_user(
    server: Server, logged: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    as_user(monkeypatch, MEMBER)
    check_credentials(server.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(MedimgError) as err:
        check_credentials(server.uri)
    message = str(err.value)
    assert "'alice'" in message and "401" in message and "\n" not in message


def test_user_add_rejects_a_wrong_admin_password(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDIMG_SERVER_ADMIN_PASSWORD", "wrong-admin-password")
    with pytest.raises(MedimgError, match="admin user 'admin' was refused"):
        cli("user", "add", "mallory", "--password", "x" * 16, "--role", "ci", "--uri", server.uri)


def test_restart_keeps_runs_models_and_aliases(
    server: Server, logged: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert server.stop() == 0
    assert not (server.root / "server.json").exists()
    server.start()
    as_user(monkeypatch, MEMBER)
    client = MlflowClient(server.uri)
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert (champion.version, champion.run_id) == (logged["version"], logged["run_id"])
    assert client.get_run(logged["run_id"]).data.metrics == {"val_auc": 0.93}
    with pytest.raises(MlflowException) as err:  # roles survive too
        client.set_registered_model_alias(MODEL, "champion", logged["version"])
    assert err.value.get_http_status_code() == 403
