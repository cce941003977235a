"""The audit trail and model cards on the team server (real PostgreSQL, real accounts).

CI promotes twice and rolls back; every move is in the trail with CI's account and the gate's
verdict, and `medimg history` (read by a member) shows them newest first. A member can read the
trail and the cards but cannot add, erase or rewrite either: the server answers 403, because
the records are tags of the registered model and the card's summary and digest live on the
version, where members hold only the default READ (medimg.tracking.server).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from medimg import tracking
from medimg.commands import card as card_cmd
from medimg.commands import history
from medimg.commands.gate import rollback
from medimg.tracking import audit
from medimg.tracking.model_card import DIGEST_TAG
from tests.tracking.test_server import CI, MEMBER, MODEL, Server, as_user
from tests.tracking.test_team_flow import (
    N,
    correct_first,
    log_member_candidate,
    make_workspace,
    promote,
    team_server,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with team_server("medimg-audit-") as srv:
        yield srv


def test_ci_moves_are_audited_and_members_cannot_write_the_trail_or_the_card(
    server: Server, tmp_path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    params, params_file = make_workspace(tmp_path)
    log_member_candidate(params, server, correct_first(180))
    proc = promote(params_file, server.uri, CI, tmp_path / "d1.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log_member_candidate(params, server, correct_first(N))
    proc = promote(params_file, server.uri, CI, tmp_path / "d2.json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    as_user(monkeypatch, CI)
    rollback(params)  # champion v2 → v1, as CI

    as_user(monkeypatch, MEMBER)
    tracking.configure(params.mlflow, params.dataset.name)
    records = audit.records(MODEL)
    assert [r["action"] for r in records] == [
        "rollback", "promote", "register", "promote", "register",
    ]  # fmt: skip
    assert {r["user"] for r in records} == {CI[0]} and all(r["chain_ok"] for r in records)
    assert (records[0]["version_from"], records[0]["version_to"]) == ("2", "1")
    assert (records[1]["version_from"], records[1]["version_to"]) == ("1", "2")
    assert [r["verdict"] for r in records] == ["manual", "pass", "pass", "pass", "pass"]
    assert records[1]["data_hash"] == "team-flow-split"

    capsys.readouterr()
    assert history.run(params, argparse.Namespace(model=None)) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[2:] if not line.startswith("    ")]
    assert [(row[2], row[3]) for row in rows] == [(CI[0], r["action"]) for r in records]
    assert rows[0][4:9] == ["v2", "→", "v1", "champion", "manual"]
    assert rows[1][4:9] == ["v1", "→", "v2", "champion", "pass"]

    client = MlflowClient(server.uri)
    assert client.get_model_version(MODEL, "2").tags["registered_by"] == CI[0]
    key = records[-1]["key"]
    attempts = {
        "add an audit record": lambda: client.set_registered_model_tag(MODEL, "audit.x", "{}"),
        "erase an audit record": lambda: client.delete_registered_model_tag(MODEL, key),
        "add one through medimg": lambda: audit.append(MODEL, {"action": "promote"}),
        "rewrite the card summary": lambda: client.update_model_version(
            MODEL, "2", description="forged"
        ),
        "rewrite the card digest": lambda: client.set_model_version_tag(
            MODEL, "2", DIGEST_TAG, "0" * 64
        ),
    }
    for what, attempt in attempts.items():
        with pytest.raises(MlflowException) as err:
            attempt()
        assert err.value.get_http_status_code() == 403, what
    assert len(audit.records(MODEL)) == len(records)

    capsys.readouterr()  # members read the champion's card (v1 after the rollback)
    assert card_cmd.run(params, argparse.Namespace(model="champion", output=None, json=False)) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# Model card: {MODEL} v1") and f"registered by: {CI[0]}" in out
