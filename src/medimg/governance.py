"""Governance around promotion: the model card a version must carry and the audit trail of
every registration, promotion, refusal and rollback.

Promotion (`medimg.promotion.promote`) and `medimg rollback` call these few functions, so the
gate's own logic stays as it was; the storage is `medimg.tracking.audit` (records as tags of the
registered model: only `ci` and admins may write them on the team server) and
`medimg.tracking.model_card` (the card beside the version's run, its digest and summary on the
version). The card is built by the pure `medimg.analysis.card`.
"""

from __future__ import annotations

from typing import Any

from medimg import tracking
from medimg.analysis.card import (
    CardSources,
    build_card,
    card_markdown,
    missing_required,
    summary_markdown,
)
from medimg.config import Params
from medimg.io import read_json
from medimg.tracking import audit, model_card

PENDING = "(next)"  # the version a card checked before registration will get


def actor() -> str:
    return audit.actor()


def _local_reports(params: Params, arch: str | None) -> dict[str, Any]:
    """details.json/summary.json as the evaluate stage left them in this checkout: the same
    files it logged, read locally when a run lacks them (a run logged by hand, or older)."""
    found: dict[str, Any] = {}
    if not arch:
        return found
    folder = params.paths.eval_reports(arch)
    for role in ("details", "summary"):
        path = folder / f"{role}.json"
        if path.exists():
            found[role] = read_json(path)
    return found


def _split(params: Params) -> dict[str, Any] | None:
    path = params.paths.classes_json
    return read_json(path) if path.exists() else None


def card_for(
    params: Params,
    name: str,
    version: str,
    run_id: str,
    *,
    version_tags: dict[str, Any] | None = None,
    created: str = "",
    registered_by: str = "",
    local_arch: str | None = None,
) -> dict[str, Any]:
    """The card of `name` v`version` from its run's records (and, with `local_arch`, this
    checkout's eval reports where the run lacks them, and its git commit as a last resort)."""
    src = model_card.card_sources(run_id)
    artifacts = {**_local_reports(params, local_arch), **src["artifacts"]}
    tags = {**src["tags"], **{k: str(v) for k, v in (version_tags or {}).items()}}
    if local_arch and not tags.get("git_commit"):
        tags["git_commit"] = tracking.git_commit()
    sources = CardSources(
        name=name,
        version=str(version),
        run_id=run_id,
        params=src["params"],
        metrics=src["metrics"],
        tags=tags,
        artifacts=artifacts,
        artifact_names=src["artifact_names"],
        split=_split(params),
        created=created,
        registered_by=registered_by,
    )
    return build_card(sources, params.register_cfg.card, _floors(params))


def _floors(params: Params) -> dict[str, float | None]:
    """The slice gate's per-slice floors (`gate.slices.min_*`), for the card's limitations."""
    cfg = getattr(params.gate, "slices", None)
    if cfg is None:
        return {}
    names = ("accuracy", "sensitivity", "specificity")
    return {m: getattr(cfg, f"min_{m}", None) for m in names}


def check_card(params: Params, record: dict[str, Any], version_tags: dict) -> dict[str, Any]:
    """A passed decision stays passed only when the candidate's card has every required field;
    otherwise it becomes a refusal naming the empty fields."""
    cand = record["candidate"]
    card = card_for(
        params,
        record["model_name"],
        PENDING,
        cand["run_id"],
        version_tags=version_tags,
        created=audit.utc_now(),
        registered_by=actor(),
        local_arch=cand["architecture"],
    )
    missing = missing_required(card)
    check = {"check": "model_card", "missing": missing, "passed": not missing}
    if not missing:
        return record | {"checks": [*record["checks"], check]}
    reason = "model card: required field(s) empty: " + ", ".join(missing)
    return record | {
        "passed": False,
        "checks": [*record["checks"], check],
        "reasons": [*record["reasons"], reason],
    }


def publish_card(params: Params, name: str, version: str, cand: dict[str, Any]) -> dict:
    """Build the registered version's card, attach it and link it from the version's
    description; then audit the registration."""
    info = model_card.version_info(name, version)
    card = card_for(
        params,
        name,
        version,
        cand["run_id"],
        version_tags=info["tags"],
        created=info["created"],
        registered_by=info["tags"].get("registered_by", actor()),
        local_arch=cand["architecture"],
    )
    link = f"artifact `{model_card.CARD_DIR}/model_card.md` of run {cand['run_id']}"
    model_card.publish_card(
        name, version, cand["run_id"], card, card_markdown(card), summary_markdown(card, link)
    )
    details = card["model_details"]
    audit.append(
        name,
        {
            "action": "register",
            "version_from": None,
            "version_to": version,
            "alias": None,
            "verdict": "pass",
            "reasons": ["gate passed; model card complete"],
            "git_commit": details["git_commit"],
            "data_hash": card["model_parameters"]["data"]["fingerprint"],
            "run_id": cand["run_id"],
        },
    )
    return card


def _check_lines(record: dict[str, Any]) -> list[str]:
    """One line per passed check, so a promotion's record says what it was judged on."""
    lines = []
    for c in record.get("checks", []):
        value = c.get("value", c.get("p_value"))
        shown = f" ({value:.4g} vs {c['bound']})" if isinstance(value, float) else ""
        lines.append(f"{c['check']} passed{shown}")
    return lines


def audit_decision(params: Params, record: dict[str, Any], action: str) -> dict[str, Any]:
    """Record a promotion (`promote`) or a refusal (`refuse`) of the decision `record`."""
    cand, before = record["candidate"], record.get("champion_before") or {}
    tags = model_card.run_tags(cand.get("run_id"))
    passed = bool(record["passed"])
    return audit.append(
        record["model_name"],
        {
            "action": action,
            "version_from": before.get("version"),
            "version_to": cand.get("version"),
            "alias": "champion",
            "verdict": "pass" if passed else "fail",
            "reasons": _check_lines(record) if passed else list(record["reasons"]),
            "git_commit": tags.get("git_commit") or tracking.git_commit(),
            "data_hash": record.get("fingerprint") or tags.get("dataset_fingerprint"),
            "run_id": cand.get("run_id"),
            "architecture": cand.get("architecture"),
        },
    )


def audit_rollback(name: str, champion: dict | None, previous: dict[str, Any]) -> dict:
    """Record `medimg rollback`: champion moved from `champion` back to `previous`."""
    was = champion and champion["version"]
    return audit.append(
        name,
        {
            "action": "rollback",
            "version_from": was,
            "version_to": previous["version"],
            "alias": "champion",
            "verdict": "manual",
            "reasons": [f"operator rollback: champion v{was} → v{previous['version']}"],
            "git_commit": model_card.run_tags(previous.get("run_id")).get("git_commit")
            or tracking.git_commit(),
            "data_hash": previous["tags"].get("dataset_fingerprint"),
            "run_id": previous.get("run_id"),
        },
    )
