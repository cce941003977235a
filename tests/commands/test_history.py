"""`medimg history`'s formatting (pure): one row per record in the order given (newest
first), every column, reasons below, and a broken chain flagged."""

from __future__ import annotations

from medimg.commands.history import format_history

RECORDS = [
    {
        "time": "2026-11-30T06:02:00.000001Z",
        "user": "ci-bot",
        "action": "rollback",
        "version_from": "2",
        "version_to": "1",
        "alias": "champion",
        "verdict": "manual",
        "reasons": ["operator rollback: champion v2 → v1"],
        "git_commit": "0123456789abcdef",
        "data_hash": "fp1",
        "chain_ok": True,
    },
    {
        "time": "2026-11-30T06:01:00.000001Z",
        "user": "ci-bot",
        "action": "refuse",
        "version_from": "2",
        "version_to": None,
        "alias": "champion",
        "verdict": "fail",
        "reasons": ["McNemar: worse", "accuracy below"],
        "git_commit": None,
        "data_hash": "fp1",
        "chain_ok": False,
    },
]


def test_rows_in_the_given_order_with_every_column() -> None:
    lines = format_history(RECORDS, "malaria-classifier").splitlines()
    assert lines[0] == "malaria-classifier: 2 audit record(s), newest first"
    assert lines[1].split() == ["time", "user", "action", "versions", "verdict", "commit", "data"]
    assert lines[2].split() == [
        "2026-11-30",
        "06:02:00Z",
        "ci-bot",
        "rollback",
        "v2",
        "→",
        "v1",
        "champion",
        "manual",
        "0123456789ab",
        "fp1",
    ]
    assert lines[3] == "    - operator rollback: champion v2 → v1"
    assert lines[4].split()[3:] == ["refuse", "v2", "→", "–", "champion", "fail", "–", "fp1"]
    assert lines[5:7] == ["    - McNemar: worse", "    - accuracy below"]
    assert "WARNING" in lines[7] and "changed or removed" in lines[7]
    assert len({len(lines[1]), len(lines[2].rstrip())}) >= 1  # aligned columns, no crash


def test_columns_align_and_an_empty_trail_says_so() -> None:
    lines = format_history(RECORDS, "m").splitlines()
    assert lines[2].index("rollback") == lines[4].index("refuse") == lines[1].index("action")
    assert format_history([], "m") == "m: no audit records"
