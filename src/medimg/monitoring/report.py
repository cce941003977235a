"""The HTML page `medimg monitor` writes for one window of a served model's requests.

A person deciding whether to retrain, roll back or ignore an alarm reads this page, not the
JSON summary: so the verdict comes first, then what could make the verdict untrustworthy (a
request log that lost records, out-of-distribution requests), then the per-column numbers,
then the pictures that show *how* a column moved (darker? blurrier? more confident?).

`render_html` is pure: summary, reference and window in, one self-contained HTML string out
(figures are embedded as base64 PNGs, so the page can be attached, mailed or logged as a
single artifact). matplotlib is imported only when rendering, so importing `medimg.monitoring`
stays cheap for the served model. Figures are drawn on `Figure` objects with an Agg canvas,
never through pyplot, as `medimg.analysis.plots` does (not imported from here: `analysis` and
`monitoring` are sibling layers) - headless, and no global figure registry to leak into.
Every string taken from the data goes through `html.escape`: model names, reasons and error
messages come from a registry and from exceptions, not from us.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from medimg.monitoring.drift import GROUPS, reference_cdf, reference_group

DPI = 80  # small PNGs: a 10 + 8 + 2 plot page stays well under 1 MB
BINS = 30
TABLE_HEAD = ("name", "KS statistic", "threshold", "p-value", "window mean", "ref. mean", "drifted")
RED, GREY = "#c62828", "#757575"

KEY = (
    "<p class=\"note\">Blue bars: the window's histogram; black line: the reference's density "
    "(from its stored quantiles). Red title: the column drifted.</p>"
)
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#212121;max-width:1100px}
.verdict{padding:.8em 1em;border-radius:6px;color:#fff;margin:1em 0}
.verdict.drift{background:#c62828}.verdict.ok{background:#2e7d32}
.verdict h2{margin:0}
.box{border:2px solid #bdbdbd;border-radius:6px;padding:.5em 1em;margin:1em 0}
.box.bad{border-color:#c62828;background:#ffebee}
td.bad{color:#c62828;font-weight:bold}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #e0e0e0;padding:.2em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}
tr.drifted{background:#ffcdd2;font-weight:bold}
.grid{display:grid;grid-template-columns:repeat(3,1fr);gap:.5em}  /* 3 plots a row */
.grid img{width:100%}
.note{color:#757575}
"""


def _e(value: Any) -> str:
    """Escaped text of any value from the data."""
    return html.escape(str(value))


def _fmt(value: Any, spec: str) -> str:
    """A number formatted with `spec`, or the escaped value itself when it is not a number
    (a summary written by another version may hold None or a string)."""
    try:
        return _e(format(float(value), spec))
    except (TypeError, ValueError):
        return "&ndash;" if value is None else _e(value)


def _bin_edges(window: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Common bins covering both the window and the whole reference, widened when both are
    one constant value (height of resized cells) so numpy gets a non-empty range."""
    lo = float(min(window.min(initial=np.inf), quantiles[0]))
    hi = float(max(window.max(initial=-np.inf), quantiles[-1]))
    if not hi > lo:
        pad = max(abs(lo) * 0.05, 0.5)
        lo, hi = lo - pad, hi + pad
    return np.linspace(lo, hi, BINS + 1)


def _reference_density(group: Mapping[str, Any], name: str, edges: np.ndarray) -> np.ndarray:
    """The reference's density over `edges`: its probability mass per bin over the bin width.

    The mass comes from the quantile CDF (`drift.reference_cdf`), not from levels over
    quantile gaps span by span: tied quantiles (integer or constant properties) are point
    masses with zero-width spans, which would divide by zero there and dwarf the window's
    histogram elsewhere; per bin they simply land in the bin that holds them. Bins are
    [a, b) but the last [a, b], as in `np.histogram`, so a point mass on an edge (128 on
    a constant height's middle edge) sits in the same bin as the window's values there."""
    cdf = reference_cdf(group, name, edges, left=True)
    cdf[-1] = reference_cdf(group, name, edges[-1:])[0]
    return np.diff(cdf) / np.diff(edges)


def _png(fig: Any, alt: str) -> str:
    """An `<img>` tag holding `fig` as a base64 PNG (the page must be one file)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _figure(width: float, height: float) -> Any:
    """A headless figure with fixed margins: constrained layout would double the drawing
    time of a page of twenty small plots, for axes whose labels barely vary."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.17, right=0.97, bottom=0.14, top=0.86)
    FigureCanvasAgg(fig)
    return fig


def _column_plot(group: Mapping[str, Any], name: str, values: np.ndarray, drifted: bool) -> str:
    """Window histogram (density, blue bars) over the reference density (black line), titled
    red when drifted; the key is printed once above the grid, not in every plot."""
    quantiles = np.asarray(group["properties"][name]["quantiles"], dtype=np.float64)
    edges = _bin_edges(values, quantiles)
    window_density, _ = np.histogram(values, bins=edges, density=True)
    fig = _figure(3.2, 2.2)
    ax = fig.add_subplot()
    ax.stairs(window_density, edges, fill=True, alpha=0.5, color="tab:blue")
    ax.stairs(_reference_density(group, name, edges), edges, color="black")
    ax.set_title(f"{name}{' (drifted)' if drifted else ''}", color=RED if drifted else "black")
    ax.tick_params(labelsize=7)
    return _png(fig, name)


def _class_share_plot(share: Mapping[str, Mapping[str, float]]) -> str:
    """Window vs reference share of each predicted class, side by side."""
    window, ref = share.get("window") or {}, share.get("reference") or {}
    classes = list(dict.fromkeys([*ref, *window]))
    x = np.arange(len(classes))
    fig = _figure(max(3.2, 1.0 + 0.9 * len(classes)), 2.4)
    ax = fig.add_subplot()
    ax.bar(x - 0.2, [float(ref.get(c, 0.0)) for c in classes], 0.4, color=GREY, label="reference")
    ax.bar(x + 0.2, [float(window.get(c, 0.0)) for c in classes], 0.4, label="window")
    ax.set_xticks(x, [str(c) for c in classes], fontsize=7)
    ax.set(ylabel="share", ylim=(0, 1), title="Predicted-class share")
    ax.legend(fontsize=6, loc="upper right")
    return _png(fig, "predicted-class share")


def _header(summary: Mapping[str, Any]) -> str:
    model, win = summary.get("model") or {}, summary.get("window") or {}
    name = f"{model.get('name', '?')} v{model.get('version', '?')}"
    alias = f" ({model['alias']})" if model.get("alias") else ""
    span = f"{win.get('start', '?')} \u2192 {win.get('end', '?')}"
    selector = f"{win['selector']}, " if win.get("selector") else ""
    return (
        f"<title>Monitoring: {_e(name + alias)}</title>"
        f"<style>{STYLE}</style></head><body>"
        f"<h1>Monitoring: {_e(name + alias)}</h1>"
        f"<p>Window: {_e(selector)}{_e(win.get('n', '?'))} requests, {_e(span)}</p>"
    )


def _verdict(summary: Mapping[str, Any]) -> str:
    """Red DRIFT with the reasons, or green no drift; a window too small to be judged
    (`enough_requests` false: never flagged) says so, or its green would read as a pass."""
    if not summary.get("drifted"):
        few = ""
        if summary.get("enough_requests") is False:
            limit = (summary.get("thresholds") or {}).get("min_requests", "?")
            few = f"<p>too few requests to judge: fewer than {_e(limit)}</p>"
        return f'<div class="verdict ok" id="verdict"><h2>no drift</h2>{few}</div>'
    reasons = "".join(f"<li>{_e(r)}</li>" for r in summary.get("reasons") or [])
    return f'<div class="verdict drift" id="verdict"><h2>DRIFT</h2><ul>{reasons}</ul></div>'


def _log_box(log: Mapping[str, Any] | None) -> str:
    """The request log's health: a window read from a log that lost records is a biased
    sample, so losses are shown in red next to the verdict, not buried."""
    if log is None:
        return '<div class="box" id="log"><h3>Request log</h3><p>not reported</p></div>'
    rows, bad_box = [], False
    for key in ("logged", "written", "dropped", "lost", "errors"):
        bad = key in ("dropped", "lost", "errors") and _float(log.get(key)) > 0
        bad_box |= bad
        cls = ' class="bad"' if bad else ""
        rows.append(f"<tr><th>{key}</th><td{cls}>{_e(log.get(key, '?'))}</td></tr>")
    if log.get("last_error"):
        rows.append(f'<tr><th>last error</th><td class="bad">{_e(log["last_error"])}</td></tr>')
    return (
        f'<div class="box{" bad" if bad_box else ""}" id="log"><h3>Request log</h3>'
        f"<table>{''.join(rows)}</table></div>"
    )


def _float(value: Any) -> float:
    """`value` as a float, NaN when it is not a number (compares false with anything)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _ood_box(ood: Mapping[str, Any] | None, thresholds: Mapping[str, Any]) -> str:
    if ood is None:
        return ""
    props = ood.get("properties") or {}  # name -> count, or just the names
    pairs = props.items() if isinstance(props, Mapping) else ((p, None) for p in props)
    which = ", ".join(_e(k) + ("" if v is None else f" ({_e(v)})") for k, v in pairs) or "none"
    limit = ood.get("max_share", thresholds.get("max_ood_share"))
    return (
        f'<div class="box{" bad" if ood.get("flagged") else ""}" id="ood">'
        f"<h3>Out-of-distribution requests</h3>"
        f"<p>{_fmt(ood.get('share'), '.1%')} of the window ({_e(ood.get('count', '?'))} "
        f"requests; alarm above {_fmt(limit, '.0%')}). Properties outside the reference "
        f"range: {which}.</p>{_ood_requests(ood.get('requests') or [])}</div>"
    )


OOD_LISTED = 20


def _ood_requests(requests: list[Mapping[str, Any]]) -> str:
    """The first flagged requests, by image hash (the request log's `sha256`), and why."""
    if not requests:
        return ""
    rows = "".join(
        f"<tr><td><code>{_e(str(r.get('id'))[:16])}</code></td>"
        f"<td>{_e(', '.join(r.get('properties') or []))}</td></tr>"
        for r in requests[:OOD_LISTED]
    )
    more = len(requests) - OOD_LISTED
    tail = f"<p>... and {more} more in summary.json.</p>" if more > 0 else ""
    return (
        "<table><tr><th>request (sha256)</th><th>outside the reference</th></tr>"
        f"{rows}</table>{tail}"
    )


def _limit(value: Any) -> str:
    """A threshold, or per-group thresholds ({group: value}) as "group value, ..."."""
    if isinstance(value, Mapping):
        return "(" + ", ".join(f"{_e(k)} {_e(v)}" for k, v in value.items()) + ")"
    return _e(value)


def _group_table(group: str, results: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per column, largest KS statistic first: the worst offenders on top."""

    def key(item: tuple[str, Mapping[str, Any]]) -> float:
        s = _float(item[1].get("statistic"))
        return -s if math.isfinite(s) else math.inf

    head = "".join(f"<th>{h}</th>" for h in TABLE_HEAD)
    rows = []
    for name, r in sorted(results.items(), key=key):
        drifted = bool(r.get("drifted"))
        cells = [
            _e(name),
            _fmt(r.get("statistic"), ".3f"),
            _fmt(r.get("threshold"), ".3f"),
            _fmt(r.get("p_value"), ".2g"),
            _fmt(r.get("window_mean"), ".4g"),
            _fmt(r.get("reference_mean"), ".4g"),
            "yes" if drifted else "no",
        ]
        row_class = ' class="drifted"' if drifted else ""
        rows.append(f"<tr{row_class}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (
        f'<h3>{_e(group)}</h3><table class="group" id="table-{_e(group)}">'
        f"<tr>{head}</tr>{''.join(rows)}</table>"
    )


def _figures(
    summary: Mapping[str, Any], reference: Mapping[str, Any], window: Mapping[str, np.ndarray]
) -> list[str]:
    """Per group, a grid of one plot per column present (with finite values) in both the
    window and the reference; a missing column or group is skipped, not an error."""
    out = []
    results = summary.get("groups") or {}
    for group in GROUPS:
        ref = reference_group(reference, group)
        if ref is None:
            continue
        plots = []
        for name in ref["properties"]:
            if name not in window:
                continue
            values = np.asarray(window[name], dtype=np.float64).ravel()
            values = values[np.isfinite(values)]
            if values.size:
                drifted = bool((results.get(group) or {}).get(name, {}).get("drifted"))
                plots.append(_column_plot(ref, name, values, drifted))
        if plots:
            out.append(f'<h3>{_e(group)}</h3><div class="grid">{"".join(plots)}</div>')
    return out


def render_html(
    summary: Mapping[str, Any], reference: Mapping[str, Any], window: Mapping[str, np.ndarray]
) -> str:
    """The monitoring page of one window: verdict, request-log health, OOD share, per-group
    KS tables, then window-vs-reference plots per column and the predicted-class share.

    `summary` is the monitor's JSON summary (`drift.check_window` plus model, window, log),
    `reference` the profile stored with the model (image properties at the top level,
    optional `embedding` and `predictions` groups of the same shape), `window` the window's
    columns. Optional parts absent from `summary` are left out of the page."""
    thresholds = summary.get("thresholds") or {}
    groups = summary.get("groups") or {}
    names = list(GROUPS) + [g for g in groups if g not in GROUPS]
    tables = [_group_table(g, groups[g]) for g in names if groups.get(g)]
    figures = _figures(summary, reference, window)
    share = summary.get("class_share")
    if share:
        plot = _class_share_plot(share)
        figures.append(f'<h3>predicted classes</h3><div class="grid">{plot}</div>')
    limits = ", ".join(f"{_e(k)} = {_limit(v)}" for k, v in thresholds.items())
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        _header(summary),
        _verdict(summary),
        _log_box(summary.get("log")),
        _ood_box(summary.get("ood"), thresholds),
        "<h2>Drift per column</h2>",
        f'<p class="note">{limits}</p>' if limits else "",
        *tables,
        "<h2>Window vs reference</h2>" if figures else "",
        KEY if figures else "",
        *figures,
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)
