"""The monitoring HTML page: what a person must see (verdict, lost log records, which column
moved) is there and marked, data strings cannot inject markup, and odd columns (constant,
tied quantiles, missing) do not break the page."""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

from medimg.data.properties import PROPERTIES
from medimg.monitoring.drift import property_drift
from medimg.monitoring.reference import quantile_profile, reference_from_table
from medimg.monitoring.report import _bin_edges, _reference_density, render_html

N = 300
EMB = [f"emb_{i}" for i in range(8)]
PRED = ["p_Parasitized", "p_Uninfected"]
IMG = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _table(rng: np.random.Generator, shift: float = 0.0) -> dict[str, np.ndarray]:
    """Every column the page can plot; height constant (resized cells), size integer with
    few values (tied reference quantiles), brightness shifted by `shift`."""
    t = {name: rng.normal(0.5, 0.1, N) for name in PROPERTIES}
    t["brightness"] = rng.normal(0.6 - shift, 0.05, N)
    t["height"] = np.full(N, 128.0)
    t["size"] = rng.integers(100, 104, N).astype(np.float64)
    t.update({name: rng.normal(0.0, 1.0, N) for name in EMB})
    p = rng.uniform(0, 1, N)
    t.update({"p_Parasitized": p, "p_Uninfected": 1 - p})
    return t


@pytest.fixture(scope="module")
def reference() -> dict:
    table = _table(np.random.default_rng(0))
    ref = reference_from_table(table)
    emb = {"mean": [0.0] * 8, "basis": [], "layer": "dense"}  # ignored by the page
    ref["embedding"] = {**emb, **quantile_profile(table, EMB)}
    ref["predictions"] = {**quantile_profile(table, PRED), "class_share": {"Parasitized": 0.5}}
    return ref


@pytest.fixture(scope="module")
def window() -> dict[str, np.ndarray]:
    return _table(np.random.default_rng(1), shift=0.3)


def _summary(reference: dict, window: dict, *, drifted: bool = True, **extra) -> dict:
    groups = {
        "properties": property_drift(reference, window),
        "embedding": property_drift(reference["embedding"], window),
        "predictions": property_drift(reference["predictions"], window),
    }
    for results in groups.values():
        for r in results.values():
            r["threshold"] = 0.3 + r["critical"]
    summary = {
        "model": {"name": "malaria-classifier", "version": "3", "alias": "champion"},
        "window": {"n": N, "start": "2026-11-30T08:00:00+00:00", "end": "2026-11-30T09:00:00"},
        "drifted": drifted,
        "reasons": ["properties/brightness: KS 0.62 > 0.41"] if drifted else [],
        "groups": groups,
        "class_share": {
            "window": {"Parasitized": 0.7, "Uninfected": 0.3},
            "reference": {"Parasitized": 0.5, "Uninfected": 0.5},
        },
        "ood": {"share": 0.0, "flagged": False, "max_share": 0.1, "count": 0, "properties": {}},
        "log": {"logged": N, "written": N, "dropped": 0, "lost": 0, "errors": 0},
        "thresholds": {
            "alpha": 0.01,
            "min_statistic": {"properties": 0.3, "embedding": 0.3, "predictions": 0.3},
            "max_ood_share": 0.1,
            "min_requests": 25,
        },
    }
    return {**summary, **extra}


@pytest.fixture(scope="module")
def drifted(reference, window) -> tuple[dict, str]:
    """A drifted summary and its page with every plot (rendered once: ~1 s of matplotlib)."""
    summary = _summary(reference, window)
    return summary, render_html(summary, reference, window)


def _section(page: str, element_id: str) -> str:
    """The element with `element_id` up to the next top-level box (enough for these checks)."""
    start = page.index(f'id="{element_id}"')
    return page[start : page.index("</div>", start)]


def _rows(page: str, group: str) -> list[tuple[str, str]]:
    """(class attribute, first cell) of each body row of a group's table."""
    start = page.index(f'id="table-{group}"')
    table = page[start : page.index("</table>", start)]
    return re.findall(r'<tr( class="drifted")?><td>([^<]*)</td>', table)


def test_drifted_property_is_in_the_banner_and_marked_in_its_table(drifted) -> None:
    summary, page = drifted
    assert summary["groups"]["properties"]["brightness"]["drifted"]  # the data does drift
    verdict = _section(page, "verdict")
    assert "DRIFT" in verdict and "properties/brightness" in verdict
    assert 'class="verdict drift"' in page
    rows = _rows(page, "properties")
    marked = {name for cls, name in rows if cls}
    assert marked == {n for n, r in summary["groups"]["properties"].items() if r["drifted"]}
    assert "brightness" in marked and "contrast" not in marked
    # worst first: the table's order is the statistic's, descending
    stats = [summary["groups"]["properties"][name]["statistic"] for _, name in rows]
    assert stats == sorted(stats, reverse=True) and len(rows) == len(PROPERTIES)


def test_clean_window_says_no_drift(reference, window) -> None:
    page = render_html(_summary(reference, window, drifted=False), reference, {})
    assert "no drift" in _section(page, "verdict")
    assert "DRIFT" not in page and 'class="verdict drift"' not in page
    assert "too few" not in page
    small = _summary(reference, window, drifted=False, enough_requests=False)
    assert "too few requests" in _section(render_html(small, reference, {}), "verdict")


@pytest.mark.parametrize(
    ("log", "bad"),
    [
        ({"logged": 10, "written": 9, "dropped": 0, "lost": 1, "errors": 1, "last_error": "x"}, 1),
        ({"logged": 10, "written": 10, "dropped": 3, "lost": 0, "errors": 0}, 1),
        ({"logged": 10, "written": 10, "dropped": 0, "lost": 0, "errors": 0}, 0),
    ],
)
def test_log_losses_are_highlighted(reference, window, log: dict, bad: int) -> None:
    page = render_html(_summary(reference, window, log=log), reference, {})
    box = _section(page, "log")
    assert box.startswith('id="log"')
    assert ('class="box bad" id="log"' in page) == bool(bad)
    assert ('<td class="bad">' in box) == bool(bad)
    if log.get("last_error"):
        assert "x</td>" in box


def test_one_png_per_plotted_column_and_one_for_class_share(reference, window, drifted) -> None:
    page = drifted[1]
    images = IMG.findall(page)
    assert len(images) == len(PROPERTIES) + len(EMB) + len(PRED) + 1
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data in images)
    assert len(page.encode()) < 1_000_000

    partial = {k: v for k, v in window.items() if k not in ("sharpness", "emb_3")}
    summary = _summary(reference, window)
    del summary["class_share"]
    assert len(IMG.findall(render_html(summary, reference, partial))) == len(images) - 3


def test_data_strings_are_escaped(reference, window) -> None:
    evil = "<script>alert(1)</script>"
    summary = _summary(
        reference,
        window,
        model={"name": evil, "version": "<b>3</b>", "alias": "a&b"},
        reasons=[f"properties/brightness {evil}"],
        log={"logged": 1, "written": 0, "dropped": 0, "lost": 1, "errors": 1, "last_error": evil},
        ood={"share": 0.5, "flagged": True, "count": 1, "properties": {evil: 1}},
        class_share={"window": {evil: 1.0}, "reference": {evil: 1.0}},
    )
    summary["groups"]["properties"][evil] = dict(summary["groups"]["properties"]["brightness"])
    page = render_html(summary, reference, {})
    assert "<script" not in page and "<b>3" not in page and "a&b" not in page
    assert "&lt;script&gt;" in page and "a&amp;b" in page


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a 0/0 density is a silent blank plot
def test_constant_columns_and_missing_groups_do_not_crash(reference, window) -> None:
    """Properties only (no embedding/predictions in reference or summary, no class share nor
    log); the window's width constant outside the reference, its height constant on the
    reference's constant value (every quantile tied)."""
    props_ref = {k: v for k, v in reference.items() if k not in ("embedding", "predictions")}
    props = {name: window[name].copy() for name in PROPERTIES}
    props["width"] = np.full(N, 7.0)
    summary = _summary(reference, window, drifted=False)
    summary["groups"] = {"properties": property_drift(props_ref, props)}
    del summary["class_share"], summary["log"], summary["ood"]
    page = render_html(summary, props_ref, props)
    assert len(IMG.findall(page)) == len(PROPERTIES)
    assert 'id="table-embedding"' not in page and "not reported" in _section(page, "log")


def test_reference_density_keeps_point_masses(reference) -> None:
    """Tied quantiles are point masses: drawn in the bin of the value they sit on (the bin the
    window's histogram uses for it), with the whole reference mass on the plot, neither
    divided by a zero-width span nor lost on an edge."""
    for name, values in (("height", np.full(5, 128.0)), ("size", np.arange(100.0, 104.0))):
        quantiles = np.asarray(reference["properties"][name]["quantiles"])
        edges = _bin_edges(values, quantiles)
        mass = _reference_density(reference, name, edges) * np.diff(edges)
        assert np.all(np.isfinite(mass))
        assert mass.sum() == pytest.approx(1.0)
        counts, _ = np.histogram(values, bins=edges)
        # nearly all the mass (the CDF interpolates 1% between tied runs) is where the values are
        assert mass[counts > 0].sum() > 0.95


def test_out_of_distribution_requests_are_listed_by_hash(reference, window) -> None:
    requests = [{"id": f"{i:064x}", "properties": ["saturation", "size"]} for i in range(25)]
    ood = {"share": 0.5, "flagged": True, "max_share": 0.1, "count": 25, "requests": requests}
    page = render_html(_summary(reference, window, ood=ood), reference, {})
    box = page[page.index('id="ood"') :]
    assert box.count("<code>") == 20 and "saturation, size" in box
    assert "and 5 more in summary.json" in box
