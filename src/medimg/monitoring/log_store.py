"""Reading the request log (`medimg.monitoring.request_log`'s Parquet parts) back: a window of
requests for one model version, and the writers' health counters.

Memory stays bounded by the window, not by the log: parts are read one at a time with the
filter (model, time) pushed down, their schemas unified (a part written before embeddings were
logged simply has no `emb_i` columns), and for "the last N requests" only the `time` column of
the matching rows is read first (8 bytes a row) to find the cut-off; then just the window's
rows are read.

A `postgresql://` (or `postgres://`) URL in place of the folder reads the database log instead
(`medimg.monitoring.pg_log`): the same frame and the same health counters. A URL is told by its
string form, so pass it as a string: `Path(url)` collapses its `//` into `/`, and such a mangled
URL is refused with a LogError rather than read as a folder that does not exist.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medimg.monitoring.pg_log import PgLogError, is_url, log_health_pg, read_window_pg
from medimg.monitoring.request_log import PART_GLOB, STATUS_GLOB

COUNTERS = ("logged", "written", "dropped", "lost", "errors", "deleted_parts")


class LogError(ValueError):
    """The log folder cannot give the window asked for (missing, empty, unreadable)."""


def _is_db(target: str | os.PathLike[str]) -> bool:
    """Whether `target` names the database log (LogError for a URL that lost its `//`)."""
    if is_url(target):
        return True
    if str(target).startswith(("postgresql:/", "postgres:/")):
        raise LogError(
            f"{target}: a database URL that lost its '//' (made a pathlib.Path?): "
            "pass the URL as a string"
        )
    return False


def _parts(folder: Path) -> tuple[list[Path], Any]:
    """The folder's parts and their unified schema (a part written before embeddings were
    logged has no `emb_i` columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not folder.is_dir():
        raise LogError(f"{folder}: no request log folder (MEDIMG_REQUEST_LOG of the server)")
    files = sorted(folder.glob(PART_GLOB))
    if not files:
        raise LogError(f"{folder}: the request log has no parts yet")
    try:
        return files, pa.unify_schemas([pq.read_schema(f) for f in files])
    except Exception as err:
        raise LogError(f"{folder}: unreadable request log part: {err}") from None


def _as_utc(value: datetime | str | None) -> Any:
    import pyarrow as pa

    if value is None:
        return None
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError) as err:
        raise LogError(f"{value!r}: not an ISO date/time ({err})") from None
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return pa.scalar(stamp.to_pydatetime(), type=pa.timestamp("us", tz="UTC"))


def _read_parts(
    files: list[Path], columns: list[str], match: dict[str, str], expr: Any
) -> list[Any]:
    """Each part's rows passing `expr` (and `match`), `columns` that part has, one part at a
    time: a part missing a matched column holds none of that model's rows."""
    import pyarrow.parquet as pq

    tables = []
    for path in files:
        have = set(pq.read_schema(path).names)
        if not set(match) <= have:
            continue
        table = pq.read_table(path, columns=[c for c in columns if c in have], filters=expr)
        if table.num_rows:
            tables.append(table)
    return tables


def _conform(table: Any, target: Any) -> Any:
    """`table` with exactly `target`'s columns and types (nulls where the part lacks one)."""
    import pyarrow as pa

    arrays = [
        table.column(f.name).cast(f.type) if f.name in table.column_names
        else pa.nulls(table.num_rows, f.type)
        for f in target
    ]  # fmt: skip
    return pa.Table.from_arrays(arrays, schema=target)


def read_window(
    folder: str | os.PathLike[str],
    *,
    model_id: str | None = None,
    model_name: str | None = None,
    model_version: str | None = None,
    last: int | None = None,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    columns: list[str] | None = None,
) -> pd.DataFrame:
    """The logged requests of the logged model `model_id` (the served MLmodel's; also
    `model_name` / `model_version` where the server set them; None: any) with since <= time <
    until, and of those the `last` N by time; oldest first. `columns`: read only these (the
    existing ones; `time` is always read). `folder` may be a database URL (string).

    Parts are read one at a time (`pyarrow.parquet.read_table` with the filter pushed down):
    for `last`, a first pass keeps only the matching rows' times (8 bytes a row) to find the
    cut-off, a second reads just the window. A dataset over all parts would keep every
    part's metadata (~80 KB a part, +600 MB for a full 512 MB log) for the whole read."""
    if _is_db(folder):
        try:
            return read_window_pg(
                str(folder),
                model_id=model_id,
                model_name=model_name,
                model_version=model_version,
                last=last,
                since=since,
                until=until,
                columns=columns,
            )
        except PgLogError as err:
            raise LogError(str(err)) from None
    import pyarrow as pa
    import pyarrow.compute as pc

    files, schema = _parts(Path(folder))
    names = set(schema.names)
    wanted = [c for c in (schema.names if columns is None else ["time", *columns]) if c in names]
    wanted = list(dict.fromkeys(wanted))
    expr = pc.scalar(True)
    match = {
        k: str(v)
        for k, v in (("model_id", model_id), ("model_name", model_name),
                     ("model_version", model_version))
        if v is not None
    }  # fmt: skip
    for column, value in match.items():
        if column not in names:
            raise LogError(f"{folder}: the log has no {column} column")
        expr = expr & (pc.field(column) == value)
    if since is not None:
        expr = expr & (pc.field("time") >= _as_utc(since))
    if until is not None:
        expr = expr & (pc.field("time") < _as_utc(until))
    if last is not None and last <= 0:
        return schema.empty_table().select(wanted).to_pandas()
    if last is not None:
        times = _read_parts(files, ["time"], match, expr)
        stamps = (
            np.concatenate([t.column("time").cast(pa.int64()).to_numpy() for t in times])
            if times
            else np.zeros(0, np.int64)
        )  # microseconds since the epoch, UTC
        if len(stamps) > last:
            cutoff = int(np.partition(stamps, len(stamps) - last)[len(stamps) - last])
            expr = expr & (pc.field("time") >= pa.scalar(cutoff, type=schema.field("time").type))
        del times, stamps
    tables = _read_parts(files, wanted, match, expr)
    if not tables:
        return schema.empty_table().select(wanted).to_pandas()
    target = pa.schema([schema.field(c) for c in wanted])
    table = pa.concat_tables([_conform(t, target) for t in tables])
    frame = table.to_pandas().sort_values("time", kind="stable").reset_index(drop=True)
    if last is not None and len(frame) > last:  # ties at the cut-off time
        frame = frame.iloc[len(frame) - last :].reset_index(drop=True)
    return frame


def log_health(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The writers' counters summed over every serving process's `status-<pid>.json` (counts
    since each process started), the newest `last_error`, and how many processes reported.
    A folder no writer could write a status to reports zero processes; for a database URL,
    its status table (`log_health_pg`)."""
    if _is_db(folder):
        return log_health_pg(str(folder))
    totals: dict[str, Any] = {name: 0 for name in COUNTERS}
    newest, last_error, processes = "", None, 0
    for path in sorted(Path(folder).glob(STATUS_GLOB)):
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        processes += 1
        for name in COUNTERS:
            totals[name] += int(status.get(name) or 0)
        if status.get("last_error") and str(status.get("updated", "")) >= newest:
            newest, last_error = str(status.get("updated", "")), status["last_error"]
    return {**totals, "last_error": last_error, "processes": processes}
