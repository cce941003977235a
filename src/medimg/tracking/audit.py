"""The audit trail: who registered, promoted, refused or rolled back what, kept in the store.

Each record is one tag on the registered model, `audit.<UTC time>.<n>` = JSON (time, user,
action, from→to versions and alias, verdict, reasons, git commit, data hash, run). A tag and
not a file or a run, because on the team server that is the one place a member cannot write:
`default_permission = READ`, and MLflow answers 403 to SetRegisteredModelTag and
DeleteRegisteredModelTag without EDIT on the model, which only the `ci` role (MANAGE on every
registered model) and admins hold; members hold EDIT on experiments, so a run in an "audit
experiment" would be theirs to write. The records live in the store's database (PostgreSQL on
the team server), next to the aliases they explain.

Append-only as far as this code goes: a record's key is new (time + sequence; an existing key
is never overwritten) and each record carries `prev`, the digest of the record before it, so
`medimg history` shows a record edited or removed from the middle of the chain. Residual risk,
stated plainly: the `ci` account and admins *can* delete or rewrite these tags (MLflow has no
append-only permission; DeleteRegisteredModelTag needs only EDIT), and removing the newest
records leaves no trace in the chain. Protect the ci credentials (CI secrets only) and back up
the database; a database administrator can change anything.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

PREFIX = "audit."
MAX_VALUE = 4900  # PostgreSQL's registered_model_tags.value is VARCHAR(5000)
MAX_REASON = 400


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def actor() -> str:
    """Who acts: on a server, the account the request authenticates as (the server has just
    accepted MLFLOW_TRACKING_USERNAME's password in `configure`); on a local store, the OS
    user, since nobody logs in to a SQLite file."""
    import mlflow

    from medimg.tracking.runs import is_local_store

    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if user and not is_local_store(mlflow.get_tracking_uri()):
        return user
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a bare container)
        return f"uid-{os.getuid()}"


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ensure_model(name: str) -> None:
    """Create registered model `name` if it does not exist: a refusal before the first
    registration still needs a place to be recorded. On the team server `medimg server`
    pre-creates the project models, so nobody but an admin decides who owns them."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name)
        except MlflowException as err:
            if "RESOURCE_ALREADY_EXISTS" not in str(err.error_code):
                raise


def _digest(key: str, value: str) -> str:
    return hashlib.sha256(f"{key}={value}".encode()).hexdigest()[:16]


def _encode(record: dict[str, Any]) -> str:
    """JSON within the column's limit: long reasons are cut first, then dropped to a count."""
    record = {**record, "reasons": [r[:MAX_REASON] for r in record.get("reasons") or []]}
    value = json.dumps(record, sort_keys=True, default=str)
    while len(value) > MAX_VALUE and record["reasons"]:
        record["reasons"] = record["reasons"][:-1]
        record["reasons_cut"] = record.get("reasons_cut", 0) + 1
        value = json.dumps(record, sort_keys=True, default=str)
    return value


def _raw(name: str) -> list[tuple[str, str]]:
    """(key, value) of every audit tag of `name`, oldest first ([] if no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        tags = _client().get_registered_model(name).tags
    except MlflowException:
        return []
    return sorted((k, v) for k, v in tags.items() if k.startswith(PREFIX))


def append(name: str, entry: Mapping[str, Any]) -> dict[str, Any]:
    """Record `entry` (action, version_from, version_to, alias, verdict, reasons,
    git_commit, data_hash, run_id) with the time, the user and the previous record's digest;
    returns the record as stored. Raises on a store that refuses (a member: HTTP 403)."""
    ensure_model(name)
    existing = _raw(name)
    keys = {k for k, _ in existing}
    prev = _digest(*existing[-1]) if existing else None
    now, n = utc_now(), len(existing)
    key = f"{PREFIX}{now}.{n:06d}"
    while key in keys:  # never overwrite a record
        n += 1
        key = f"{PREFIX}{now}.{n:06d}"
    record = {"time": now, "user": actor(), "model": name, **entry, "prev": prev}
    _client().set_registered_model_tag(name, key, _encode(record))
    return {**record, "key": key}


def records(name: str) -> list[dict[str, Any]]:
    """Every audit record of `name`, newest first; `chain_ok` is False where the record
    before it in the chain was changed or removed (or two writers raced)."""
    out, prev = [], None
    for key, value in _raw(name):
        try:
            record = json.loads(value)
        except json.JSONDecodeError:
            record = {"action": "?", "reasons": [f"unreadable record: {value[:80]}"]}
        record |= {"key": key, "chain_ok": record.get("prev") == prev}
        out.append(record)
        prev = _digest(key, value)
    return out[::-1]
