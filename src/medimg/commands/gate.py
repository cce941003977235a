"""`medimg gate` and `medimg rollback`: the promotion decision as CI and operators see it."""

from __future__ import annotations

import argparse

from medimg import governance, tracking
from medimg.config import Params
from medimg.errors import MedimgError
from medimg.io import read_json
from medimg.promotion import decide, reason_paragraph, with_slice_gate


def gate(params: Params) -> int:
    """Re-check the recorded decision with today's gate params and the registry; 0 = pass."""
    path = params.paths.promotion
    if not path.exists():
        raise MedimgError(f"{path}: no promotion decision; run `dvc repro` first")
    promotion = read_json(path)
    arch = promotion["candidate"]["architecture"]
    report = read_json(params.paths.eval_reports(arch) / "summary.json")
    champion = promotion["champion_before"]
    tracking.configure(params.mlflow, params.dataset.name)  # the champion's slices: its run
    decision = decide(report, champion, promotion["paired_test"], params.gate)
    decision = with_slice_gate(params, arch, champion, decision)
    promotion |= decision
    text = reason_paragraph(promotion)
    if not promotion.get("promoted"):  # a decision only: `medimg promote` acts on it
        print(text)
        return 0 if decision["passed"] else 1
    tracking.configure(params.mlflow, params.dataset.name)
    champ = tracking.version_by_alias(promotion["model_name"], "champion")
    if decision["passed"] and (
        champ is None or champ["version"] != promotion["candidate"]["version"]
    ):
        print(
            f"FAIL: the gate passes but the registry's champion is "
            f"{champ and 'v' + champ['version']}, not v{promotion['candidate']['version']}; "
            "run `dvc repro register` to promote it."
        )
        return 1
    print(text)
    return 0 if decision["passed"] else 1


def rollback(params: Params) -> str:
    """Move `champion` back to `previous` (and `previous` to the demoted version)."""
    name = params.register_cfg.registered_name(params.dataset.name)
    tracking.configure(params.mlflow, params.dataset.name)
    champ = tracking.version_by_alias(name, "champion")
    prev = tracking.version_by_alias(name, "previous")
    if prev is None:
        raise MedimgError(f"{name}: no 'previous' alias to roll back to")
    tracking.set_alias(name, "champion", prev["version"])
    if champ is not None:
        tracking.set_alias(name, "previous", champ["version"])
    governance.audit_rollback(name, champ, prev)
    msg = f"{name}: champion v{champ and champ['version']} → v{prev['version']}"
    print(msg)
    return msg


def run_gate(params: Params, args: argparse.Namespace) -> int:
    return gate(params)


def run_rollback(params: Params, args: argparse.Namespace) -> int:
    rollback(params)
    return 0
