"""Atomic writes: a stage either leaves its complete output or none at all.

Everything is written next to its destination under a temporary name and moved into place
with `os.replace`, so a crash or a failed check never leaves a half-written file where DVC
or the next stage would read it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(dest: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary sibling path; on success it replaces `dest`, on error it is removed.

    `suffix` is for writers that insist on an extension (Keras wants `.keras`).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix, dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_umask())  # mkstemp's 0600 would make outputs private
    try:
        yield tmp_path
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces `dest` as a whole on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(dest: str | Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text(dest: str | Path, text: str) -> None:
    write_bytes(dest, text.encode())


def write_json(dest: str | Path, obj: Any) -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


# A progress bar redraws ~10 times a second on a terminal; in a log file each redraw is kept,
# so off a terminal it appears only once a job has run LOG_PROGRESS_SECONDS and then redraws
# at most that often: nothing for a short job, a few lines for a long one.
LOG_PROGRESS_SECONDS = 30.0


def progress(
    iterable: Any = None,
    total: int | None = None,
    desc: str | None = None,
    unit: str = "it",
    enabled: bool = True,
    **kwargs: Any,
) -> Any:
    """A tqdm bar on stderr: live on a terminal; in a log, a line per 30 s of a long job."""
    import sys

    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        disable=not enabled,
        mininterval=0.1 if tty else LOG_PROGRESS_SECONDS,
        maxinterval=10.0 if tty else LOG_PROGRESS_SECONDS * 4,
        delay=0.0 if tty else LOG_PROGRESS_SECONDS,
        dynamic_ncols=tty,
        ascii=not tty,
        **kwargs,
    )
