"""The promotion gate and promotion: champion, challenger and previous as MLflow aliases.

`gate_decision` judges the best architecture (by `register.metric`) against the current
champion, reading the registry only: absolute floors (accuracy, optionally sensitivity and
specificity), no regression beyond `gate.max_regression`, and, when both were tested on the
same split (same fingerprint), McNemar's test on their paired predictions must not show the
candidate significantly worse. `promote` acts on a passed decision: a new version of
`<dataset>-classifier` takes `champion` (and `challenger`), the old one `previous`; a refused
candidate is not registered and no alias moves. The register stage promotes only where
`promotion_allowed` says so; `medimg promote` (CI) always acts; `medimg gate` re-checks a
recorded decision and `medimg rollback` undoes a promotion.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd

from medimg import governance, tracking
from medimg.analysis.slices import gate_slices, with_slice_checks, worst_markdown
from medimg.config import GateConfig, Params, SelectionMetric
from medimg.errors import DataError
from medimg.io import read_json, write_json, write_text

GATED = ("accuracy", "sensitivity", "specificity")


def load_reports(params: Params) -> dict[str, dict[str, Any]]:
    """Every architecture's headline numbers, as the evaluate stage left them."""
    reports = {}
    for arch in params.train.architectures:
        path = params.paths.eval_reports(arch) / "summary.json"
        if not path.exists():
            raise DataError(f"{path}: missing; run `dvc repro evaluate` first")
        reports[arch] = read_json(path)
    return reports


def rank(reports: dict[str, dict[str, Any]], metric: SelectionMetric | str) -> list[str]:
    """Best first by `metric` in its own direction (highest accuracy, lowest ECE or Brier
    score); ties go to the smaller model (the edge goal)."""
    metric = SelectionMetric(metric)
    for arch, rep in reports.items():
        if rep.get(metric) is None:
            raise DataError(
                f"register.metric: {metric.value!r} is not in reports/eval/{arch}/summary.json"
            )
    sign = 1 if metric.lower_is_better else -1
    return sorted(reports, key=lambda a: (sign * reports[a][metric], reports[a].get("params") or 0))


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "–" if value is None else format(value, spec)


def _mb(size: int | None) -> float | None:
    return None if size is None else size / 1e6


def compare_markdown(reports: dict[str, dict[str, Any]], order: list[str], metric: str) -> str:
    """The comparison table of every architecture, sorted by the selection metric."""
    head = (
        "| # | architecture | threshold | accuracy [95% CI] | sensitivity | specificity "
        "| accuracy / sens / spec at 0.5 | ROC AUC | ECE "
        "| params | .keras MB | int8 MB | int8 acc at 0.5 | Keras img/s | int8 img/s (1 thread) |"
    )
    lines = [f"# Architecture comparison (sorted by test {metric})", "", head, "|" + "---|" * 15]
    for i, arch in enumerate(order, 1):
        r = reports[arch]
        lo, hi = r.get("accuracy_ci", [None, None])
        lines.append(
            f"| {i} | {arch} | {_fmt(r.get('threshold'))} "
            f"| {_fmt(r['accuracy'])} [{_fmt(lo)}, {_fmt(hi)}] "
            f"| {_fmt(r.get('sensitivity'))} | {_fmt(r.get('specificity'))} | {_at_half(r)} "
            f"| {_fmt(r.get('roc_auc'))} | {_fmt(r.get('ece'))} | {_fmt(r.get('params'), ',')} "
            f"| {_fmt(_mb(r.get('keras_bytes')), '.2f')} | {_fmt(_mb(r.get('int8_bytes')), '.3f')} "
            f"| {_fmt(r.get('int8_accuracy'))} | {_fmt(r.get('keras_cpu_images_per_s'), '.0f')} "
            f"| {_fmt(r.get('int8_images_per_s_1thread'), '.0f')} |"
        )
    lines += [
        "",
        "Accuracy, sensitivity and specificity are at `threshold`, the operating threshold "
        "chosen on validation that the served model and `medimg predict` apply (the gate "
        "judges them); the 0.5 column is for comparison only. Accuracy intervals: "
        "patient-level bootstrap at that threshold.",
        "",
    ]
    return "\n".join(lines)


def _at_half(report: dict[str, Any]) -> str:
    """`acc / sens / spec` at 0.5, or – (multi-class: argmax, no threshold)."""
    values = [report.get(f"{k}_at_0.5") for k in GATED]
    return "–" if all(v is None for v in values) else " / ".join(_fmt(v) for v in values)


def paired_test(candidate_csv: Path, champion_csv: Path | None) -> dict[str, Any] | None:
    """McNemar on the images both models predicted (joined by path), or None."""
    from medimg.analysis.stats import mcnemar

    if champion_csv is None or not champion_csv.exists():
        return None
    a = pd.read_csv(champion_csv)[["path", "correct"]]
    b = pd.read_csv(candidate_csv)[["path", "correct"]]
    both = a.merge(b, on="path", suffixes=("_champion", "_candidate"))
    if both.empty:
        return None
    result = mcnemar(both["correct_champion"].to_numpy(), both["correct_candidate"].to_numpy())
    return {**result, "n": len(both)}


def decide(
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    paired: dict[str, Any] | None,
    cfg: GateConfig,
) -> dict[str, Any]:
    """Pure: the gate's verdict, every check with its numbers and a reason per failure."""
    floors = {
        "accuracy": cfg.min_accuracy,
        "sensitivity": cfg.min_sensitivity,
        "specificity": cfg.min_specificity,
    }
    checks, reasons = [], []
    for name, floor in floors.items():
        if floor is None:
            continue
        value = candidate.get(name)
        ok = value is not None and value >= floor
        checks.append({"check": f"min_{name}", "value": value, "bound": floor, "passed": ok})
        if not ok:
            at = _served_at(candidate)
            reasons.append(f"test {name} {_fmt(value)}{at} is below gate.min_{name} {floor}")
    if champion is not None:
        drop = champion["accuracy"] - candidate["accuracy"]
        ok = drop <= cfg.max_regression
        checks.append(
            {
                "check": "max_regression",
                "value": drop,
                "bound": cfg.max_regression,
                "passed": ok,
                "champion_accuracy": champion["accuracy"],
            }
        )
        if not ok:
            reasons.append(
                f"accuracy {candidate['accuracy']:.4f} is {drop:.4f} below the "
                f"champion's {champion['accuracy']:.4f} (gate.max_regression "
                f"{cfg.max_regression})"
            )
    if paired is not None:
        worse = paired["b10"] > paired["b01"]  # champion right & candidate wrong dominates
        ok = not (worse and paired["p_value"] < cfg.alpha)
        checks.append(
            {
                "check": "mcnemar",
                "p_value": paired["p_value"],
                "bound": cfg.alpha,
                "b01": paired["b01"],
                "b10": paired["b10"],
                "passed": ok,
            }
        )
        if not ok:
            reasons.append(
                f"McNemar: candidate significantly worse than the champion on the "
                f"same test images (p={paired['p_value']:.4g} < gate.alpha {cfg.alpha})"
            )
    return {"passed": not reasons, "checks": checks, "reasons": reasons}


def _served_at(report: dict[str, Any]) -> str:
    """` at the served threshold 0.0690` where the report has one (binary), else ``."""
    t = report.get("threshold")
    return "" if t is None else f" at the served threshold {t:.4f}"


def _champion_state(name: str, fingerprint: str, tmp: Path) -> tuple[dict | None, Path | None]:
    """The current champion's recorded test metrics and, on the same split, its predictions."""
    champ = tracking.version_by_alias(name, "champion")
    if champ is None:
        return None, None
    tags = champ["tags"]
    state = {
        "version": champ["version"],
        "run_id": champ["run_id"],
        "accuracy": float(tags.get("test_accuracy", "nan")),
        "fingerprint": tags.get("dataset_fingerprint"),
        "architecture": tags.get("architecture"),
    }
    same_split = state["fingerprint"] == fingerprint
    artifact = f"eval/{state['architecture']}.predictions.csv"
    csv = tracking.download_run_artifact(champ["run_id"], artifact, tmp) if same_split else None
    state["same_split"] = same_split
    return state, csv


def _version_tags(params: Params, arch: str, report: dict[str, Any]) -> dict:
    """What `medimg gate` and `medimg predict` read back: test figures and the threshold
    chosen on validation for `evaluate.target_sensitivity`."""
    tags: dict[str, Any] = {"architecture": arch}
    tested = (*GATED, "roc_auc", *(f"{k}_at_0.5" for k in GATED))  # headline: served threshold
    tags |= {f"test_{k}": report[k] for k in tested if report.get(k) is not None}
    details = params.paths.eval_reports(arch) / "details.json"
    if details.exists():
        found = read_json(details)
        point, patient = found.get("operating_point"), found.get("patient_level")
        if point:
            tags["operating_threshold"] = point["threshold"]
        if patient:
            tags["patient_threshold"] = patient["patient_threshold"]
    return tags


def promotion_allowed(params: Params) -> tuple[bool, str]:
    """Whether the register stage itself may promote, and why (not).

    `register.promote: local` (the single-user default): yes on a local store (SQLite), so a
    newcomer's `dvc repro` ends with a champion; never inside a DVC experiment, nor against a
    shared server, where promotion is `medimg promote`, run by CI. `never`: only the decision.
    """
    uri = tracking.tracking_uri(params.mlflow)
    if params.register_cfg.promote == "never":
        return False, "register.promote is never: promotion is `medimg promote`"
    if os.environ.get("DVC_EXP_NAME"):
        return False, f"DVC experiment {os.environ['DVC_EXP_NAME']}: experiments do not promote"
    if not tracking.is_local_store(uri):
        return False, f"shared tracking server {uri}: promotion is `medimg promote` (CI)"
    return True, f"local store {uri} (register.promote: local)"


def _slices(params: Params, arch: str) -> dict[str, Any] | None:
    path = params.paths.eval_reports(arch) / "slices.json"
    return read_json(path) if path.exists() else None


def with_slice_gate(params: Params, arch: str, champion: dict | None, verdict: dict) -> dict:
    """The verdict plus the slice checks (`medimg.analysis.slices.gate_slices`): the
    candidate's slices.json against the champion's, read from its run when both were
    tested on the same split (other splits have other slices)."""
    theirs = None
    if champion is not None and champion.get("same_split"):
        theirs = tracking.read_run_json(champion["run_id"], "eval/slices.json")
    cfg = params.gate
    return with_slice_checks(
        verdict, gate_slices(_slices(params, arch), theirs, cfg.slices, cfg.max_regression)
    )


def gate_decision(params: Params, reports: dict, order: list[str]) -> dict[str, Any]:
    """The gate's verdict on the best architecture against the current champion; read-only.

    Reads the registry (the champion, its predictions) but writes nothing to it.
    """
    paths, metric = params.paths, params.register_cfg.metric
    best = order[0]
    fingerprint = read_json(paths.classes_json)["fingerprint"]
    run_info = read_json(paths.eval_reports(best) / "run.json")
    name = params.register_cfg.registered_name(params.dataset.name)
    tracking.configure(params.mlflow, params.dataset.name)
    with tempfile.TemporaryDirectory() as tmp:
        champion, champ_csv = _champion_state(name, fingerprint, Path(tmp))
        paired = paired_test(paths.eval_predictions(best), champ_csv)
    return {
        "model_name": name,
        "candidate": {
            "architecture": best,
            "version": None,
            "run_id": run_info["run_id"],
            "model_uri": run_info["model_uri"],
            **_gated(reports[best]),
        },
        "fingerprint": fingerprint,
        "selection_metric": metric,
        "ranking": order,
        "champion_before": champion,
        "paired_test": paired,
        "gate": params.gate.model_dump(),
        **with_slice_gate(
            params, best, champion, decide(reports[best], champion, paired, params.gate)
        ),
        "promoted": False,
        "champion_after": champion,
    }


def promote(params: Params, record: dict[str, Any], reports: dict) -> dict[str, Any]:
    """Act on a passed decision: register the candidate, `previous` ← the old champion,
    `champion` (and `challenger`) ← the new version. A refused candidate changes nothing.
    A candidate whose model card lacks a required field is refused too; every outcome is
    written to the audit trail, the card to the new version (`medimg.governance`)."""
    name, cand = record["model_name"], record["candidate"]
    tags = {}
    if record["passed"]:
        tags = _version_tags(params, cand["architecture"], reports[cand["architecture"]])
        tags |= {"dataset_fingerprint": record["fingerprint"], "gate_passed": True}
        tags["registered_by"] = governance.actor()
        record = governance.check_card(params, record, tags)
    if not record["passed"]:
        governance.audit_decision(params, record, "refuse")
        return record
    version = tracking.register_version(cand["model_uri"], name, tags)
    governance.publish_card(params, name, version, cand)
    tracking.set_alias(name, "challenger", version)
    champion = record["champion_before"]
    if champion is not None and champion["version"] != version:
        tracking.set_alias(name, "previous", champion["version"])
    tracking.set_alias(name, "champion", version)
    record = record | {
        "candidate": {**cand, "version": version},
        "promoted": True,
        "champion_after": tracking.version_by_alias(name, "champion"),
    }
    governance.audit_decision(params, record, "promote")
    return record


def _gated(report: dict[str, Any]) -> dict[str, Any]:
    """The candidate's gated numbers: at its served threshold, with accuracy at 0.5 beside."""
    return {k: report.get(k) for k in (*GATED, "roc_auc", "threshold", "accuracy_at_0.5")}


def write_comparison(
    params: Params, reports: dict, order: list[str], metric: str, gate_text: str = ""
) -> None:
    """`reports/compare.md` (the table, then the gate's verdict) and `compare.png`."""
    from medimg.analysis.plots import plot_comparison, save_figure

    reports_dir = Path(params.paths.reports)
    text = compare_markdown(reports, order, metric)
    slices = {a: s for a in order if (s := _slices(params, a)) is not None}
    text += f"\n{worst_markdown(slices)}" if slices else ""
    text += f"\n## Gate\n\n{gate_text}\n" if gate_text else ""
    write_text(reports_dir / "compare.md", text)
    cis = {
        a: {
            "point": reports[a]["accuracy"],
            "low": reports[a]["accuracy_ci"][0],
            "high": reports[a]["accuracy_ci"][1],
        }
        for a in order
    }
    save_figure(plot_comparison(cis, metric="accuracy"), reports_dir / "compare.png")


def reason_paragraph(promotion: dict[str, Any]) -> str:
    c = promotion["candidate"]
    label = f"v{c['version']}" if c.get("version") else f"candidate run {c['run_id'][:8]}"
    head = (
        f"{promotion['model_name']} {label} ({c['architecture']}, test accuracy "
        f"{_fmt(c['accuracy'])}, sensitivity {_fmt(c['sensitivity'])}, specificity "
        f"{_fmt(c['specificity'])}{_served_at(c)})"
    )
    before = promotion.get("champion_before")
    vs = (
        f" against champion v{before['version']} ({_fmt(before['accuracy'])})"
        if before
        else " with no previous champion"
    )
    why = promotion.get("not_promoted_because")
    if promotion["passed"] and promotion.get("promoted"):
        return f"PASS: {head} passed every gate check{vs} and is the champion."
    if promotion["passed"]:
        return f"WOULD PASS: {head} passes every gate check{vs}; not promoted: {why}."
    verb = "would fail" if why else "did not pass"
    return (
        f"FAIL: {head} {verb} the gate{vs}: "
        + "; ".join(promotion["reasons"])
        + (". Nothing was registered and no alias moved.")
    )


def gate_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The few numbers of a decision that `dvc exp show` compares across experiments."""
    champion, paired = record.get("champion_before") or {}, record.get("paired_test") or {}
    after = record.get("champion_after") or {}
    return {
        "passed": bool(record["passed"]),
        "promoted": bool(record.get("promoted")),
        "candidate_accuracy": record["candidate"].get("accuracy"),
        "champion_accuracy": champion.get("accuracy"),
        "champion_version": int(after["version"]) if after.get("version") else None,
        "mcnemar_p": paired.get("p_value"),
    }


def write_decision(params: Params, record: dict[str, Any]) -> None:
    """The whole record (`promotion.json`) and its DVC metrics (`gate.json`)."""
    write_json(params.paths.promotion, record)
    write_json(Path(params.paths.reports) / "gate.json", gate_summary(record))
