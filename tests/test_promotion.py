from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from medimg import tracking
from medimg.commands.gate import gate, rollback
from medimg.config import GateConfig
from medimg.io import read_json, write_json
from medimg.promotion import compare_markdown, decide, rank
from medimg.register import run
from tests.conftest import log_candidate, tiny_params

NAME = "malaria-classifier"
N = 200


def _log_candidate(params, arch: str, correct: np.ndarray) -> None:
    log_candidate(params, arch, correct)


def _correct(accuracy: float, seed: int = 0) -> np.ndarray:
    c = np.zeros(N, bool)
    c[np.random.default_rng(seed).permutation(N)[: round(accuracy * N)]] = True
    return c


@pytest.fixture
def setup(tmp_path):
    def make(accuracies: dict[str, float], promote: str = "local", **gate_cfg):
        params = tiny_params(
            tmp_path,
            train={"architectures": list(accuracies)},
            gate=gate_cfg,
            register={"promote": promote},
        )
        params.paths.classes_json.parent.mkdir(parents=True, exist_ok=True)
        write_json(params.paths.classes_json, {"fingerprint": "fp1"})
        for i, (arch, acc) in enumerate(accuracies.items()):
            (params.paths.eval_metrics(arch)).parent.mkdir(parents=True, exist_ok=True)
            _log_candidate(params, arch, _correct(acc, seed=i))
        return params

    return make


def _aliases(params):
    tracking.configure(params.mlflow, params.dataset.name)
    return {
        a: (tracking.version_by_alias(NAME, a) or {}).get("version")
        for a in ("champion", "challenger", "previous")
    }


def test_best_architecture_passes_and_becomes_champion(setup, capsys):
    params = setup({"tiny": 0.90, "compact_cnn": 0.95}, min_accuracy=0.8)
    promotion = run(params)
    assert promotion["passed"] and promotion["candidate"]["architecture"] == "compact_cnn"
    assert _aliases(params) == {"champion": "1", "challenger": "1", "previous": None}
    assert read_json(params.paths.promotion)["candidate"]["version"] == "1"
    reports = params.paths.promotion.parent
    assert "| 1 | compact_cnn |" in (reports / "compare.md").read_text()
    assert (reports / "compare.png").stat().st_size > 0
    assert gate(params) == 0
    assert "PASS" in capsys.readouterr().out
    tags = tracking.version_info(NAME, "1")["tags"]
    assert tags["gate_passed"] == "True" and float(tags["test_accuracy"]) == 0.95


def test_threshold_failure_moves_no_alias_and_gate_exits_1(setup, capsys):
    params = setup({"tiny": 0.90}, min_accuracy=0.8)
    run(params)
    strict = params.model_copy(update={"gate": GateConfig(min_accuracy=0.999)})
    promotion = run(strict)
    assert not promotion["passed"]
    assert "below gate.min_accuracy 0.999" in promotion["reasons"][0]
    assert _aliases(params) == {
        "champion": "1",
        "challenger": "1",
        "previous": None,
    }  # refused: nothing registered
    assert gate(strict) == 1
    assert "FAIL" in capsys.readouterr().out


def test_regression_against_the_champion_fails_with_aliases_unchanged(setup):
    params = setup({"tiny": 0.95}, min_accuracy=0.5, max_regression=0.01)
    run(params)
    _log_candidate(params, "tiny", _correct(0.90, seed=5))
    promotion = run(params)
    assert not promotion["passed"]
    assert any("below the champion" in r for r in promotion["reasons"])
    assert promotion["paired_test"]["n"] == N  # same split: paired McNemar was computed
    assert _aliases(params) == {
        "champion": "1",
        "challenger": "1",
        "previous": None,
    }  # refused: nothing registered


def test_mcnemar_blocks_a_significantly_worse_candidate_within_max_regression(setup):
    params = setup({"tiny": 0.95}, min_accuracy=0.5, max_regression=0.2)
    run(params)
    _log_candidate(params, "tiny", _correct(0.85, seed=9))
    promotion = run(params)
    assert not promotion["passed"] and "McNemar" in promotion["reasons"][0]


def test_promotion_then_rollback(setup):
    params = setup({"tiny": 0.90}, min_accuracy=0.5)
    run(params)
    _log_candidate(params, "tiny", np.ones(N, bool))
    assert run(params)["passed"]
    assert _aliases(params) == {"champion": "2", "challenger": "2", "previous": "1"}
    rollback(params)
    assert _aliases(params) == {"champion": "1", "challenger": "2", "previous": "2"}


def test_decide_is_pure_and_lists_every_failed_check():
    cfg = GateConfig(min_accuracy=0.9, min_sensitivity=0.95, max_regression=0.0)
    d = decide(
        {"accuracy": 0.85, "sensitivity": 0.9, "specificity": 0.8}, {"accuracy": 0.9}, None, cfg
    )
    assert not d["passed"] and len(d["reasons"]) == 3
    assert [c["check"] for c in d["checks"]] == [
        "min_accuracy",
        "min_sensitivity",
        "max_regression",
    ]


def test_rank_prefers_the_smaller_model_on_ties():
    reports = {
        "big": {"accuracy": 0.9, "params": 10**7},
        "small": {"accuracy": 0.9, "params": 10**5},
    }
    assert rank(reports, "accuracy") == ["small", "big"]
    assert "| 1 | small |" in compare_markdown(
        {k: {**v, "accuracy_ci": [0.8, 0.95]} for k, v in reports.items()},
        ["small", "big"],
        "accuracy",
    )


def test_an_experiment_records_the_decision_but_promotes_nothing(setup, monkeypatch):
    params = setup({"tiny": 0.90}, min_accuracy=0.5)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-seed-7")
    record = run(params)
    assert record["passed"] and not record["promoted"]
    assert "experiments do not promote" in record["not_promoted_because"]
    assert _aliases(params) == {"champion": None, "challenger": None, "previous": None}
    compare = (params.paths.promotion.parent / "compare.md").read_text()
    assert "WOULD PASS" in compare
    gate_json = read_json(params.paths.promotion.parent / "gate.json")
    assert gate_json == {
        "passed": True,
        "promoted": False,
        "candidate_accuracy": 0.9,
        "champion_accuracy": None,
        "champion_version": None,
        "mcnemar_p": None,
    }
    assert gate(params) == 0  # the decision passes; nothing to check in the registry


def test_promotion_is_allowed_only_on_a_local_store_outside_experiments(tmp_path, monkeypatch):
    from medimg.promotion import promotion_allowed

    params = tiny_params(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert promotion_allowed(params)[0]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    allowed, why = promotion_allowed(params)
    assert not allowed and "medimg promote" in why
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    never = tiny_params(tmp_path, register={"promote": "never"})
    assert not promotion_allowed(never)[0]


def test_medimg_promote_exits_1_and_changes_nothing_when_refused(setup, capsys, tmp_path):
    from medimg.commands.promote import run as promote_cmd

    params = setup({"tiny": 0.95}, min_accuracy=0.5, max_regression=0.01, promote="never")
    args = SimpleNamespace(output=str(tmp_path / "decision.json"), summary=None)
    assert promote_cmd(params, args) == 0  # first candidate: promoted
    assert _aliases(params) == {"champion": "1", "challenger": "1", "previous": None}
    _log_candidate(params, "tiny", _correct(0.85, seed=3))
    assert promote_cmd(params, args) == 1
    record = read_json(tmp_path / "decision.json")
    assert not record["promoted"] and any("below the champion" in r for r in record["reasons"])
    assert _aliases(params) == {"champion": "1", "challenger": "1", "previous": None}
    _log_candidate(params, "tiny", np.ones(N, bool))
    assert promote_cmd(params, args) == 0
    assert _aliases(params) == {"champion": "2", "challenger": "2", "previous": "1"}
    assert "is the champion" in capsys.readouterr().out
