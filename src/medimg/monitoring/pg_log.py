"""The request log in a PostgreSQL database: the store a team already runs, shared by every
serving host, instead of each host's local folder of Parquet parts.

`MEDIMG_REQUEST_LOG=postgresql://...` (or `postgres://`) makes `RequestLog` write here and
`medimg monitor --log URL` read here; a folder (the default) keeps the Parquet parts. The folder
needs nothing running and is the default; the database is for several serving hosts (one
window across all of them) and for a log that must outlive the serving host's disk.

Schema (`medimg_requests`, or `MEDIMG_REQUEST_LOG_TABLE`; its status table is then
`<table>_status`): `id` (identity), `time timestamptz NOT NULL`, the text columns `model_id`,
`model_name`, `model_version`, `model_alias`, `sha256`, `decision`, `image_file`, and every
other column of a row (the image properties, `emb_i`, `probability`, `p_<class>`,
`threshold`) in one `data jsonb`. Why jsonb and not a real column each: those columns are open
(the `p_<class>` follow the dataset's classes, the `emb_i` the reference's component count, the
properties grow with `medimg.data.properties`), and a real column each would need the writer
to `ALTER TABLE`, a DDL right the serving role should not hold; the Parquet parts are just as
open (a reader unifies their schemas). A window is selected only by `model_id` / `time` (real
columns, indexed together) and then read whole, so nothing queries inside `data`; the price is
a few times the bytes of typed columns. JSON has no NaN: a non-finite number is stored as null
and read back as NaN.

How the serving host reaches it: a URL with a role that may only append and read back (its
password out of the URL: libpq's `~/.pgpass` / `PGPASSFILE`, or `PGPASSWORD`). The team
server's pgserver PostgreSQL listens only on a unix socket inside ROOT/pgdata, so a serving
process on that host uses `postgresql://medimg_serving@/medimg?host=ROOT/pgdata`; one on another
machine needs a PostgreSQL that listens on TCP (the team's managed `backend_store_uri` one, say:
`postgresql://medimg_serving@db.example:5432/medimg?sslmode=verify-full`) or an SSH tunnel to
that socket. An admin creates the tables once (`create_tables(url)`, or the first writer whose
role may create them) and grants the serving role exactly:

    GRANT SELECT, INSERT ON medimg_requests TO medimg_serving;
    GRANT SELECT, INSERT, UPDATE ON medimg_request_log_status TO medimg_serving;

(`id` is an identity column, not `bigserial`: an INSERT needs no grant on its sequence; UPDATE on
the status table is for the writer's upsert of its own counters.) Retention is the admin's job
(`DELETE ... WHERE time < ...`): the serving role cannot delete.

The writer never makes a request wait: `RequestLog` calls `PgSink` from its background thread
only. Connections time out after `CONNECT_TIMEOUT_S` (3 s), statements after 10 s, and a TCP
connection whose peer vanished after `tcp_user_timeout` (10 s): a dead database costs the
writer thread a few seconds per flush, while requests keep being queued (or dropped and
counted once the queue is full). psycopg is imported inside the functions, nothing at import.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    import pandas as pd

URL_PREFIXES = ("postgresql://", "postgres://")
ENV_TABLE = "MEDIMG_REQUEST_LOG_TABLE"
TABLE = "medimg_requests"
STATUS_TABLE = "medimg_request_log_status"
CONNECT_TIMEOUT_S = 3
TEXT_COLUMNS = ("model_id", "model_name", "model_version", "model_alias", "sha256", "decision")
TEXT_COLUMNS += ("image_file",)
COUNTERS = ("logged", "written", "dropped", "lost", "errors", "deleted_parts")
# libpq settings a URL may override: short connect, bounded statements, dead TCP peers noticed
CONNECT_DEFAULTS = {
    "connect_timeout": str(CONNECT_TIMEOUT_S),
    "options": "-c statement_timeout=10000 -c TimeZone=UTC",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "2",
    "tcp_user_timeout": "10000",
}


class PgLogError(ValueError):
    """The database cannot give the window asked for (unreachable, no table yet)."""


def is_url(target: str | os.PathLike[str]) -> bool:
    """Whether a MEDIMG_REQUEST_LOG value names a database rather than a folder."""
    return str(target).startswith(URL_PREFIXES)


def redact(url: str) -> str:
    """The URL without its password (for status rows and error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def tables(table: str | None = None) -> tuple[str, str]:
    """(requests table, status table): `table`, else MEDIMG_REQUEST_LOG_TABLE, else the
    defaults; an overridden table's status table is `<table>_status`."""
    table = table or os.environ.get(ENV_TABLE, "").strip() or TABLE
    return table, STATUS_TABLE if table == TABLE else f"{table}_status"


def connect(url: str) -> Any:
    """An autocommit psycopg connection with CONNECT_DEFAULTS (the URL's own settings win)."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    given = conninfo_to_dict(url)
    extra = {k: v for k, v in CONNECT_DEFAULTS.items() if k not in given}
    return psycopg.connect(url, autocommit=True, **extra)


def _ident(name: str) -> Any:
    from psycopg import sql

    return sql.Identifier(*name.split("."))  # "schema.table" or "table"


def ensure_tables(conn: Any, table: str | None = None) -> None:
    """Create the tables and index if missing. Checks first: `CREATE TABLE IF NOT EXISTS`
    still needs CREATE on the schema, which a serving role need not hold once they exist."""
    import psycopg
    from psycopg import sql

    table, status = tables(table)
    quoted = [_ident(t).as_string(conn) for t in (table, status)]
    found = conn.execute("SELECT to_regclass(%s), to_regclass(%s)", quoted).fetchone()
    if found[0] is not None and found[1] is not None:
        return
    index = _ident(f"{table.split('.')[-1]}_model_time")
    text = sql.SQL(", ").join(sql.SQL("{} text").format(sql.Identifier(c)) for c in TEXT_COLUMNS)
    statements = [
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " time timestamptz NOT NULL, {}, data jsonb NOT NULL DEFAULT '{{}}')"
        ).format(_ident(table), text),
        sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (model_id, time)").format(
            index, _ident(table)
        ),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (host text NOT NULL, pid integer NOT NULL,"
            " started timestamptz NOT NULL, updated timestamptz NOT NULL, status jsonb NOT NULL,"
            " last_error text, PRIMARY KEY (host, pid, started))"
        ).format(_ident(status)),
    ]
    try:
        with conn.transaction():
            for statement in statements:
                conn.execute(statement)
    except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateObject):
        pass  # another writer created them at the same moment


def create_tables(url: str, table: str | None = None) -> None:
    """The admin's one-time setup (a role that may create tables in the database)."""
    with connect(url) as conn:
        ensure_tables(conn, table)


def _plain(value: Any) -> Any:
    """A JSON value: numpy scalars as Python ones, non-finite floats as null, else str."""
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class PgSink:
    """One writer's connection to the log tables (used by `RequestLog`'s writer thread only).

    A failed batch raises: the caller counts it (`errors` +1, its rows in `lost`) and drops it.
    Why not keep it for later: while the database is down, kept batches would grow the serving
    process's memory without bound (or, bounded, drop rows anyway), and replaying them would
    hold the writer on a dead database at every flush; the drift check wants a recent window,
    not a complete history, and the counted loss tells the report how much is missing. The one
    retry: a kept connection found dead at the next flush (the database restarted in between)
    is replaced once and the batch sent again on the new one, since nothing is wrong any more.
    """

    def __init__(self, url: str, table: str | None = None) -> None:
        self.url = url
        self.table, self.status_table = tables(table)
        self.conn: Any = None
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.started = datetime.now(UTC)

    def _connection(self) -> Any:
        if self.conn is None or self.conn.closed:
            self.conn = connect(self.url)
            try:
                ensure_tables(self.conn, self.table)
            except Exception:
                self.close()
                raise
        return self.conn

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def insert(self, rows: list[dict[str, Any]]) -> None:
        """All `rows` in one transaction (COPY), or none of them (raises)."""
        import psycopg

        reused = self.conn is not None and not self.conn.closed
        try:
            self._copy(rows)
        except psycopg.OperationalError:
            self.close()
            if not reused:
                raise
            self._copy(rows)  # the kept connection had died since the last flush

    def _copy(self, rows: list[dict[str, Any]]) -> None:
        from psycopg import sql
        from psycopg.types.json import Jsonb

        conn = self._connection()
        columns = ("time", *TEXT_COLUMNS, "data")
        copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(
            _ident(self.table), sql.SQL(", ").join(map(sql.Identifier, columns))
        )
        now = datetime.now(UTC)
        try:
            with conn.transaction(), conn.cursor() as cur, cur.copy(copy_sql) as copy:
                for row in rows:
                    text = [None if row.get(c) is None else str(row[c]) for c in TEXT_COLUMNS]
                    data = {k: _plain(v) for k, v in row.items() if k not in columns}
                    copy.write_row([row.get("time") or now, *text, Jsonb(data)])
        except Exception:
            if conn.broken or conn.closed:
                self.close()
            raise

    def write_status(self, status: dict[str, Any]) -> bool:
        """Upsert this writer's counters (row host, pid, started); best effort, only on a live
        connection (after a failed connect it would cost another connect timeout)."""
        if self.conn is None or self.conn.closed:
            return False
        from psycopg import sql
        from psycopg.types.json import Jsonb

        upsert = sql.SQL(
            "INSERT INTO {} (host, pid, started, updated, status, last_error)"
            " VALUES (%s, %s, %s, now(), %s, %s) ON CONFLICT (host, pid, started) DO UPDATE"
            " SET updated = EXCLUDED.updated, status = EXCLUDED.status,"
            " last_error = EXCLUDED.last_error"
        ).format(_ident(self.status_table))
        values = (self.host, self.pid, self.started, Jsonb(_jsonable(status)))
        try:
            self.conn.execute(upsert, (*values, status.get("last_error")))
        except Exception:
            if self.conn is not None and (self.conn.broken or self.conn.closed):
                self.close()
            return False
        return True


def _jsonable(tree: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(tree, default=str))


def _utc(value: datetime | str) -> datetime:
    import pandas as pd

    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.to_pydatetime()


def _fail(url: str, err: Exception) -> PgLogError:
    import psycopg

    if isinstance(err, psycopg.errors.UndefinedTable):
        return PgLogError(f"{redact(url)}: the request log has no table yet (no writer yet)")
    reason = " ".join(str(err).split())[:300]
    return PgLogError(f"{redact(url)}: request log database unreachable ({reason})")


def read_window_pg(
    url: str,
    *,
    model_id: str | None = None,
    model_name: str | None = None,
    model_version: str | None = None,
    last: int | None = None,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    columns: list[str] | None = None,
    table: str | None = None,
) -> pd.DataFrame:
    """`log_store.read_window` on the database: the same frame (tz-aware UTC `time`, oldest
    first, numbers as floats, absent values null) through the same pyarrow → pandas path as
    the Parquet parts. "The last N" is `ORDER BY time DESC LIMIT N` on the (model_id, time)
    index, then put back in ascending order. Raises PgLogError."""
    import psycopg
    from psycopg import sql

    table = tables(table)[0]
    where, args = [sql.SQL("TRUE")], []
    for column, value in (("model_id", model_id), ("model_name", model_name),
                          ("model_version", model_version)):  # fmt: skip
        if value is not None:
            where.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            args.append(str(value))
    if since is not None:
        where.append(sql.SQL("time >= %s"))
        args.append(_utc(since))
    if until is not None:
        where.append(sql.SQL("time < %s"))
        args.append(_utc(until))
    order = sql.SQL("ORDER BY time, id")
    if last is not None:
        order = sql.SQL("ORDER BY time DESC, id DESC LIMIT %s")
        args.append(max(0, int(last)))  # last <= 0: an empty window
    query = sql.SQL("SELECT time, {}, data FROM {} WHERE {} {}").format(
        sql.SQL(", ").join(map(sql.Identifier, TEXT_COLUMNS)),
        _ident(table),
        sql.SQL(" AND ").join(where),
        order,
    )
    try:
        with connect(url) as conn:
            rows = conn.execute(query, args).fetchall()
    except psycopg.Error as err:
        raise _fail(url, err) from None
    if last is not None:
        rows.reverse()
    return _frame(rows, columns)


def _frame(rows: list[tuple[Any, ...]], columns: list[str] | None) -> pd.DataFrame:
    """Rows (time, text columns..., data) → the Parquet reader's frame."""
    import pyarrow as pa

    records = [dict(zip(TEXT_COLUMNS, row[1:-1], strict=True)) | row[-1] for row in rows]
    names = list(TEXT_COLUMNS)
    seen = set(names)
    for record in records:
        for key in record:
            if key not in seen:
                seen.add(key)
                names.append(key)
    if columns is not None:
        names = [n for n in dict.fromkeys(columns) if n in seen and n != "time"]
    arrays = {"time": pa.array([row[0] for row in rows], type=pa.timestamp("us", tz="UTC"))}
    for name in names:
        values = [record.get(name) for record in records]
        if name not in TEXT_COLUMNS and all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in values
        ):
            arrays[name] = pa.array(values, type=pa.float64())
        else:
            arrays[name] = pa.array(values)
    frame = pa.table(arrays).to_pandas()
    if columns is None and frame["image_file"].isna().all():
        frame = frame.drop(columns="image_file")  # as in parts written without kept images
    return frame


def log_health_pg(url: str, table: str | None = None) -> dict[str, Any]:
    """`log_store.log_health` on the database: the counters of every writer's status row
    summed (counts since each writer started), the newest `last_error`, how many writers.
    Never raises: a status table that cannot be read says so in `last_error`."""
    import psycopg
    from psycopg import sql

    status_table = tables(table)[1]
    totals: dict[str, Any] = {name: 0 for name in COUNTERS}
    query = sql.SQL("SELECT status, last_error FROM {} ORDER BY updated").format(
        _ident(status_table)
    )
    try:
        with connect(url) as conn:
            rows = conn.execute(query).fetchall()
    except psycopg.errors.UndefinedTable:
        rows = []
    except psycopg.Error as err:
        reason = " ".join(str(err).split())[:300]
        return {**totals, "last_error": f"status unreadable: {reason}", "processes": 0}
    last_error = None
    for status, error in rows:
        for name in COUNTERS:
            totals[name] += int(status.get(name) or 0)
        last_error = error or last_error
    return {**totals, "last_error": last_error, "processes": len(rows)}
