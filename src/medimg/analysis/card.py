"""The model card of a registered version, built only from what its run already recorded.

Pure (no MLflow, no files): `medimg.tracking.card_sources` reads the run (params, metrics,
tags, eval/details.json, eval/summary.json, and the slice and patient-level results when the
evaluate stage wrote them) into a `CardSources`; `build_card` turns it into a dict shaped like
the Model Card Toolkit's schema (model_details, model_parameters, quantitative_analysis,
considerations), `card_markdown` into the page people read. Nothing is re-measured, so the
card says exactly what the gate and the registry saw; what a run lacks is left empty and
`missing_required` names it, and promotion refuses such a version (a card that cannot say what
data or code made the model, or what it is for, is not one to serve).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medimg.config import CardConfig

SCHEMA = "medimg.model_card/1"
# Dotted paths that must be non-empty for promotion; the refusal names the first ones missing.
REQUIRED = (
    "model_details.name",
    "model_details.version",
    "model_details.architecture",
    "model_details.git_commit",
    "model_parameters.data.fingerprint",
    "quantitative_analysis.at_0_5.accuracy",
    "considerations.intended_use",
    "considerations.out_of_scope",
)
HEADLINE = ("accuracy", "sensitivity", "specificity", "roc_auc", "pr_auc", "f1", "mcc", "brier")
ARTIFACTS = ("details", "summary", "slices", "patient_level")  # what card_sources may find


@dataclass(frozen=True)
class CardSources:
    """What one registered version's run recorded; every field may be empty."""

    name: str
    version: str
    run_id: str = ""
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)  # run tags, then the version's
    artifacts: Mapping[str, Any] = field(default_factory=dict)  # ARTIFACTS, parsed JSON
    artifact_names: tuple[str, ...] = ()
    split: Mapping[str, Any] | None = None  # data/split/classes.json when it is this split
    created: str = ""
    registered_by: str = ""


def _first(*values: Any) -> Any:
    """The first value that is not None or empty: a run may record a number in several
    places (details.json, summary.json, a tag, a param), older runs in fewer."""
    for value in values:
        if value not in (None, "", [], {}):
            return value
    return None


def _num(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    number = _num(value)
    return None if number is None else int(number)


def _metric(value: Any, ci: Any) -> dict[str, Any] | None:
    """{'value', 'ci'} with ci [low, high] or None; None when there is no value."""
    value = _num(value)
    if value is None:
        return None
    if isinstance(ci, Mapping):
        ci = [ci.get("low"), ci.get("high")]
    ok = isinstance(ci, list | tuple) and len(ci) == 2 and None not in ci
    return {"value": value, "ci": [float(ci[0]), float(ci[1])] if ok else None}


def _at_half(src: CardSources) -> dict[str, Any]:
    """Test metrics at the 0.5 threshold with their patient-bootstrap CIs."""
    details, summary = src.artifacts.get("details") or {}, src.artifacts.get("summary") or {}
    cis, m = details.get("ci") or {}, src.metrics
    half = details.get("at_0.5")  # since issue 18: the headline (and CIs) are at the served
    if half is not None:  # threshold, the 0.5 rates (no CIs) under at_0.5
        details, summary, cis, m = {**details, **half}, {}, {"roc_auc": cis.get("roc_auc")}, {}
    out = {}
    for name in (*HEADLINE, "ece"):
        value = _first(details.get(name), summary.get(name), m.get(f"test_{name}"))
        low, high = m.get(f"test_{name}_ci_low"), m.get(f"test_{name}_ci_high")
        ci = _first(cis.get(name), summary.get(f"{name}_ci"), [low, high] if low else None)
        found = _metric(value, ci)
        if found is not None:
            out[name] = found
    return out


def _served(src: CardSources) -> dict[str, Any]:
    """The operating point the served model uses, its rule and its test metrics."""
    point = (src.artifacts.get("details") or {}).get("operating_point") or {}
    threshold = _num(_first(point.get("threshold"), src.tags.get("operating_threshold")))
    if threshold is None:
        return {}
    details = src.artifacts.get("details") or {}
    cis = point.get("ci") or (details.get("ci") if "at_0.5" in details else None) or {}
    metrics = {k: _metric(point.get(k), cis.get(k)) for k in HEADLINE}
    return {
        "threshold": threshold,
        "rule": point.get("rule"),
        "target_sensitivity": point.get("target_sensitivity"),
        "chosen_on": point.get("chosen_on"),
        "metrics": {k: v for k, v in metrics.items() if v is not None},
    }


def _slices(raw: Any, floors: Mapping[str, float | None]) -> list[dict[str, Any]]:
    """Slice results (evaluate's slices.json: {'slices': [{name, images, patients, too_small,
    metrics, ci}]}; a bare list or {name: result} too) as {name, n, patients, too_small,
    accuracy, under}; `under` lists the gated (not too small) metrics below `floors`
    (`gate.slices.min_*`)."""
    items = raw.get("slices") if isinstance(raw, Mapping) and "slices" in raw else raw
    if isinstance(items, Mapping):
        items = [{"name": k, **v} for k, v in items.items() if isinstance(v, Mapping)]
    out = []
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, Mapping):
            continue
        metrics = item.get("metrics") if isinstance(item.get("metrics"), Mapping) else item
        cis = item.get("ci") if isinstance(item.get("ci"), Mapping) else {}
        too_small = bool(item.get("too_small"))
        under = [
            f"{m} {_f(_num(metrics.get(m)))} < {floor}"
            for m, floor in floors.items()
            if floor is not None
            and not too_small
            and _num(metrics.get(m)) is not None
            and _num(metrics.get(m)) < floor
        ]
        acc_ci = _first(cis.get("accuracy"), item.get("accuracy_ci"))
        out.append(
            {
                "name": str(_first(item.get("name"), item.get("slice"), "?")),
                "n": _int(_first(item.get("images"), item.get("n"))),
                "patients": _int(item.get("patients")),
                "too_small": too_small,
                "accuracy": _metric(metrics.get("accuracy"), acc_ci),
                "under": under,
            }
        )
    return out


def _patient_level(raw: Any) -> dict[str, Any]:
    """Patient-level results as they were recorded: numbers and [low, high] intervals only."""
    if not isinstance(raw, Mapping):
        return {}
    keep = {}
    for key, value in raw.items():
        if isinstance(value, bool | int | float | str):
            keep[key] = value
        elif isinstance(value, list | tuple) and len(value) == 2:
            keep[key] = list(value)
        elif isinstance(value, Mapping) and "value" in value:
            keep[key] = dict(value)
    return keep


def _data(src: CardSources) -> dict[str, Any]:
    split = src.split or {}
    fingerprint = _first(src.tags.get("dataset_fingerprint"), src.tags.get("eval_fingerprint"))
    if split.get("fingerprint") not in (None, fingerprint):
        split = {}  # another split's counts would describe other patients
    fingerprint = _first(fingerprint, split.get("fingerprint"))
    names = ("train", "val", "test")
    per_split = {
        s: {
            "patients": (split.get("patients") or {}).get(s),
            "images": (split.get("images") or {}).get(s),
        }
        for s in names
    }
    return {
        "dataset": _first(src.tags.get("dataset"), src.params.get("dataset.name")),
        "fingerprint": fingerprint,
        "split_strategy": src.params.get("split.strategy"),
        "classes": list(split.get("classes") or []),
        "positive_class": split.get("positive_class"),
        "splits": per_split if split else {},
    }


def _limitations(
    qa: dict[str, Any], slices: list[dict[str, Any]], cfg: CardConfig, has_patients: bool
) -> list[str]:
    """Generated from the numbers: slices under their floor, small slices, wide CIs, and what
    was not measured at all."""
    out = []
    for s in slices:
        if s["under"]:
            out.append(f"slice {s['name']}: under the gate's floor: {'; '.join(s['under'])}")
        if s["too_small"] or (s["n"] is not None and s["n"] < cfg.small_slice):
            out.append(
                f"slice {s['name']}: only {s['n']} test images (< {cfg.small_slice}); its "
                "numbers are anecdotal"
            )
    groups = [("at 0.5", qa["at_0_5"]), ("at the served threshold", qa["served"].get("metrics"))]
    for label, metrics in groups:
        for name, m in (metrics or {}).items():
            if m["ci"] and m["ci"][1] - m["ci"][0] > cfg.wide_ci:
                width = m["ci"][1] - m["ci"][0]
                out.append(
                    f"{name} {label}: 95% CI [{_f(m['ci'][0])}, {_f(m['ci'][1])}] is "
                    f"{width:.3f} wide (> {cfg.wide_ci}); the test set is too small to pin it"
                )
    if not slices:
        out.append("no slice results were recorded: performance on subgroups is unknown")
    if not has_patients:
        out.append("no patient-level results were recorded: figures are per image")
    return out


def _count(src: CardSources, key: str) -> int | None:
    """A size or count: summary.json, else the evaluate stage's tag, else the train param."""
    summary = src.artifacts.get("summary") or {}
    return _int(_first(summary.get(key), src.tags.get(f"test_{key}"), src.params.get(key)))


def build_card(
    src: CardSources, cfg: CardConfig, floors: Mapping[str, float | None] | None = None
) -> dict[str, Any]:
    """The card as a Model-Card-Toolkit-like dict (JSON-ready); `floors`: the slice gate's
    per-slice floors ({'accuracy': 0.8, ...}) that limitations compare each slice with."""
    details, summary = src.artifacts.get("details") or {}, src.artifacts.get("summary") or {}
    tags, params = src.tags, src.params
    calibration = details.get("calibration") or {}
    slices = _slices(src.artifacts.get("slices"), floors or {})
    patients = _patient_level(
        _first(
            src.artifacts.get("patient_level"),
            details.get("patient_level"),
            summary.get("patient_level"),
        )
    )
    qa = {
        "at_0_5": _at_half(src),
        "served": _served(src),
        "calibration": {
            "temperature": _num(_first(calibration.get("temperature"), summary.get("temperature"))),
            "ece_before": _num(_first(calibration.get("ece_before"), summary.get("ece_before"))),
            "ece_after": _num(_first(calibration.get("ece_after"), summary.get("ece"))),
        },
        "slices": slices,
        "patient_level": patients,
        "graphics": sorted(n for n in src.artifact_names if "gradcam" in n.lower()),
    }
    arch = _first(tags.get("architecture"), details.get("architecture"))
    return {
        "schema": SCHEMA,
        "model_details": {
            "name": src.name,
            "version": src.version,
            "architecture": arch,
            "params_count": _count(src, "params"),
            "size_bytes": _count(src, "keras_bytes"),
            "created": src.created,
            "registered_by": src.registered_by,
            "git_commit": tags.get("git_commit"),
            "run_id": src.run_id,
        },
        "model_parameters": {
            "architecture": arch,
            "image_size": _int(_first(params.get("plan.image_size"), tags.get("image_size"))),
            "epochs": _int(params.get("train.epochs")),
            "data": _data(src),
        },
        "quantitative_analysis": qa,
        "considerations": {
            "intended_use": cfg.intended_use.strip(),
            "out_of_scope": cfg.out_of_scope.strip(),
            "users": cfg.users.strip(),
            "ethical_considerations": cfg.ethical_considerations.strip(),
            "limitations": _limitations(qa, slices, cfg, bool(patients)),
        },
    }


def missing_required(card: Mapping[str, Any]) -> list[str]:
    """The REQUIRED dotted fields that are absent or empty, in REQUIRED's order."""
    missing = []
    for path in REQUIRED:
        node: Any = card
        for part in path.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node in (None, "", [], {}) or (isinstance(node, str) and not node.strip()):
            missing.append(path)
    return missing


def _f(value: Any, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def _metric_cell(m: Mapping[str, Any] | None) -> str:
    if not m:
        return "–"
    ci = f" [{_f(m['ci'][0])}, {_f(m['ci'][1])}]" if m.get("ci") else ""
    return f"{_f(m['value'])}{ci}"


def summary_markdown(card: Mapping[str, Any], link: str = "") -> str:
    """A few lines for the registered version's description (MLflow renders it as markdown)."""
    md, qa = card["model_details"], card["quantitative_analysis"]
    served = qa["served"]
    at_served = served.get("metrics") or {}
    rates = ", ".join(
        f"{name} {_metric_cell(at_served.get(name))}"
        for name in ("accuracy", "sensitivity", "specificity")
    )
    lines = [
        f"**{md['name']} v{md['version']}** ({md['architecture']}), registered by "
        f"{md['registered_by'] or '?'} on {md['created'] or '?'}",
        "",
        f"- test at the served threshold {_f(served.get('threshold'))} "
        f"({served.get('rule') or '–'}): {rates}",
        f"- test accuracy at 0.5 (not the served decision): "
        f"{_metric_cell(qa['at_0_5'].get('accuracy'))}",
        f"- data: {card['model_parameters']['data']['fingerprint']}, commit {md['git_commit']}",
        f"- intended use: {card['considerations']['intended_use']}",
        f"- limitations: {len(card['considerations']['limitations'])} (see the card)",
    ]
    if link:
        lines.append(f"- model card: {link}")
    return "\n".join(lines)


def card_markdown(card: Mapping[str, Any]) -> str:
    """The whole card as a markdown page."""
    md, mp, qa = card["model_details"], card["model_parameters"], card["quantitative_analysis"]
    cons, data = card["considerations"], mp["data"]
    out = [f"# Model card: {md['name']} v{md['version']}", "", "## Model details", ""]
    for key in ("architecture", "params_count", "size_bytes", "created", "registered_by",
                "git_commit", "run_id"):  # fmt: skip
        out.append(f"- {key.replace('_', ' ')}: {_first(md.get(key), '–')}")
    out += ["", "## Intended use", "", cons["intended_use"] or "–", ""]
    out += ["## Out of scope", "", cons["out_of_scope"] or "–", "", f"Users: {cons['users']}", ""]
    out += ["## Training and evaluation data", ""]
    out.append(f"- dataset: {data['dataset'] or '–'}, split {data['split_strategy'] or '–'}")
    out.append(f"- data hash (split fingerprint): {data['fingerprint'] or '–'}")
    out.append(f"- classes: {', '.join(data['classes']) or '–'} (positive: "
               f"{data['positive_class'] or '–'})")  # fmt: skip
    if data["splits"]:
        out += ["", "| split | patients | images |", "|---|---|---|"]
        for name in ("train", "val", "test"):
            s = data["splits"].get(name) or {"patients": None, "images": None}
            out.append(f"| {name} | {_first(s['patients'], '–')} | {_first(s['images'], '–')} |")
    served = qa["served"]
    out += ["", "## Metrics (test, 95% patient-bootstrap CI)", ""]
    out += ["| metric | at 0.5 | at the served threshold |", "|---|---|---|"]
    for name in (*HEADLINE, "ece"):
        half, at = qa["at_0_5"].get(name), (served.get("metrics") or {}).get(name)
        if half or at:
            out.append(f"| {name} | {_metric_cell(half)} | {_metric_cell(at)} |")
    out += ["", "## Operating threshold", ""]
    if served:
        out.append(
            f"Served threshold {_f(served['threshold'])}: rule {served.get('rule') or '–'}, "
            f"target sensitivity {_first(served.get('target_sensitivity'), '–')}, chosen on "
            f"{served.get('chosen_on') or '–'}."
        )
    else:
        out.append("No operating threshold recorded: the served model uses 0.5.")
    cal = qa["calibration"]
    out += ["", "## Calibration", ""]
    out.append(f"ECE before {_f(cal['ece_before'])}, after {_f(cal['ece_after'])} "
               f"(temperature {_f(cal['temperature'], '.3f')}).")  # fmt: skip
    out += ["", "## Slices", ""]
    if qa["slices"]:
        out += ["| slice | images | patients | accuracy [95% CI] | note |", "|---|---|---|---|---|"]
        for s in qa["slices"]:
            note = "; ".join(s["under"]) or ("too small" if s["too_small"] else "")
            out.append(f"| {s['name']} | {_first(s['n'], '–')} | {_first(s['patients'], '–')} "
                       f"| {_metric_cell(s['accuracy'])} | {note} |")  # fmt: skip
    else:
        out.append("Not recorded.")
    out += ["", "## Patient-level results", ""]
    out += [f"- {k}: {v}" for k, v in qa["patient_level"].items()] or ["Not recorded."]
    out += ["", "## Grad-CAM examples", ""]
    out += [f"- {name}" for name in qa["graphics"]] or ["None recorded."]
    out += ["", "## Limitations", ""]
    out += [f"- {item}" for item in cons["limitations"]] or ["None found."]
    out += ["", "## Ethical considerations", "", cons["ethical_considerations"] or "–", ""]
    return "\n".join(out)
