"""A `medimg server start` killed with SIGKILL takes MLflow and PostgreSQL with it.

Before `medimg.tracking.supervise`, uvicorn (its own process group, holding the port) and the
daemonized PostgreSQL outlived a killed supervisor, and the next start on the same root printed
"ready" while the orphan answered. Here, on 127.0.0.1 with a real server: SIGKILL the supervisor,
nothing of the root or its port survives; a restart on the root serves (server.json names it)
with every run, alias and artifact; SIGTERM then leaves nothing either.

uvicorn's processes do not name the root on their command line, so leftovers are looked for by
root (command line and environment) and by the listening port. Whatever a test started is
killed by process group in `finally`, passing or not.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from mlflow import MlflowClient

from tests.tracking.test_server import (
    MEMBER,
    MODEL,
    Server,
    as_user,
    log_and_promote,
    server_dir,
    survivors,
)

pytestmark = pytest.mark.slow

GONE_WITHIN_S = 15.0  # MLflow's graceful stop plus PostgreSQL's fast shutdown, on 2 busy cores
CLI_TIMEOUT_S = 120  # `medimg` imports TensorFlow first (~9 s on 2 busy cores)


def listeners(port: int) -> list[int]:
    """Pids listening on TCP `port`, by psutil (/proc/net/tcp), not by the code under test."""
    return sorted(
        {c.pid for c in psutil.net_connections("tcp")
         if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid}
    )  # fmt: skip


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (zombies are dead: they only wait for a reaper)."""
    left = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
    return left


def leftovers(root: Path, port: int, pids: list[int]) -> list[str]:
    """Every process of the root, on its port, or among `pids` (PostgreSQL's backends, uvicorn's
    workers: their command lines name neither) that is still alive."""
    found = survivors(root)
    found += [f"{pid} listens on port {port}" for pid in listeners(port)]
    return found + [f"{pid} was the server's" for pid in alive(pids)]


def wait_gone(root: Path, port: int, pids: list[int], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := leftovers(root, port, pids)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def group(pgid: int) -> list[int]:
    """The pids in process group `pgid` (MLflow's: `mlflow server`, uvicorn, its workers)."""
    pids = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid:
                pids.append(proc.pid)
    return pids


def server_pids(info: dict) -> list[int]:
    """The supervisor, its watchdog, MLflow's whole group and PostgreSQL with its backends."""
    pids = [info["pid"], info["watchdog_pid"], info["postgres_pid"], *group(info["mlflow_pgid"])]
    with contextlib.suppress(psutil.Error):
        pids += [p.pid for p in psutil.Process(info["postgres_pid"]).children(recursive=True)]
    return pids


def track(started: dict[int, psutil.Process], info: dict) -> None:
    """Remember the server's processes as psutil objects: killing one later can never hit a
    process that got a recycled pid (psutil checks the start time)."""
    for pid in server_pids(info):
        with contextlib.suppress(psutil.Error):
            started.setdefault(pid, psutil.Process(pid))


def kill_everything(srv: Server, started: dict[int, psutil.Process]) -> None:
    """Whatever the test's outcome: SIGKILL the groups and processes of the server and its port."""
    if srv.proc is not None:  # not reaped yet, so its pid (its group's id) is still its own
        with contextlib.suppress(ProcessLookupError):
            os.killpg(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait()
        srv.proc = None
    for pid, proc in started.items():
        with contextlib.suppress(psutil.Error, OSError):
            if proc.is_running() and os.getpgid(pid) == pid:  # MLflow, watchdog: whole group
                os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(psutil.Error):
            proc.kill()
    for pid in [int(line.split()[0]) for line in survivors(srv.root)] + listeners(srv.port):
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def server_json(root: Path) -> dict:
    return json.loads((root / "server.json").read_text())


def serves(srv: Server, started: dict[int, psutil.Process]) -> dict:
    """server.json of the `srv` just started: it names this supervisor, whose MLflow group alone
    listens on the port and answers /health. Its pids join `started`, to be killed at the end."""
    info = server_json(srv.root)
    track(started, info)
    assert info["pid"] == srv.proc.pid and info["port"] == srv.port
    assert requests.get(f"{srv.uri}/health", timeout=10).status_code == 200
    holders = listeners(srv.port)
    assert holders and {os.getpgid(p) for p in holders} == {info["mlflow_pgid"]}
    return info


def assert_data_kept(srv: Server, logged: dict[str, str], download_to: Path) -> None:
    """The run (param, metric, artifact) and the champion alias are all there."""
    with pytest.MonkeyPatch.context() as mp:
        as_user(mp, MEMBER)
        client = MlflowClient(srv.uri)
        run = client.get_run(logged["run_id"])
        assert (run.data.params, run.data.metrics) == ({"arch": "cnn"}, {"val_auc": 0.93})
        assert [f.path for f in client.list_artifacts(logged["run_id"])] == ["notes.txt"]
        download_to.mkdir()
        client.download_artifacts(logged["run_id"], "notes.txt", str(download_to))
        assert (download_to / "notes.txt").read_text() == "hello"
        champion = client.get_model_version_by_alias(MODEL, "champion")
        assert (champion.version, champion.run_id) == (logged["version"], logged["run_id"])


def sigkill(srv: Server, *others: int) -> None:
    """SIGKILL `others` (say, the watchdog), then the supervisor, and reap it."""
    for pid in others:
        os.kill(pid, signal.SIGKILL)
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait()
    srv.proc = None


@pytest.fixture
def srv() -> Iterator[Server]:
    """A server (not started) whose root is outside pytest's basetemp (`server_dir` says why)."""
    with server_dir("medimg-supervision-") as folder:
        yield Server(folder / "root")


def test_sigkill_of_the_supervisor_leaves_nothing_and_a_restart_serves(
    srv: Server, tmp_path: Path
) -> None:
    started: dict[int, psutil.Process] = {}
    try:
        # 1. A served root with a run, an artifact and an alias; then SIGKILL the supervisor.
        srv.start()
        first = serves(srv, started)
        logged = log_and_promote(srv)
        first_pids = server_pids(first)
        sigkill(srv)
        start = time.monotonic()
        left = wait_gone(srv.root, srv.port, first_pids, GONE_WITHIN_S)
        assert not left, f"SIGKILL of the supervisor left: {left}"
        print(f"everything gone {time.monotonic() - start:.1f} s after SIGKILL")

        # 2. A start on the same root and port serves, with every run, artifact and alias;
        #    another start on that root is refused in one line naming the live server.
        srv.start()
        second = serves(srv, started)
        assert second["pid"] != first["pid"]
        assert_data_kept(srv, logged, tmp_path / "second")
        line = refused_start(srv.root, srv.port + 1)
        assert f"pid {second['pid']}" in line and f"port {srv.port}" in line
        assert server_json(srv.root) == second

        # 3. Supervisor and watchdog both SIGKILLed: MLflow still dies (PR_SET_PDEATHSIG), only
        #    PostgreSQL is left, and the next start stops it before it starts its own.
        mlflow = group(second["mlflow_pgid"])
        sigkill(srv, second["watchdog_pid"])
        deadline = time.monotonic() + GONE_WITHIN_S
        while (alive(mlflow) or listeners(srv.port)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(mlflow) and not listeners(srv.port), alive(mlflow)
        assert alive([second["postgres_pid"]]), "nothing left for the next start to stop"
        srv.start()
        third = serves(srv, started)
        assert f"PostgreSQL pid {second['postgres_pid']}" in srv.out.read_text()
        assert not alive([second["postgres_pid"]]) and third["postgres_pid"]
        assert_data_kept(srv, logged, tmp_path / "third")

        # 4. SIGTERM: nothing of the root or its port is left, server.json is gone.
        third_pids = server_pids(third)
        assert srv.stop() == 0  # `stop` itself asserts that nothing of the root survives
        left = wait_gone(srv.root, srv.port, third_pids, GONE_WITHIN_S)
        assert not left, f"SIGTERM of the supervisor left: {left}"
        assert not (srv.root / "server.json").exists()
    finally:
        kill_everything(srv, started)


def refused_start(root: Path, port: int) -> str:
    """`medimg server start` that must fail at once: its one stderr line."""
    proc = subprocess.run(
        [sys.executable, "-m", "medimg.cli", "server", "start", "--root", str(root),
         "--port", str(port)],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
        env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stdout + proc.stderr
    assert "ready" not in proc.stdout
    return lines[0]


def test_a_busy_port_is_refused_in_one_line(tmp_path: Path) -> None:
    """A port some other process listens on is refused with one line naming its pid and the
    port, before anything (PostgreSQL) is started."""
    root = tmp_path / "root"
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        line = refused_start(root, port)
    assert f"pid {os.getpid()}" in line and f"port {port}" in line
    assert not (root / "pgdata").exists() and not survivors(root)
