"""Reading the request log (`medimg.monitoring.request_log`'s Parquet parts) back: a window of
requests for one model version, and the writers' health counters.

Memory stays bounded by the window, not by the log: the parts are opened as one pyarrow
dataset (their schemas unified: a part written before embeddings were logged simply has no
`emb_i` columns), filtered by model name/version and time, and for "the last N requests" only
the `time` column of the matching rows is read first (8 bytes a row) to find the cut-off; then
just the window's rows are read.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medimg.monitoring.request_log import PART_GLOB, STATUS_GLOB

COUNTERS = ("logged", "written", "dropped", "lost", "errors", "deleted_parts")


class LogError(ValueError):
    """The log folder cannot give the window asked for (missing, empty, unreadable)."""


def _dataset(folder: Path) -> Any:
    import pyarrow as pa
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    if not folder.is_dir():
        raise LogError(f"{folder}: no request log folder (MEDIMG_REQUEST_LOG of the server)")
    files = sorted(str(p) for p in folder.glob(PART_GLOB))
    if not files:
        raise LogError(f"{folder}: the request log has no parts yet")
    try:
        schema = pa.unify_schemas([pq.read_schema(f) for f in files])
    except Exception as err:
        raise LogError(f"{folder}: unreadable request log part: {err}") from None
    return ds.dataset(files, schema=schema, format="parquet")


def _as_utc(value: datetime | str | None) -> Any:
    import pyarrow as pa

    if value is None:
        return None
    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return pa.scalar(stamp.to_pydatetime(), type=pa.timestamp("us", tz="UTC"))


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
    existing ones; `time` is always read)."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    data = _dataset(Path(folder))
    names = set(data.schema.names)
    expr = ds.scalar(True)
    match = (("model_id", model_id), ("model_name", model_name), ("model_version", model_version))
    for column, value in match:
        if value is not None:
            if column not in names:
                raise LogError(f"{folder}: the log has no {column} column")
            expr = expr & (ds.field(column) == str(value))
    if since is not None:
        expr = expr & (ds.field("time") >= _as_utc(since))
    if until is not None:
        expr = expr & (ds.field("time") < _as_utc(until))
    if last is not None:
        times = data.to_table(columns=["time"], filter=expr).column("time")
        if len(times) > last:
            stamps = times.cast(pa.int64()).to_numpy()  # microseconds since the epoch, UTC
            cutoff = int(np.partition(stamps, len(stamps) - last)[len(stamps) - last])
            expr = expr & (ds.field("time") >= pa.scalar(cutoff, type=times.type))
    wanted = None if columns is None else [c for c in ["time", *columns] if c in names]
    if wanted is not None:
        wanted = list(dict.fromkeys(wanted))
    frame = data.to_table(columns=wanted, filter=expr).to_pandas()
    frame = frame.sort_values("time", kind="stable").reset_index(drop=True)
    if last is not None and len(frame) > last:  # ties at the cut-off time
        frame = frame.iloc[len(frame) - last :].reset_index(drop=True)
    return frame


def log_health(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The writers' counters summed over every serving process's `status-<pid>.json` (counts
    since each process started), the newest `last_error`, and how many processes reported.
    A folder no writer could write a status to reports zero processes."""
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
