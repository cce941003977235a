from __future__ import annotations

import numpy as np
import pytest

from medimg.analysis.gradcam import gradcam_picks
from medimg.commands.export import MIN_AGREEMENT
from medimg.config import EvaluateConfig, SelectionMetric
from medimg.evaluate import headline, predictions_frame, score
from medimg.io import read_json
from medimg.models.loading import load_model
from medimg.scoring import probabilities
from tests.conftest import load_arrays


def _binary_case(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(0.5 + (y - 0.5) * rng.uniform(0.0, 0.9, n) + rng.normal(0, 0.15, n), 0, 1)
    groups = [f"P{i % 40}" for i in range(n)]
    return y, p, groups


def test_score_picks_the_threshold_on_val_and_applies_it_to_test():
    y_val, p_val, _ = _binary_case(seed=1)
    y, p, groups = _binary_case(seed=2)
    cfg = EvaluateConfig(target_sensitivity=0.97, bootstrap=200)
    result = score(y, p, y_val, p_val, groups, ["Uninfected", "Parasitized"], cfg, seed=0)
    op = result["operating_point"]
    assert op["chosen_on"] == "val" and op["threshold"] < 0.5
    val_sens = np.mean(p_val[y_val == 1] >= op["threshold"])
    assert val_sens >= 0.97
    assert op["sensitivity"] >= result["at_0.5"]["sensitivity"]  # lower threshold, more calls
    assert result["positive_class"] == "Parasitized"
    for name in ("accuracy", "sensitivity", "specificity", "roc_auc"):
        ci = result["ci"][name]
        assert ci["low"] <= result[name] <= ci["high"], name
        assert ci["n_groups"] == 40  # resampled over patients, not cells


def test_every_selection_metric_is_in_the_summary_register_ranks():
    """`register.metric` accepts exactly what a binary evaluation's summary.json holds."""
    y_val, p_val, _ = _binary_case(seed=1)
    y, p, groups = _binary_case(seed=2)
    cfg = EvaluateConfig(bootstrap=20)
    result = score(y, p, y_val, p_val, groups, ["Uninfected", "Parasitized"], cfg, seed=0)
    summary = headline(result, {"params": 10}, {})
    assert all(isinstance(summary[m], float) for m in SelectionMetric), summary


def test_score_multiclass_has_macro_and_per_class():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    probs = rng.dirichlet(np.ones(4), 200)
    probs[np.arange(200), y] += 1.0
    probs /= probs.sum(1, keepdims=True)
    classes = ["CNV", "DME", "DRUSEN", "NORMAL"]
    result = score(
        y,
        probs,
        y,
        probs,
        [str(i % 10) for i in range(200)],
        classes,
        EvaluateConfig(bootstrap=50),
        0,
    )
    assert set(result["per_class"]) == set(classes)
    assert result["roc_auc"] > 0.9 and "accuracy" in result["ci"]


def test_gradcam_picks_the_most_confident_mistakes_first():
    y = np.array([1, 1, 1, 1, 0])
    p = np.array([0.1, 0.4, 0.9, 0.8, 0.2])
    wrong, right = gradcam_picks(y, p, cls=1, n=4)
    assert wrong == [0, 1] and right == [2, 3]


def test_predictions_frame_feeds_dvc_confusion_plots():
    frame = predictions_frame(
        ["a", "b"],
        ["P1", "P2"],
        np.array([0, 1]),
        np.array([0.7, 0.9]),
        ["Uninfected", "Parasitized"],
        0.5,
    )
    assert frame["predicted"].tolist() == ["Parasitized", "Parasitized"]
    assert frame["correct"].tolist() == [False, True]


@pytest.mark.slow
def test_evaluate_stage_writes_reports_and_logs_into_the_training_run(tmp_path):
    from mlflow import MlflowClient

    from medimg.evaluate import run
    from medimg.train import fit
    from tests.conftest import tiny_params, write_split_dir

    params = tiny_params(
        tmp_path,
        # trained until it separates the planted squares: the int8 parity below is then a
        # property of the conversion, not of probabilities that all sit at 0.5
        train={"epochs": 30, "learning_rate": 0.03},
        evaluate={
            "bootstrap": 100,
            "gradcam_examples": 4,
            "representative_samples": 16,
            "benchmark_images": 16,
        },
    )
    write_split_dir(params)
    trained = fit(params, "tiny")
    flat = run(params, "tiny")
    out = params.paths.eval_reports("tiny")
    metrics = read_json(out / "summary.json")
    assert metrics == flat
    assert 0 <= metrics["accuracy"] <= 1 and metrics["accuracy_ci"][0] <= metrics["accuracy"]
    # the int8 file evaluate reports on would pass `medimg export`'s parity floor
    assert metrics["int8_bytes"] > 0 and metrics["int8_agreement"] >= MIN_AGREEMENT
    # images on which int8 and Keras decide alike are right or wrong for both
    drift = abs(metrics["int8_accuracy"] - metrics["accuracy_at_0.5"])  # both decide at 0.5
    assert drift <= 1 - metrics["int8_agreement"] + 1e-9
    compared = read_json(params.paths.eval_metrics("tiny"))  # what dvc exp show lists
    assert set(compared) == {
        *(
            f"{m}{s}"
            for m in ("accuracy", "sensitivity", "specificity", "roc_auc")
            for s in ("", "_ci_low", "_ci_high")
        ),
        "ece",
        "ece_before",
        "temperature",
        "keras_bytes",
        "int8_accuracy",
        "threshold",
        "accuracy_at_0.5",
        "sensitivity_at_0.5",
        "specificity_at_0.5",
    }
    assert compared["threshold"] == read_json(out / "details.json")["operating_point"]["threshold"]
    assert compared["accuracy_ci_low"] == metrics["accuracy_ci"][0]
    assert compared["int8_accuracy"] == metrics["int8_accuracy"]
    for name in (
        "confusion.png",
        "roc.png",
        "pr.png",
        "calibration.png",
        "details.json",
        "gradcam_Parasitized.png",
        "learning_curves.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert params.paths.eval_predictions("tiny").read_text().startswith("path,patient,actual")
    assert params.paths.eval_roc("tiny").read_text().startswith("fpr,tpr")
    client = MlflowClient(params.mlflow.tracking_uri)
    logged_run = client.get_run(trained["run_id"])
    logged = logged_run.data.metrics
    assert logged["test_accuracy"] == pytest.approx(metrics["accuracy"])
    assert "test_params" not in logged and logged_run.data.tags["test_params"] == str(
        metrics["params"]
    )
    # the test metrics are linked to the logged model and to the split dataset
    model = client.get_logged_model(read_json(out / "run.json")["model_id"])
    linked = {m.key: m for m in model.metrics or []}
    assert linked["test_accuracy"].value == pytest.approx(metrics["accuracy"])
    assert (
        linked["test_accuracy"].dataset_digest
        == read_json(params.paths.classes_json)["fingerprint"]
    )
    contexts = {
        tag.value
        for d in logged_run.inputs.dataset_inputs
        for tag in d.tags
        if tag.key == "mlflow.data.context"
    }
    assert contexts == {"train"}  # the split, logged once as the run's input

    # the served model: logged by evaluate with its temperature and operating threshold, and
    # it scores exactly as the evaluate stage did (one scoring path)
    import mlflow

    run_json = read_json(out / "run.json")
    assert run_json["model_id"] == model.model_id
    details = read_json(out / "details.json")
    t = details["calibration"]["temperature"]
    assert metrics["temperature"] == t and 0.05 <= t <= 20
    assert metrics["ece_before"] == details["calibration"]["ece_before"]
    mlflow.set_tracking_uri(params.mlflow.tracking_uri)
    served = mlflow.pyfunc.load_model(run_json["model_uri"])
    x, _, _, _ = load_arrays(params.paths.split, "test", 32)
    keras_model = load_model(params.paths.model_file("tiny"))
    expected = probabilities(keras_model, x[:5], temperature=t)
    rows = served.predict(x[:5])
    np.testing.assert_allclose(rows["p_Parasitized"], expected, rtol=1e-5)
    assert rows["threshold"].iloc[0] == pytest.approx(details["operating_point"]["threshold"])
    # patient-level diagnosis (medimg.analysis.patient): one row per test patient, the patient
    # threshold chosen on val and stored with the served model for `predict --by-patient`
    patient = metrics["patient_level"]
    assert patient == details["patient_level"] and patient["chosen_on"] == "val"
    assert 0 <= patient["patient_sensitivity"] <= 1 and len(patient["parasitemia_mae_ci"]) == 2
    per_patient = (out / "patients.csv").read_text().splitlines()
    assert per_patient[0].startswith("patient,cells,")
    assert len(per_patient) == patient["patients"] + 1
    assert served.model_config["patient_threshold"] == patient["patient_threshold"]
    assert "eval" in {a.path for a in client.list_artifacts(trained["run_id"])}


def test_bootstrap_lower_threshold_keeps_the_target_for_new_patients():
    from medimg.analysis.metrics import threshold_for_sensitivity
    from medimg.analysis.operating import operating_threshold

    rng = np.random.default_rng(0)
    groups = np.repeat([f"P{i}" for i in range(30)], 20)
    y = rng.integers(0, 2, len(groups))
    p = np.clip(0.5 * y + rng.normal(0.25, 0.2, len(y)), 0, 1)
    point_cfg = EvaluateConfig(threshold_rule="point", target_sensitivity=0.95)
    boot_cfg = EvaluateConfig(threshold_rule="bootstrap_lower", target_sensitivity=0.95)
    point, rule = operating_threshold(y, p, list(groups), point_cfg, seed=0)
    assert point == threshold_for_sensitivity(y, p, 0.95) and rule["rule"] == "point"
    lower, rule = operating_threshold(y, p, list(groups), boot_cfg, seed=0)
    assert lower < point and rule["point_threshold"] == point
    # on fresh patients from the same population the lower threshold keeps sensitivity more
    y2 = rng.integers(0, 2, 4000)
    p2 = np.clip(0.5 * y2 + rng.normal(0.25, 0.2, len(y2)), 0, 1)
    sens = lambda t: float(np.mean(p2[y2 == 1] >= t))  # noqa: E731
    assert sens(lower) > sens(point)  # the point estimate over-promises on new patients


def test_headline_is_the_served_decision_with_the_0_5_figures_beside():
    """The headline (summary.json, reports/eval/<arch>.json, the gate) is what the served
    model decides: rates and patient-bootstrap CIs at the operating threshold, 0.5 labelled."""
    from medimg.analysis.operating import confidence_intervals
    from medimg.evaluate import dvc_metrics

    y_val, p_val, _ = _binary_case(seed=1)
    y, p, groups = _binary_case(seed=2)
    cfg = EvaluateConfig(target_sensitivity=0.97, bootstrap=100)
    result = score(y, p, y_val, p_val, groups, ["Uninfected", "Parasitized"], cfg, seed=0)
    t = result["operating_point"]["threshold"]
    assert t < 0.5 and result["threshold"] == t
    called, pos = p >= t, y == 1
    assert result["accuracy"] == pytest.approx(np.mean(called == pos))
    assert result["sensitivity"] == pytest.approx(np.mean(called[pos]))
    assert result["specificity"] == pytest.approx(np.mean(~called[~pos]))
    half = result["at_0.5"]
    assert half["accuracy"] == pytest.approx(np.mean((p >= 0.5) == pos))
    assert half["sensitivity"] < result["sensitivity"]  # the lower threshold calls more
    assert result["ci"] == confidence_intervals(y, p, groups, cfg, 0, t)
    flat = headline(result, {"params": 10}, {})
    assert flat["threshold"] == t and flat["accuracy"] == result["accuracy"]
    assert {flat[f"{k}_at_0.5"] for k in ("accuracy", "sensitivity")} == {
        half["accuracy"],
        half["sensitivity"],
    }
    compared = dvc_metrics(flat)
    assert compared["threshold"] == t and compared["sensitivity"] == result["sensitivity"]
    assert compared["specificity_at_0.5"] == half["specificity"]


def _overlapping_cells(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Real cells' shape: a few infected cells score like uninfected ones (a heavy low tail)."""
    y = rng.integers(0, 2, n)
    hard = rng.random(n) < 0.08
    pos = np.where(hard, rng.beta(2, 8, n), rng.beta(8, 2, n))
    return y, np.where(y == 1, pos, rng.beta(2, 6, n))


def test_optimism_rule_holds_the_target_on_new_patients_for_less_specificity():
    """Over repeated val sets of 20 patients, `optimism` keeps the mean sensitivity on the
    population at the target (point falls short of it) and gives away far less specificity
    than `bootstrap_lower`."""
    from medimg.analysis.operating import operating_threshold, sensitivity_optimism

    y_new, p_new = _overlapping_cells(np.random.default_rng(123), 40000)
    groups = list(np.repeat([f"P{i}" for i in range(20)], 20))
    rates: dict[str, list[tuple[float, float]]] = {}
    for draw in range(12):
        y, p = _overlapping_cells(np.random.default_rng(draw), len(groups))
        assert sensitivity_optimism(y, p, groups, 0.95, 50, seed=0) >= 0
        for rule in ("point", "bootstrap_lower", "optimism"):
            cfg = EvaluateConfig(threshold_rule=rule, bootstrap=100, max_specificity_cost=None)
            t, how = operating_threshold(y, p, groups, cfg, seed=0)
            assert t <= how["point_threshold"]
            sens, spec = np.mean(p_new[y_new == 1] >= t), np.mean(p_new[y_new == 0] < t)
            rates.setdefault(rule, []).append((sens, spec))
    mean = {rule: np.mean(v, axis=0) for rule, v in rates.items()}
    assert mean["optimism"][0] >= 0.95 > mean["point"][0]
    assert mean["optimism"][1] > mean["bootstrap_lower"][1] + 0.1
