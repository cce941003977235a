"""The audit trail and the model card on a local SQLite store, end to end through promotion:
register → promote → refuse → rollback leave records that `medimg history` lists newest first;
every registered version carries a card; a card with an empty required field is refused."""

from __future__ import annotations

import argparse
import getpass

import numpy as np
import pytest
from mlflow import MlflowClient

from medimg import tracking
from medimg.commands import card as card_cmd
from medimg.commands import history
from medimg.commands.gate import rollback
from medimg.errors import MedimgError
from medimg.io import write_json
from medimg.register import run
from medimg.tracking import audit, model_card
from medimg.tracking.runs import EXPERIMENT_KIND
from tests.conftest import log_candidate, tiny_params

NAME = "malaria-classifier"
N = 200


def _params(tmp_path, **card):
    params = tiny_params(
        tmp_path,
        gate={"min_accuracy": 0.5, "max_regression": 0.01},
        register={"card": card} if card else {},
    )
    write_json(
        params.paths.classes_json,
        {"fingerprint": "fp1", "classes": ["Uninfected", "Parasitized"],
         "patients": {"train": 7, "val": 3, "test": 3}, "images": {"train": 70, "val": 30,
         "test": N}},
    )  # fmt: skip
    return params


def _candidate(params, k: int) -> str:
    correct = np.zeros(N, bool)
    correct[:k] = True
    return log_candidate(params, "tiny", correct)


def _history(params, capsys) -> list[str]:
    capsys.readouterr()
    assert history.run(params, argparse.Namespace(model=None)) == 0
    return capsys.readouterr().out.splitlines()


def test_register_promote_refuse_rollback_are_audited_newest_first(tmp_path, capsys) -> None:
    params = _params(tmp_path)
    first = _candidate(params, 180)
    assert run(params)["promoted"]  # v1
    _candidate(params, 150)
    assert not run(params)["passed"]  # refused: regression
    _candidate(params, N)
    assert run(params)["promoted"]  # v2, previous = v1
    rollback(params)  # champion back to v1

    records = audit.records(NAME)
    assert [r["action"] for r in records] == [
        "rollback", "promote", "register", "refuse", "promote", "register",
    ]  # fmt: skip
    assert all(r["user"] == getpass.getuser() and r["chain_ok"] for r in records)
    back, promoted, refused = records[0], records[1], records[3]
    assert (back["version_from"], back["version_to"], back["verdict"]) == ("2", "1", "manual")
    assert (promoted["version_from"], promoted["version_to"]) == ("1", "2")
    assert promoted["verdict"] == "pass" and promoted["data_hash"] == "fp1"
    assert promoted["git_commit"] and promoted["run_id"]
    assert refused["verdict"] == "fail" and refused["version_to"] is None
    assert any("below the champion" in r for r in refused["reasons"])
    assert records[-1]["run_id"] == first
    times = [r["time"] for r in records]
    assert times == sorted(times, reverse=True)

    lines = _history(params, capsys)
    assert lines[0] == f"{NAME}: 6 audit record(s), newest first"
    rows = [line.split() for line in lines[2:] if not line.startswith("    ")]
    assert [row[3] for row in rows] == [r["action"] for r in records]
    assert rows[0][4:8] == ["v2", "→", "v1", "champion"] and rows[0][8] == "manual"
    assert "operator rollback: champion v2 → v1" in "\n".join(lines)

    client = MlflowClient()
    v2 = client.get_model_version(NAME, "2")
    assert v2.tags["registered_by"] == getpass.getuser()
    assert "malaria-classifier v2" in v2.description and "card/model_card.md" in v2.description
    card, intact = model_card.load_card(NAME, "2")
    assert intact and card["model_details"]["version"] == "2"
    assert card["model_parameters"]["data"]["fingerprint"] == "fp1"
    assert card["model_parameters"]["data"]["splits"]["test"]["images"] == N
    artifacts = [f.path for f in client.list_artifacts(v2.run_id, "card")]
    assert artifacts == ["card/model_card.json", "card/model_card.md"]
    experiment = client.get_experiment_by_name(params.mlflow.experiment_name("malaria"))
    assert experiment.tags[EXPERIMENT_KIND[0]] == EXPERIMENT_KIND[1]


def test_a_card_with_an_empty_required_field_is_refused(tmp_path, capsys) -> None:
    params = _params(tmp_path, intended_use=" ")
    _candidate(params, 190)
    record = run(params)
    assert not record["passed"] and not record["promoted"]
    assert any("considerations.intended_use" in r for r in record["reasons"])
    assert MlflowClient().search_model_versions(f"name='{NAME}'") == []  # nothing registered
    (refusal,) = audit.records(NAME)
    assert refusal["action"] == "refuse" and refusal["verdict"] == "fail"
    assert "considerations.intended_use" in " ".join(refusal["reasons"])
    assert "refuse" in _history(params, capsys)[2]


def test_medimg_card_prints_the_registered_card_and_refuses_a_changed_one(tmp_path, capsys) -> None:
    params = _params(tmp_path)
    _candidate(params, 190)
    assert run(params)["promoted"]
    args = argparse.Namespace(model=f"{NAME}@champion", output=None, json=False)
    capsys.readouterr()
    assert card_cmd.run(params, args) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# Model card: {NAME} v1") and "## Intended use" in out
    written = tmp_path / "card.json"
    args = argparse.Namespace(model="1", output=str(written), json=True)
    assert card_cmd.run(params, args) == 0
    assert '"model_details"' in written.read_text()

    # Anyone who may write to the run (a member, on the team server) could change the
    # artifact; the digest on the version (ci/admin only) shows it.
    run_id = tracking.version_by_alias(NAME, "champion")["run_id"]
    MlflowClient().log_text(run_id, '{"forged": true}', "card/model_card.json")
    with pytest.raises(MedimgError, match="changed after registration"):
        card_cmd.run(params, argparse.Namespace(model="champion", output=None, json=False))


def test_a_removed_record_breaks_the_chain_and_history_says_so(tmp_path, capsys) -> None:
    params = _params(tmp_path)
    tracking.configure(params.mlflow, params.dataset.name)
    for i in range(3):
        audit.append(NAME, {"action": f"a{i}", "reasons": []})
    keys = [r["key"] for r in audit.records(NAME)]
    MlflowClient().delete_registered_model_tag(NAME, keys[1])  # the middle one
    records = audit.records(NAME)
    assert [r["action"] for r in records] == ["a2", "a0"]
    assert [r["chain_ok"] for r in records] == [False, True]
    assert "changed or removed" in "\n".join(_history(params, capsys))
