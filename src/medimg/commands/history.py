"""`medimg history`: the audit trail of a registered model, newest first.

Who registered, promoted, refused or rolled back which version, when, on what verdict, from
which commit and data. The records are read from the tracking store (`medimg.tracking.audit`),
so on the team server everyone sees the same trail and only CI or an admin can add to it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from typing import Any

from medimg import tracking
from medimg.config import Params
from medimg.tracking import audit

COLUMNS = ("time", "user", "action", "versions", "verdict", "commit", "data")


def _version(value: Any) -> str:
    return "–" if value in (None, "") else f"v{value}"


def format_record(record: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(the record's cells in COLUMNS order, its reasons): times to the second, commits to
    12 characters, a broken chain marked where it shows."""
    alias = f" {record['alias']}" if record.get("alias") else ""
    cells = [
        str(record.get("time", "?"))[:19].replace("T", " ") + "Z",
        str(record.get("user") or "?"),
        str(record.get("action") or "?"),
        f"{_version(record.get('version_from'))} → {_version(record.get('version_to'))}{alias}",
        str(record.get("verdict") or "–"),
        str(record.get("git_commit") or "–")[:12],
        str(record.get("data_hash") or "–"),
    ]
    reasons = [str(r) for r in record.get("reasons") or []]
    if record.get("chain_ok") is False:
        reasons.append("WARNING: the record before this one was changed or removed")
    return cells, reasons


def format_history(records: Iterable[Mapping[str, Any]], name: str) -> str:
    """The trail as an aligned table, one record per row (newest first, as given) and its
    reasons indented below it."""
    rows = [format_record(r) for r in records]
    if not rows:
        return f"{name}: no audit records"
    widths = [max(len(c), *(len(cells[i]) for cells, _ in rows)) for i, c in enumerate(COLUMNS)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    out = [f"{name}: {len(rows)} audit record(s), newest first", line(COLUMNS).rstrip()]
    for cells, reasons in rows:
        out.append(line(cells).rstrip())
        out += [f"    - {r}" for r in reasons]
    return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="registered model (default: <dataset>-classifier)")


def run(params: Params, args: argparse.Namespace) -> int:
    tracking.configure(params.mlflow, params.dataset.name)
    name = args.model or params.register_cfg.registered_name(params.dataset.name)
    print(format_history(audit.records(name), name))
    return 0
