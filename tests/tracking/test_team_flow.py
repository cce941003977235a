"""The team flow on a real server: members log candidates, only CI's `medimg promote` promotes.

What a team does day to day, end to end on 127.0.0.1: a member's training runs land on the
shared server (here fabricated like tests/test_promotion.py does, without training, but logged
through the server as the member), and CI runs `medimg promote` as the `ci` account in its own
process, as the workflow's step on main does. The server, not our code, enforces who may move
`champion`: the member's direct attempt must meet HTTP 403.

One server for the module (starting one costs ~10 s on 2 cores); the fixture always stops it
and `Server.stop` checks that no PostgreSQL or MLflow process of its root survives.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from medimg.config import Params
from medimg.io import read_json, write_json
from tests.conftest import log_candidate, tiny_params
from tests.tracking.test_server import (
    CI,
    MEMBER,
    MODEL,
    Server,
    as_user,
    cli,
    free_port,
    server_dir,
)

pytestmark = pytest.mark.slow

ARCH = "tiny"
N = 200  # test images shared by every candidate: McNemar pairs them by path
FINGERPRINT = "team-flow-split"
PROMOTE_TIMEOUT_S = 180  # a subprocess imports TensorFlow (~7 s alone on 2 busy cores)


@contextlib.contextmanager
def team_server(prefix: str) -> Iterator[Server]:
    """The team server with a member and a ci account, rooted outside pytest's basetemp
    (`server_dir`); always stopped, nothing survives."""
    with server_dir(prefix) as folder:
        srv = Server(folder / "root")
        srv.start()
        try:
            for (name, password), role in ((MEMBER, "member"), (CI, "ci")):
                assert cli("user", "add", name, "--password", password, "--role", role,
                           "--root", str(srv.root)) == 0  # fmt: skip
            yield srv
        finally:
            srv.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with team_server("medimg-team-flow-") as srv:
        yield srv


def make_workspace(root: Path) -> tuple[Params, Path]:
    """A checkout's params file (every path under `root`) and the split's fingerprint.

    `register.promote: never` as on a team: the register stage only records a decision and
    promotion is `medimg promote`'s job.
    """
    params = tiny_params(
        root,
        train={"architectures": [ARCH]},
        gate={"min_accuracy": 0.5, "max_regression": 0.01},
        register={"promote": "never"},
    )
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    write_json(params.paths.classes_json, {"fingerprint": FINGERPRINT})
    return params, params_file


def log_member_candidate(params: Params, server: Server, correct: np.ndarray) -> str:
    """A member's candidate, logged through the server with the member's credentials, as a
    teammate's training on the shared server would; returns the run id."""
    with pytest.MonkeyPatch.context() as mp:
        as_user(mp, MEMBER)
        mp.setenv("MLFLOW_TRACKING_URI", server.uri)
        return log_candidate(params, ARCH, correct)


def correct_first(k: int) -> np.ndarray:
    """Images 0..k-1 right, the rest wrong: a worse candidate errs wherever the champion does,
    so its extra errors are all discordant against the champion (McNemar must see them)."""
    correct = np.zeros(N, bool)
    correct[:k] = True
    return correct


def promote(
    params_file: Path, uri: str, user: tuple[str, str], output: Path
) -> subprocess.CompletedProcess[str]:
    """`medimg promote` as CI runs it: its own process, the server and account from the env."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_TRACKING_USERNAME": user[0],
        "MLFLOW_TRACKING_PASSWORD": user[1],
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    argv = ["--params", str(params_file), "promote", "--output", str(output)]
    return subprocess.run(
        [sys.executable, "-m", "medimg.cli", *argv],
        cwd=params_file.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=PROMOTE_TIMEOUT_S,
    )


def aliases(client: MlflowClient) -> dict[str, str]:
    """{alias: version} of the project model, as any account may read it."""
    return {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()}


def versions(client: MlflowClient) -> list[str]:
    return sorted(str(mv.version) for mv in client.search_model_versions(f"name='{MODEL}'"))


def stderr_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def test_member_logs_ci_promotes_and_the_gate_holds(
    server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params, params_file = make_workspace(tmp_path)
    decision = tmp_path / "decision.json"
    as_user(monkeypatch, MEMBER)  # this process reads the registry as the member
    client = MlflowClient(server.uri)

    # 1. The first candidate (0.95) has no champion to beat: CI promotes it to v1.
    first = log_member_candidate(params, server, correct_first(190))
    proc = promote(params_file, server.uri, CI, decision)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout
    record = read_json(decision)
    assert record["promoted"] and record["candidate"]["version"] == "1"
    assert record["champion_after"]["version"] == "1"
    assert aliases(client) == {"champion": "1", "challenger": "1"}
    assert client.get_model_version(MODEL, "1").run_id == first  # the member's run

    # 2. A worse candidate (0.85) on the same test images: refused, nothing registered.
    log_member_candidate(params, server, correct_first(170))
    proc = promote(params_file, server.uri, CI, decision)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout
    record = read_json(decision)
    assert not record["passed"] and not record["promoted"]
    assert record["champion_before"]["version"] == "1" and record["paired_test"]["n"] == N
    reasons = " ".join(record["reasons"])
    assert "below the champion" in reasons and "McNemar" in reasons, record["reasons"]
    assert aliases(client) == {"champion": "1", "challenger": "1"}
    assert versions(client) == ["1"]

    # 3. A better candidate (1.0): promoted to v2, the old champion becomes `previous`.
    third = log_member_candidate(params, server, correct_first(N))
    proc = promote(params_file, server.uri, CI, decision)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = read_json(decision)
    assert record["promoted"] and record["candidate"]["version"] == "2"
    assert aliases(client) == {"champion": "2", "challenger": "2", "previous": "1"}
    assert client.get_model_version(MODEL, "2").run_id == third

    # 4. The member cannot move `champion` behind the gate's back: the server refuses.
    with pytest.raises(MlflowException) as err:
        client.set_registered_model_alias(MODEL, "champion", "1")
    assert err.value.get_http_status_code() == 403
    assert aliases(client)["champion"] == "2"


def test_promote_with_a_wrong_password_names_the_user(server: Server, tmp_path: Path) -> None:
    _, params_file = make_workspace(tmp_path)  # no reports needed: the account is checked first
    proc = promote(params_file, server.uri, (CI[0], "not-the-ci-password"), tmp_path / "d.json")
    assert proc.returncode != 0
    lines = stderr_lines(proc)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"'{CI[0]}'" in lines[0] and "401" in lines[0]
    assert not (tmp_path / "d.json").exists()


def test_promote_against_a_closed_port_fails_fast(tmp_path: Path) -> None:
    _, params_file = make_workspace(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"  # bound once, then closed: nothing listens
    start = time.monotonic()
    proc = promote(params_file, uri, CI, tmp_path / "d.json")
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    lines = stderr_lines(proc)
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert uri in lines[0] and "unreachable" in lines[0]
    # MLflow's own client would retry for minutes; the check answers at once. The bound
    # includes the subprocess's start (Python + TensorFlow import, ~7 s on 2 busy cores).
    assert elapsed < 20, f"took {elapsed:.1f} s"
