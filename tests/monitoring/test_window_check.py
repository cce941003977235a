"""The reference's model groups (embedding PCA, served predictions) and the verdict on a served
window (`check_window`, `drift_metrics`): synthetic columns with a known distribution, shifted
on purpose, so each rule (KS floor + critical value, alpha shared over groups, minimum window,
out-of-distribution share, class shares) can be checked against the number it should give."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from medimg.data.properties import PROPERTIES
from medimg.monitoring.drift import ALPHA, check_window, drift_metrics, property_drift
from medimg.monitoring.reference import (
    QUANTILE_LEVELS,
    fit_embedding,
    probability_columns,
    project,
    quantile_profile,
    reference_from_table,
    with_model_outputs,
)

CLASSES = ("Uninfected", "Parasitized")  # binary: p_Parasitized is the served column
N_REF = 2000
SCALES = np.array([3.0, 2.0, 1.5, 0.5, 0.3, 0.2])  # embedding spread per axis: a clear PCA
K = 3  # embedding components kept


def _features(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.normal(size=(n, SCALES.size)) * SCALES + 1.0


def _decide(p: np.ndarray) -> np.ndarray:
    return np.where(p >= 0.5, CLASSES[1], CLASSES[0])


@pytest.fixture(scope="module")
def reference() -> dict:
    """Properties ~ N(0, 1) each, embeddings of spread SCALES, p_Parasitized ~ U(0, 1)."""
    rng = np.random.default_rng(0)
    table = {name: rng.normal(size=N_REF) for name in PROPERTIES}
    p = rng.uniform(size=N_REF)
    return with_model_outputs(
        reference_from_table(table),
        features=_features(rng, N_REF),
        components=K,
        probs=p,
        decisions=_decide(p),
        classes=CLASSES,
    )


def window(reference: dict, n: int, seed: int, shift: dict[str, float] | None = None) -> dict:
    """A served window of `n` requests from the reference's populations (every column
    `medimg monitor` hands over), with `shift` added to the named columns."""
    rng = np.random.default_rng(seed)
    out = {name: rng.normal(size=n) for name in PROPERTIES}
    out |= project(reference["embedding"], _features(rng, n))
    out["p_Parasitized"] = rng.uniform(size=n)
    for name, delta in (shift or {}).items():
        out[name] = out[name] + delta
    return out


def columns(summary: dict) -> dict[tuple[str, str], dict]:
    return {(g, c): r for g, rows in summary["groups"].items() for c, r in rows.items()}


def n_eff(n: int) -> int:
    return round(n * N_REF / (n + N_REF))


# --------------------------------------------------------------- reference: the model groups


def test_quantile_profile_holds_every_level_of_each_named_column() -> None:
    values = np.arange(1001, dtype=np.float64) / 3  # 0 .. 333.33..., 7 digits not exact
    table = {"a": values, "b": values[::-1] * 2, "c": np.zeros(1001)}
    prof = quantile_profile(table)
    assert prof["n"] == 1001 and prof["levels"] == list(QUANTILE_LEVELS)
    assert set(prof["properties"]) == {"a", "b", "c"}
    a = prof["properties"]["a"]
    assert a["n"] == 1001 and len(a["quantiles"]) == len(QUANTILE_LEVELS)
    assert a["quantiles"][0] == 0.0 and a["quantiles"][-1] == pytest.approx(1000 / 3)
    assert a["quantiles"][QUANTILE_LEVELS.index(0.5)] == pytest.approx(500 / 3)
    assert a["mean"] == pytest.approx(500 / 3) and a["std"] == pytest.approx(values.std())
    assert np.all(np.diff(a["quantiles"]) >= 0)
    # rounded to 7 significant digits (small JSON), still within 1e-7 relative
    assert all(q == float(f"{q:.7g}") for q in a["quantiles"])
    assert a["quantiles"][1] == 0.3333333  # the 0.1% level of 0, 1/3, ...: exactly 1/3 → 7 digits
    assert prof["properties"]["c"]["quantiles"] == [0.0] * len(QUANTILE_LEVELS)
    assert json.loads(json.dumps(prof)) == prof

    only_b = quantile_profile(table, ["b"])
    assert list(only_b["properties"]) == ["b"]
    assert only_b["properties"]["b"]["quantiles"][-1] == pytest.approx(2000 / 3)


@pytest.mark.parametrize(
    ("table", "match"),
    [
        ({"a": np.array([])}, "at least one"),
        ({"a": np.array([1.0, np.nan])}, "non-finite"),
        ({"a": np.array([1.0, np.inf])}, "non-finite"),
        ({"a": np.ones(3), "b": np.ones(4)}, "has 4 values, expected 3"),
    ],
)
def test_quantile_profile_rejects_empty_non_finite_or_ragged_columns(table, match) -> None:
    with pytest.raises(ValueError, match=match):
        quantile_profile(table)


def test_fit_embedding_finds_the_main_directions_deterministically() -> None:
    rng = np.random.default_rng(1)
    x = _features(rng, 500)
    emb = fit_embedding(x, components=K)
    basis = np.asarray(emb["basis"])
    assert emb["dim"] == SCALES.size and basis.shape == (K, SCALES.size)
    np.testing.assert_allclose(emb["mean"], x.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(basis @ basis.T, np.eye(K), atol=1e-6)  # orthonormal rows
    # the largest-spread axes, in order (sign aside)
    np.testing.assert_allclose(np.abs(basis), np.eye(SCALES.size)[:K], atol=0.2)
    evr = emb["explained_variance_ratio"]
    assert evr == sorted(evr, reverse=True) and 0.9 < sum(evr) <= 1.0
    assert fit_embedding(x, components=K) == emb  # signs fixed: same reference every run
    assert json.loads(json.dumps(emb)) == emb


@pytest.mark.parametrize(("n", "d", "asked", "kept"), [(50, 4, 10, 4), (3, 6, 5, 2), (50, 6, 0, 1)])
def test_fit_embedding_keeps_no_more_components_than_the_data_has(n, d, asked, kept) -> None:
    emb = fit_embedding(np.random.default_rng(2).normal(size=(n, d)), components=asked)
    assert np.asarray(emb["basis"]).shape == (kept, d)


@pytest.mark.parametrize("shape", [(1, 4), (10,), (2, 3, 4)])
def test_fit_embedding_rejects_fewer_than_two_rows_or_a_non_matrix(shape) -> None:
    with pytest.raises(ValueError, match="embedding reference needs"):
        fit_embedding(np.ones(shape), components=2)


def test_project_centres_on_the_stored_mean_and_reads_the_stored_basis() -> None:
    rng = np.random.default_rng(3)
    x = _features(rng, 200)
    emb = fit_embedding(x, components=K)
    z = project(emb, x[:5])
    assert list(z) == ["emb_0", "emb_1", "emb_2"]
    expected = (x[:5] - np.asarray(emb["mean"])) @ np.asarray(emb["basis"]).T
    np.testing.assert_allclose(np.column_stack(list(z.values())), expected)
    # the mean itself projects to the origin; one (D,) embedding is one row
    origin = project(emb, np.asarray(emb["mean"]))
    assert all(v.shape == (1,) and v[0] == pytest.approx(0.0, abs=1e-9) for v in origin.values())
    # a point on the first axis, away from the mean: all of its offset lands in emb_0
    on_axis = np.asarray(emb["mean"]) + 2.0 * np.asarray(emb["basis"][0])
    z1 = project(emb, on_axis[None])
    assert z1["emb_0"][0] == pytest.approx(2.0) and abs(z1["emb_1"][0]) < 1e-6


def test_probability_columns_binary_gives_the_positive_class_only() -> None:
    p = np.array([0.2, 0.9])
    binary = probability_columns(p, CLASSES)
    assert list(binary) == ["p_Parasitized"]
    np.testing.assert_array_equal(binary["p_Parasitized"], p)
    multi = probability_columns(np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]), ["a", "b", "c"])
    assert list(multi) == ["p_a", "p_b", "p_c"]
    np.testing.assert_array_equal(multi["p_c"], [0.1, 0.8])


def test_with_model_outputs_adds_embedding_and_prediction_groups(reference: dict) -> None:
    rng = np.random.default_rng(0)  # the fixture's stream: same table, features, probs
    table = {name: rng.normal(size=N_REF) for name in PROPERTIES}
    p = rng.uniform(size=N_REF)
    features = _features(rng, N_REF)
    base = reference_from_table(table)
    before = json.dumps(base)
    out = with_model_outputs(
        base, features=features, components=K, probs=p, decisions=_decide(p), classes=CLASSES
    )
    assert json.dumps(base) == before  # the image reference is not modified
    assert out == reference and json.loads(json.dumps(out)) == out
    assert out["properties"] == base["properties"] and out["version"] == base["version"]

    emb = out["embedding"]
    assert emb["basis"] == fit_embedding(features, K)["basis"]
    assert emb["properties"] == quantile_profile(project(emb, features))["properties"]
    assert emb["n"] == N_REF and list(emb["properties"]) == ["emb_0", "emb_1", "emb_2"]

    pred = out["predictions"]
    assert list(pred["properties"]) == ["p_Parasitized"] and pred["classes"] == list(CLASSES)
    share = pred["class_share"]
    assert share["Parasitized"] == pytest.approx(np.mean(p >= 0.5))
    assert share["Parasitized"] + share["Uninfected"] == pytest.approx(1.0)
    q = pred["properties"]["p_Parasitized"]["quantiles"]
    assert q[QUANTILE_LEVELS.index(0.5)] == pytest.approx(np.median(p), rel=1e-6)


@pytest.mark.parametrize(("features", "components"), [(None, 3), ("x", 0)])
def test_with_model_outputs_has_no_embedding_without_features_or_components(
    features, components
) -> None:
    x = _features(np.random.default_rng(4), 50) if features else None
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    out = with_model_outputs(
        {"version": 2},
        features=x,
        components=components,
        probs=p,
        decisions=["Uninfected", "Parasitized", "Uninfected"],
        classes=CLASSES,
    )
    assert "embedding" not in out
    assert list(out["predictions"]["properties"]) == ["p_Uninfected", "p_Parasitized"]
    assert out["predictions"]["class_share"] == pytest.approx(
        {"Uninfected": 2 / 3, "Parasitized": 1 / 3}
    )


# ---------------------------------------------------------------------------- check_window


def test_a_window_from_the_reference_population_is_not_drifted(reference: dict) -> None:
    for seed in (1, 2, 3):
        summary = check_window(reference, window(reference, 300, seed))
        assert not summary["drifted"] and summary["reasons"] == []
        assert summary["n"] == 300 and summary["enough_requests"]
        cols = columns(summary)
        assert len(cols) == len(PROPERTIES) + K + 1  # every column of every group tested
        assert not any(r["drifted"] for r in cols.values())
        assert not summary["ood"]["flagged"] and summary["ood"]["share"] < 0.02
        json.dumps(summary)  # JSON-serialisable as it is


def test_a_large_shift_of_one_property_drifts_exactly_that_property(reference: dict) -> None:
    summary = check_window(reference, window(reference, 300, 4, shift={"contrast": 2.0}))
    assert summary["drifted"]
    drifted = [key for key, r in columns(summary).items() if r["drifted"]]
    assert drifted == [("properties", "contrast")]
    row = summary["groups"]["properties"]["contrast"]
    assert row["statistic"] > row["threshold"] == pytest.approx(0.3 + row["critical"])
    assert row["window_mean"] - row["reference_mean"] == pytest.approx(2.0, abs=0.2)
    assert not summary["ood"]["flagged"]  # 2 sd keeps most requests inside the OOD bounds
    (reason,) = summary["reasons"]
    assert reason.startswith("properties/contrast: KS ")
    assert f"KS {row['statistic']:.3f} > {row['threshold']:.3f}" in reason


def test_a_window_under_min_requests_is_reported_but_never_drifted(reference: dict) -> None:
    shifted = window(reference, 10, 5, shift={"contrast": 6.0, "emb_0": 20.0})
    summary = check_window(reference, shifted)  # default min_requests=25
    assert not summary["enough_requests"]
    assert not summary["drifted"] and summary["reasons"] == []
    assert summary["thresholds"]["min_requests"] == 25
    # ... its statistics are still there, and would have drifted in a large enough window
    for group, name in [("properties", "contrast"), ("embedding", "emb_0")]:
        row = summary["groups"][group][name]
        assert not row["drifted"] and row["statistic"] > row["threshold"]
    assert summary["ood"]["share"] >= 0.8 and summary["ood"]["count"] >= 8
    assert not summary["ood"]["flagged"]

    enough = check_window(reference, shifted, min_requests=10)
    assert enough["drifted"] and enough["enough_requests"]
    assert {r.split(":")[0] for r in enough["reasons"]} == {
        "properties/contrast",
        "embedding/emb_0",
        "out of distribution",
    }


def test_alpha_is_split_over_the_groups_present_then_over_their_columns(reference: dict) -> None:
    n, alpha = 200, 0.05
    full = window(reference, n, 6)
    three = check_window(reference, full, alpha=alpha)
    props_only = {name: full[name] for name in PROPERTIES}
    one = check_window(reference, props_only, alpha=alpha)
    assert list(three["groups"]) == ["properties", "embedding", "predictions"]
    assert list(one["groups"]) == ["properties"]  # the reference has 3, the window 1

    c3 = three["groups"]["properties"]["contrast"]["critical"]
    c1 = one["groups"]["properties"]["contrast"]["critical"]
    assert c3 == pytest.approx(stats.kstwo.isf(alpha / 3 / len(PROPERTIES), n_eff(n)))
    assert c1 == pytest.approx(stats.kstwo.isf(alpha / 1 / len(PROPERTIES), n_eff(n)))
    assert c3 > c1
    emb = three["groups"]["embedding"]["emb_1"]["critical"]
    assert emb == pytest.approx(stats.kstwo.isf(alpha / 3 / K, n_eff(n)))
    pred = three["groups"]["predictions"]["p_Parasitized"]["critical"]
    assert pred == pytest.approx(stats.kstwo.isf(alpha / 3 / 1, n_eff(n)))
    assert three["thresholds"]["alpha"] == alpha


def test_columns_missing_from_part_of_the_window_are_tested_on_the_rest(reference: dict) -> None:
    """A window read across old and new log parts has NaN embeddings for the old rows: those
    rows are left out of the embedding test; all-NaN drops the group (and its alpha share)."""
    full = window(reference, 200, 7)
    half = dict(full)
    for name in ("emb_0", "emb_1", "emb_2"):
        half[name] = np.where(np.arange(200) < 100, np.nan, full[name])
    summary = check_window(reference, half)
    got = summary["groups"]["embedding"]["emb_0"]
    tail = {name: full[name][100:] for name in ("emb_0", "emb_1", "emb_2")}
    want = property_drift(reference["embedding"], tail, alpha=ALPHA / 3)["emb_0"]
    assert got["statistic"] == pytest.approx(want["statistic"])
    assert got["critical"] == pytest.approx(want["critical"])

    none = dict(full) | {name: np.full(200, np.nan) for name in ("emb_0", "emb_1", "emb_2")}
    summary = check_window(reference, none)
    assert list(summary["groups"]) == ["properties", "predictions"]
    c = summary["groups"]["properties"]["contrast"]["critical"]
    assert c == pytest.approx(stats.kstwo.isf(ALPHA / 2 / len(PROPERTIES), n_eff(200)))


@pytest.mark.parametrize(("group", "name"), [("properties", "brightness"), ("embedding", "emb_0")])
def test_min_statistic_is_applied_per_group(reference: dict, group: str, name: str) -> None:
    ref = reference if group == "properties" else reference[group]
    sd = ref["properties"][name]["std"]
    shifted = window(reference, 1000, 8, shift={name: 1.35 * sd})  # KS ~ 0.5
    other = "embedding" if group == "properties" else "properties"

    default = check_window(reference, shifted)
    row = default["groups"][group][name]
    assert 0.42 < row["statistic"] < 0.58 and row["critical"] < 0.1
    assert row["drifted"] and default["drifted"]

    strict = check_window(reference, shifted, min_statistic={group: 0.6})
    row = strict["groups"][group][name]
    assert not row["drifted"] and not strict["drifted"]
    assert row["threshold"] == pytest.approx(0.6 + row["critical"])
    assert strict["thresholds"]["min_statistic"] == {
        "properties": 0.3,
        "embedding": 0.3,
        "predictions": 0.3,
    } | {group: 0.6}

    elsewhere = check_window(reference, shifted, min_statistic={other: 0.6})
    assert elsewhere["groups"][group][name]["drifted"]  # another group's floor: no effect


@pytest.mark.parametrize(
    ("n_ood", "max_share", "flagged"),
    [(40, 0.1, True), (40, 0.25, False), (20, 0.1, False), (10, 0.1, False)],
)
def test_out_of_distribution_share_over_max_drifts_the_window(
    reference: dict, n_ood: int, max_share: float, flagged: bool
) -> None:
    n = 200
    win = window(reference, n, 9)
    win["saturation"] = np.where(np.arange(n) < n_ood, -10.0, win["saturation"])
    ids = np.array([f"req-{i}" for i in range(n)])
    summary = check_window(reference, win, max_ood_share=max_share, ids=ids)
    ood = summary["ood"]
    assert ood["count"] == n_ood and ood["share"] == pytest.approx(n_ood / n)
    assert ood["properties"] == {"saturation": n_ood} and ood["max_share"] == max_share
    assert [r["id"] for r in ood["requests"]] == list(ids[:n_ood])
    assert all(r["properties"] == ["saturation"] for r in ood["requests"])
    assert not summary["groups"]["properties"]["saturation"]["drifted"]  # KS alone: no
    assert ood["flagged"] is flagged and summary["drifted"] is flagged
    if flagged:
        (reason,) = summary["reasons"]
        assert reason.startswith(f"out of distribution: {n_ood}/{n} requests")
        assert reason.endswith("by saturation")
    else:
        assert summary["reasons"] == []


def test_out_of_distribution_requests_without_ids_are_listed_with_none(reference: dict) -> None:
    win = window(reference, 50, 10)
    win["mean_r"][[3, 7]] = 50.0
    listed = check_window(reference, win)["ood"]["requests"]
    assert listed == [{"id": None, "properties": ["mean_r"]}] * 2


def test_class_share_compares_decisions_with_the_reference(reference: dict) -> None:
    win = window(reference, 100, 11)
    decisions = np.array(["Parasitized"] * 80 + ["Uninfected"] * 20)
    summary = check_window(reference, win, decisions=decisions)
    assert summary["class_share"]["window"] == pytest.approx(
        {"Uninfected": 0.2, "Parasitized": 0.8}
    )
    assert summary["class_share"]["reference"] == reference["predictions"]["class_share"]
    assert "class_share" not in check_window(reference, win)  # no decisions: nothing to compare
    no_predictions = {k: v for k, v in reference.items() if k != "predictions"}
    assert "class_share" not in check_window(no_predictions, win, decisions=decisions)


def test_drift_metrics_has_every_column_and_the_verdict(reference: dict) -> None:
    win = window(reference, 300, 12, shift={"contrast": 2.0})
    decisions = _decide(win["p_Parasitized"])
    summary = check_window(reference, win, decisions=decisions)
    metrics = drift_metrics(summary)
    stat_keys = {f"drift_properties_{name}" for name in PROPERTIES}
    stat_keys |= {f"drift_embedding_emb_{i}" for i in range(K)}
    stat_keys |= {"drift_predictions_p_Parasitized"}
    max_keys = {f"drift_{g}_max" for g in ("properties", "embedding", "predictions")}
    share_keys = {"class_share_Uninfected", "class_share_Parasitized"}
    verdict_keys = {"n_requests", "drifted", "ood_share"}
    assert set(metrics) == stat_keys | max_keys | share_keys | verdict_keys
    for (group, name), row in columns(summary).items():
        assert metrics[f"drift_{group}_{name}"] == row["statistic"]
    assert metrics["drift_properties_max"] == metrics["drift_properties_contrast"]
    assert metrics["drifted"] == 1.0 and metrics["n_requests"] == 300.0
    assert metrics["ood_share"] == summary["ood"]["share"]
    assert metrics["class_share_Parasitized"] == pytest.approx(np.mean(decisions == "Parasitized"))
    assert all(isinstance(v, float) for v in metrics.values())

    clean = drift_metrics(check_window(reference, window(reference, 300, 13)))
    assert clean["drifted"] == 0.0 and "class_share_Parasitized" not in clean
