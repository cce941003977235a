from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from medimg import tracking
from medimg.commands.gate import gate, rollback
from medimg.config import GateConfig, SelectionMetric, parse_params
from medimg.errors import ConfigError
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
    def make(
        accuracies: dict[str, float], promote: str = "local", metric: str = "accuracy", **gate_cfg
    ):
        params = tiny_params(
            tmp_path,
            train={"architectures": list(accuracies)},
            gate=gate_cfg,
            register={"promote": promote, "metric": metric},
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
    tags = tracking.version_by_alias(NAME, "champion")["tags"]  # version 1
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


@pytest.mark.parametrize(
    "metric", ["ece", "brier", SelectionMetric.ECE], ids=["ece", "brier", "enum"]
)
def test_rank_puts_the_lowest_first_where_lower_is_better(metric):
    reports = {
        "overconfident": {"accuracy": 0.95, "ece": 0.20, "brier": 0.30, "params": 10},
        "calibrated": {"accuracy": 0.90, "ece": 0.01, "brier": 0.05, "params": 10**6},
        "middling": {"accuracy": 0.92, "ece": 0.05, "brier": 0.10, "params": 10**3},
    }
    assert rank(reports, metric) == ["calibrated", "middling", "overconfident"]
    assert rank(reports, "accuracy") == ["overconfident", "middling", "calibrated"]
    same = {"ece": 0.02, "brier": 0.04}
    tied = {"big": {**same, "params": 10**7}, "small": {**same, "params": 10**5}}
    assert rank(tied, metric) == ["small", "big"]  # ties: still the smaller model


def test_register_metric_is_a_known_metric_with_a_direction():
    assert parse_params({"register": {"metric": "ece"}}).register_cfg.metric.lower_is_better
    assert not parse_params({}).register_cfg.metric.lower_is_better  # accuracy
    with pytest.raises(ConfigError, match=r"register\.metric: Input should be 'accuracy'"):
        parse_params({"register": {"metric": "loss"}})
    assert {m for m in SelectionMetric if m.lower_is_better} == {"ece", "brier"}


def test_register_by_ece_promotes_the_best_calibrated(setup):
    params = setup({"tiny": 0.95, "compact_cnn": 0.90}, min_accuracy=0.5, metric="ece")
    for arch, ece in (("tiny", 0.2), ("compact_cnn", 0.01)):
        summary = params.paths.eval_reports(arch) / "summary.json"
        write_json(summary, read_json(summary) | {"ece": ece})
    record = run(params)
    assert record["candidate"]["architecture"] == "compact_cnn" and record["promoted"]
    assert record["ranking"] == ["compact_cnn", "tiny"] and record["selection_metric"] == "ece"
    compare = (params.paths.promotion.parent / "compare.md").read_text()
    assert compare.index("| 1 | compact_cnn |") < compare.index("| 2 | tiny |")


def test_promotion_tags_the_version_with_the_evaluated_operating_threshold(setup):
    """`medimg predict` reads the `operating_threshold` tag: the threshold the evaluate stage
    chose on validation (details.json), written by promotion, not by hand."""
    params = setup({"tiny": 0.9}, min_accuracy=0.5)
    details = params.paths.eval_reports("tiny") / "details.json"
    point = {"threshold": 0.3125, "chosen_on": "val"}
    write_json(details, {"operating_point": point, "patient_level": {"patient_threshold": 0.1}})
    assert run(params)["promoted"]
    tags = tracking.version_by_alias(NAME, "champion")["tags"]  # version 1
    assert float(tags["operating_threshold"]) == 0.3125
    assert float(tags["patient_threshold"]) == 0.1  # `predict --by-patient` reads it
    assert float(tags["test_accuracy"]) == 0.9


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


@pytest.mark.parametrize("name", ["sensitivity", "specificity"])
def test_gate_refuses_an_operating_point_below_its_floor(setup, name):
    """`gate.min_sensitivity`/`min_specificity` judge the served operating point; a miss is
    refused with the metric, value, threshold and floor named, and nothing is registered."""
    params = setup({"tiny": 0.9}, min_accuracy=0.5, **{f"min_{name}": 0.95})
    summary = params.paths.eval_reports("tiny") / "summary.json"
    served = {"threshold": 0.069, "sensitivity": 0.97, "specificity": 0.97, name: 0.91}
    write_json(summary, read_json(summary) | served | {f"{name}_at_0.5": 0.99})
    record = run(params)
    assert not record["passed"] and not record["promoted"]
    assert record["reasons"] == [
        f"test {name} 0.9100 at the served threshold 0.0690 is below gate.min_{name} 0.95"
    ]
    assert record["candidate"]["threshold"] == 0.069
    assert _aliases(params) == {"champion": None, "challenger": None, "previous": None}
    assert gate(params) == 1


def test_gate_compares_accuracy_at_the_served_threshold():
    """A candidate better than the champion only at 0.5, a decision nobody is served, is a
    regression; the 0.5 figures are shown in compare.md, labelled, beside the served ones."""
    candidate = {
        "accuracy": 0.90,
        "sensitivity": 0.96,
        "specificity": 0.85,
        "threshold": 0.07,
        "accuracy_at_0.5": 0.97,
        "sensitivity_at_0.5": 0.93,
        "specificity_at_0.5": 0.99,
    }
    d = decide(candidate, {"accuracy": 0.95}, None, GateConfig(min_accuracy=0.5))
    assert not d["passed"] and d["reasons"][0].startswith("accuracy 0.9000 is 0.0500 below")
    table = compare_markdown({"tiny": {**candidate, "accuracy_ci": [0.88, 0.92]}}, ["tiny"], "x")
    assert "| 1 | tiny | 0.0700 | 0.9000 [0.8800, 0.9200] | 0.9600 | 0.8500 " in table
    assert "| 0.9700 / 0.9300 / 0.9900 |" in table
