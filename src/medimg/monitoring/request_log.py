"""The served model's request log: one row per scored image, as Parquet parts in a local folder.

Off unless `MEDIMG_REQUEST_LOG` names a folder (`RequestLog.from_env`). Each row holds the
time (UTC), the model (`MEDIMG_MODEL_NAME` / `MEDIMG_MODEL_VERSION` / `MEDIMG_MODEL_ALIAS`,
else null), `sha256` (of the image's decoded pixels: the (H, W, 3) uint8 RGB array's bytes,
C order, as decoded at the original size; float pixels sent as arrays are rounded and clipped
to 0-255 first, so one image sent as PNG or as pixels hashes the same; H and W are the
`height` / `width` columns), the image's properties (`medimg.data.properties`, on those same
original-size pixels: the served model hands over what it decoded, nothing decodes twice) and
the answer (`decision`, `probability`, `p_<class>`, `threshold`); with the served model's
monitoring reference, its embedding reduced to a few principal components (`emb_0`...); with
`keep_images`, `image_file`: the image as `images/<sha256>.png` beside the parts, for
relabeling (`medimg monitor export`). Otherwise never the pixels.

Work stays off the request path: `log_request` only puts the request (the decoded arrays, not
a copy, and a copy of the small answer frame) on a bounded queue, also bounded in queued pixel
bytes (`max_queued_mb`); one daemon thread hashes, measures and writes a part every
`flush_every` records or `flush_seconds` (`MEDIMG_REQUEST_LOG_FLUSH_SECONDS`, default 10), as
`part-<utc>-<pid>-<seq>.parquet` (written under a temporary name, then `os.replace`d: a
reader never sees half a part). The folder is append-only and bounded: over `max_mb`
(`MEDIMG_REQUEST_LOG_MAX_MB`, default 512) the oldest parts (and kept images) are deleted.

A request never fails or waits because of the log: a full queue drops the records (`dropped`),
a failed write (read-only folder, disk full, no pyarrow) counts in `errors` and its records
in `lost`; the counters are attributes and, when the folder can be written,
`status-<pid>.json` (one per serving process; `medimg monitor` sums them).
Remaining records are flushed at interpreter exit (atexit), best-effort.

`MEDIMG_REQUEST_LOG=postgresql://...` writes the rows to a PostgreSQL table instead, one COPY
per flush, and the counters to a status row per writer (`medimg.monitoring.pg_log`: schema,
grants, reaching it, why a failed batch is dropped rather than retried): same counters, same
rule. Kept images then need a folder, `MEDIMG_REQUEST_LOG_IMAGES` (`image_file`: the absolute
path); without one `keep_images` is refused (one error counted, `last_error` says why).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from medimg.monitoring.pg_log import PgSink, is_url, redact

ENV_FOLDER = "MEDIMG_REQUEST_LOG"
ENV_MAX_MB = "MEDIMG_REQUEST_LOG_MAX_MB"
ENV_KEEP_IMAGES = "MEDIMG_REQUEST_LOG_KEEP_IMAGES"
ENV_FLUSH_SECONDS = "MEDIMG_REQUEST_LOG_FLUSH_SECONDS"  # default 10: a part at least this often
ENV_IMAGES = "MEDIMG_REQUEST_LOG_IMAGES"  # with a database log: the folder for kept images
ENV_MODEL = {
    "model_name": "MEDIMG_MODEL_NAME",
    "model_version": "MEDIMG_MODEL_VERSION",
    "model_alias": "MEDIMG_MODEL_ALIAS",
}
DEFAULT_MAX_MB = 512.0
STATUS_GLOB = "status-*.json"  # one per serving process: status-<pid>.json
PART_GLOB = "part-*.parquet"
IMAGES = "images"  # kept images (keep_images): images/<sha256>.png, content-addressed


class _Flush:
    """A queue marker: write what is pending now, then set `done`."""

    def __init__(self) -> None:
        self.done = threading.Event()


_STOP = object()


@dataclass
class _Request:
    """A scored request waiting for the writer: its images as decoded, and its answer."""

    time: datetime
    images: list[Any]
    answer: Any
    nbytes: int
    embeddings: Any = None  # (N, D) penultimate-layer activations, or None


def pixels_sha256(pixels: Any) -> str:
    """sha256 of an image's (H, W, 3) uint8 RGB pixel bytes (C order); floats rounded to 0-255."""
    x = np.asarray(pixels)
    if x.dtype != np.uint8:
        x = np.clip(np.round(x), 0, 255).astype(np.uint8)
    return hashlib.sha256(np.ascontiguousarray(x).tobytes()).hexdigest()


class RequestLog:
    """Records of scored images → Parquet parts in `folder` (or rows in the database a
    `postgresql://` URL names), written by one background thread."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        max_mb: float = DEFAULT_MAX_MB,
        flush_every: int = 256,
        flush_seconds: float = 10.0,
        queue_size: int = 10_000,
        max_queued_mb: float = 256.0,
        start: bool = True,
        reference: dict[str, Any] | None = None,
        keep_images: bool = False,
        model_id: str | None = None,
        images_folder: str | os.PathLike[str] | None = None,
        table: str | None = None,
    ) -> None:
        self.url = str(folder) if is_url(folder) else None  # rows to a database; images apart
        self.sink = PgSink(self.url, table) if self.url else None  # connects at the first write
        images = Path(images_folder).absolute() if images_folder else None
        self.folder: Path | None = Path(folder) if self.url is None else images
        # the served model's monitoring reference: its embedding PCA reduces each request's
        # embedding to the few `emb_i` numbers logged (medimg.monitoring.reference.project)
        self.embedding = (reference or {}).get("embedding")
        self.keep_images = bool(keep_images)
        self.max_bytes = int(max_mb * 1024 * 1024)
        self.flush_every = max(1, int(flush_every))
        self.flush_seconds = float(flush_seconds)
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, int(queue_size)))
        self.max_queued_bytes = int(max_queued_mb * 1024 * 1024)  # decoded pixels held queued
        self.queued_bytes = 0
        self._lock = threading.Lock()
        # which model answered: the logged model's id (from its MLmodel: always known to the
        # served model) and, where the server sets them, the registered name/version/alias
        self.model = {"model_id": model_id}
        self.model |= {key: os.environ.get(env) or None for key, env in ENV_MODEL.items()}
        self.logged = 0  # records queued
        self.dropped = 0  # records refused: queue full, or not loggable
        self.written = 0  # records in parts on disk
        self.lost = 0  # records in a part that failed to write
        self.errors = 0  # failed writes (of a part, a kept image, an embedding)
        self.deleted = 0  # parts deleted to keep the folder under max_bytes
        self.last_error: str | None = None
        if self.keep_images and self.folder is None:
            self.keep_images = False
            self.errors += 1
            self.last_error = f"keep_images: a database log keeps images in {ENV_IMAGES}, unset"
        self._seq = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="medimg-request-log", daemon=True)
        if start:
            self.start()
        atexit.register(self.close)

    @classmethod
    def from_env(cls, keep_images: bool = False, **kwargs: Any) -> RequestLog | None:
        """The log `MEDIMG_REQUEST_LOG` asks for, or None (logging off) when it is unset.
        `keep_images` (the model's `monitoring.keep_images`) yields to
        MEDIMG_REQUEST_LOG_KEEP_IMAGES (1/true/yes or 0/false/no) where that is set."""
        folder = os.environ.get(ENV_FOLDER, "").strip()
        if not folder:
            return None
        max_mb = float(os.environ.get(ENV_MAX_MB) or DEFAULT_MAX_MB)
        keep = os.environ.get(ENV_KEEP_IMAGES, "").strip().lower()
        if keep:
            keep_images = keep in ("1", "true", "yes")
        if os.environ.get(ENV_FLUSH_SECONDS):
            kwargs.setdefault("flush_seconds", float(os.environ[ENV_FLUSH_SECONDS]))
        if is_url(folder) and os.environ.get(ENV_IMAGES, "").strip():
            kwargs.setdefault("images_folder", os.environ[ENV_IMAGES].strip())
        return cls(folder, max_mb=max_mb, keep_images=keep_images, **kwargs)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    # ------------------------------------------------------------------------- request path

    def log(self, record: dict[str, Any]) -> None:
        """Queue one ready record; never raises, never waits (a full queue drops it, counted)."""
        self._put(record, 1, 0)

    def log_request(self, images: Sequence[Any], answer: Any, embeddings: Any = None) -> None:
        """Queue a scored request: `images` at their original size (as decoded), `answer` the
        result frame (one row per image, same order), `embeddings` their (N, D) penultimate
        activations or None. Never raises, never waits: the hash, the properties and the
        embedding projection are computed by the writer thread, which holds the decoded
        arrays (not a copy) until then; a request over the queued-pixels budget is dropped,
        counted."""
        try:
            images = list(images)
            nbytes = sum(int(np.asarray(x).nbytes) for x in images)
            item = _Request(datetime.now(UTC), images, answer.copy(), nbytes, embeddings)
        except Exception as err:  # the answer goes out whatever happens here
            self._count(dropped=1)
            self.last_error = f"record: {type(err).__name__}: {err}"
            return
        if self.queued_bytes + nbytes > self.max_queued_bytes:
            self._count(dropped=len(images))
            return
        self._put(item, len(images), nbytes)

    def _put(self, item: Any, n: int, nbytes: int) -> None:
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self._count(dropped=n)
        except Exception:  # pragma: no cover - a queue that cannot take the item
            self._count(dropped=n)
        else:
            self._count(logged=n, queued_bytes=nbytes)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def _records(self, request: _Request) -> list[dict[str, Any]]:
        """The rows of a queued request (writer thread): hash, properties, model, answer."""
        from medimg.data.properties import image_properties

        self._count(queued_bytes=-request.nbytes)
        try:
            rows = request.answer.to_dict("records")
        except Exception as err:
            self._count(dropped=len(request.images))
            self.last_error = f"record: {type(err).__name__}: {err}"
            return []
        projected = self._project(request)
        records = []
        for i, pixels in enumerate(request.images):
            try:
                row = dict(rows[i])
                record: dict[str, Any] = {"time": request.time, **self.model}
                record["sha256"] = pixels_sha256(pixels)
                record.update(image_properties(pixels))
                record.update({name: float(values[i]) for name, values in projected.items()})
                if self.keep_images:
                    record["image_file"] = self._keep(pixels, record["sha256"])
                record["decision"] = str(row.pop("class"))
                record.update({key: _plain(value) for key, value in row.items()})
            except Exception as err:
                self._count(dropped=1)
                self.last_error = f"record: {type(err).__name__}: {err}"
                continue
            records.append(record)
        return records

    def _project(self, request: _Request) -> dict[str, np.ndarray]:
        """The request's embeddings reduced to the reference's components ({} when either
        is missing, or on a shape mismatch, counted in `errors`)."""
        if self.embedding is None or request.embeddings is None:
            return {}
        from medimg.monitoring.reference import project

        try:
            projected = project(self.embedding, np.concatenate(list(request.embeddings)))
            if any(len(v) != len(request.images) for v in projected.values()):
                raise ValueError("one embedding per image expected")
            return projected
        except Exception as err:
            self._count(errors=1)
            self.last_error = f"embedding: {type(err).__name__}: {err}"
            return {}

    def _keep(self, pixels: Any, sha256: str) -> str | None:
        """Write the image as images/<sha256>.png (once per distinct image); its relative
        path, or None when it could not be written (counted)."""
        from PIL import Image

        from medimg.data.properties import as_rgb

        rel = f"{IMAGES}/{sha256}.png"
        dest = self.folder / rel
        if self.url is not None:  # rows in a database: the path the images folder gives
            rel = str(dest)
        if dest.exists():
            return rel
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.tmp")
            x = np.asarray(as_rgb(pixels))
            if x.dtype != np.uint8:
                x = np.clip(np.round(x), 0, 255).astype(np.uint8)
            Image.fromarray(x).save(tmp, format="PNG")
            os.replace(tmp, dest)
        except Exception as err:
            self._count(errors=1)
            self.last_error = f"image: {type(err).__name__}: {err}"
            return None
        return rel

    # ------------------------------------------------------------------------------ control

    def flush(self, timeout: float = 30.0) -> bool:
        """Write every queued record now (waits for the writer; not for the request path)."""
        if not self._thread.is_alive():
            return False
        marker = _Flush()
        try:
            self.queue.put(marker, timeout=timeout)
        except queue.Full:
            return False
        return marker.done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Flush and stop the writer (atexit calls it); idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        if self._thread.is_alive():
            try:
                self.queue.put(_STOP, timeout=timeout)
                self._thread.join(timeout)
            except Exception:
                self._count(errors=1)
        if self.sink is not None and not self._thread.is_alive():
            self.sink.close()

    def status(self) -> dict[str, Any]:
        where = {"folder": None if self.folder is None else str(self.folder)}
        if self.url is not None:
            where = {"database": redact(self.url), **where}
        return {
            **where,
            "pid": os.getpid(),
            "updated": datetime.now(UTC).isoformat(),
            "logged": self.logged,
            "written": self.written,
            "dropped": self.dropped,
            "lost": self.lost,
            "errors": self.errors,
            "deleted_parts": self.deleted,
            "queued": self.queue.qsize(),
            "queued_bytes": self.queued_bytes,
            "max_bytes": self.max_bytes,
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------------------------- writer

    def _run(self) -> None:
        pending: list[dict[str, Any]] = []
        deadline = time.monotonic() + self.flush_seconds
        while True:
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                item = None
            if item is _STOP:
                self._write(pending)
                return
            if isinstance(item, _Flush):
                self._write(pending)
                pending = []
                deadline = time.monotonic() + self.flush_seconds
                item.done.set()
                continue
            if isinstance(item, _Request):
                pending.extend(self._records(item))
            elif item is not None:
                pending.append(item)
            if len(pending) >= self.flush_every or time.monotonic() >= deadline:
                self._write(pending)
                pending = []
                deadline = time.monotonic() + self.flush_seconds

    def _write(self, records: list[dict[str, Any]]) -> None:
        if not records:
            return
        if self.sink is not None:
            self._write_db(records)
            return
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq

            self.folder.mkdir(parents=True, exist_ok=True)
            self._seq += 1
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
            name = f"part-{stamp}-{os.getpid()}-{self._seq:06d}.parquet"
            tmp = self.folder / f".{name}.tmp"
            try:
                pq.write_table(pa.Table.from_pylist(records), tmp)
                os.replace(tmp, self.folder / name)
            finally:
                with contextlib.suppress(OSError):
                    tmp.unlink(missing_ok=True)
            self._count(written=len(records))
            self._bound(keep=name)
        except Exception as err:  # a read-only or full disk: count it, keep serving
            self._count(errors=1)
            self._count(lost=len(records))
            self.last_error = f"write: {type(err).__name__}: {err}"
        self._write_status()

    def _write_db(self, records: list[dict[str, Any]]) -> None:
        """One batch into the database; a failure is counted and the batch dropped."""
        try:
            self.sink.insert(records)
            self._count(written=len(records))
        except Exception as err:  # down, unreachable, refused: count it, keep serving
            self._count(errors=1)
            self._count(lost=len(records))
            self.last_error = f"write: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
        if self.keep_images and self.folder is not None:
            self._bound(keep="")
        self.sink.write_status(self.status())

    def _bound(self, keep: str) -> None:
        """Delete the oldest parts and kept images while they exceed max_bytes (not `keep`)."""
        parts = []

        for path in [*self.folder.glob(PART_GLOB), *self.folder.glob(f"{IMAGES}/*.png")]:
            with contextlib.suppress(OSError):
                stat = path.stat()
                parts.append((stat.st_mtime, path.name, stat.st_size, path))
        parts.sort()
        total = sum(size for _, _, size, _ in parts)
        for _, name, size, path in parts:
            if total <= self.max_bytes:
                break
            if name == keep:
                continue
            try:
                path.unlink()
                total -= size
                self._count(deleted=1)
            except OSError as err:
                self._count(errors=1)
                self.last_error = f"delete: {type(err).__name__}: {err}"

    def _write_status(self) -> None:
        try:
            name = f"status-{os.getpid()}.json"
            tmp = self.folder / f".{name}.tmp"
            tmp.write_text(json.dumps(self.status(), indent=1))
            os.replace(tmp, self.folder / name)
        except Exception:
            pass  # a folder we cannot write: the counters stay readable on the object


def _plain(value: Any) -> Any:
    """numpy scalars → Python ones (pyarrow infers from them either way; NaN stays NaN)."""
    return value.item() if isinstance(value, np.generic) else value
