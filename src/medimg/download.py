"""DVC stage `download`: put the dataset archive in place as one file, `data/raw/images.zip`.

Every source (synthetic, url, local) is normalised to a zip so the later stages read one
format and DVC tracks one file. Nothing reaches `images.zip` before it has passed the
`medimg.data.archive` header checks (and, for a download, its pinned size and sha256), and it only
ever appears there by `os.replace`: a failed run leaves the previous archive as it was.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests
import urllib3

from medimg.config import ArchiveLimits, DatasetConfig, Params
from medimg.data.archive import Member, archive_kind, iter_members, scan
from medimg.data.packing import write_zip
from medimg.errors import DataError, error_line
from medimg.io import atomic_path
from medimg.io import progress as progress_bar

CHUNK = 1 << 20
BACKOFF_S = 1.0  # first retry delay; doubles per attempt (tests shrink it)
MAX_BACKOFF_S = 60.0
_TRANSIENT = (requests.RequestException, urllib3.exceptions.HTTPError)


class _Retry(Exception):
    """A failed attempt worth repeating (dropped connection, 5xx, an inconsistent resume)."""


# --- url -------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _content_range_total(resp: requests.Response) -> int | None:
    """The full size from `Content-Range: bytes a-b/N` or `bytes */N`, when the server says."""
    total = resp.headers.get("Content-Range", "").rpartition("/")[2]
    return int(total) if total.isdigit() else None


def _content_range_start(resp: requests.Response) -> int | None:
    unit_range = resp.headers.get("Content-Range", "").partition("/")[0]
    start = unit_range.removeprefix("bytes ").partition("-")[0].strip()
    return int(start) if start.isdigit() else None


def _check_status(resp: requests.Response, url: str) -> None:
    """Client errors are final (a wrong URL stays wrong); server errors are worth a retry."""
    code = resp.status_code
    if code in (200, 206, 416):
        return
    message = f"HTTP {code} {resp.reason}"
    if code >= 500 or code in (408, 429):
        raise _Retry(message)
    raise DataError(f"{url}: {message}")


def _check_announced_size(resp: requests.Response, url: str, size: int) -> None:
    """Refuse a wrong file from its headers instead of after hundreds of megabytes."""
    if resp.status_code == 206:
        total = _content_range_total(resp)
    else:
        length = resp.headers.get("Content-Length", "")
        total = int(length) if length.isdigit() else None
    if total is not None and total != size:
        raise DataError(f"{url}: size mismatch: expected {size} bytes, server has {total}")


def _open_mode(resp: requests.Response, part: Path, have: int) -> str | None:
    """'ab' to resume, 'wb' to restart, None when `part` is already the whole file."""
    if resp.status_code == 416:
        if _content_range_total(resp) in (have, None) and have > 0:
            return None
        part.unlink(missing_ok=True)  # the partial file is longer than the server's
        raise _Retry(f"range {have}- refused; restarting from zero")
    if resp.status_code == 206 and _content_range_start(resp) != have:
        part.unlink(missing_ok=True)
        raise _Retry(f"server resumed at {_content_range_start(resp)}, not {have}")
    return "ab" if resp.status_code == 206 else "wb"  # 200 to a Range request: start over


def _stream(resp: requests.Response, part: Path, mode: str, size: int, progress: bool) -> None:
    """Raw bytes (no content decoding): what lands in `part` is what the sha256 pins."""
    bar = progress_bar(
        total=size,
        initial=part.stat().st_size if mode == "ab" else 0,
        unit="B",
        unit_scale=True,
        desc=part.name,
        enabled=progress,
    )
    with bar, part.open(mode) as fh:
        for block in resp.raw.stream(CHUNK, decode_content=False):
            fh.write(block)
            bar.update(len(block))


def _attempt(url: str, part: Path, size: int, timeout: float, progress: bool) -> None:
    """One HTTP request; resumes from the bytes already in `part`."""
    have = part.stat().st_size if part.exists() else 0
    if have > size:  # cannot be a prefix of the pinned file
        part.unlink()
        have = 0
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as resp:
        _check_status(resp, url)
        mode = _open_mode(resp, part, have)
        if mode is None:
            return
        _check_announced_size(resp, url, size)
        _stream(resp, part, mode, size, progress)


def _download(
    url: str, part: Path, *, size: int, retries: int, timeout: float, progress: bool, backoff: float
) -> None:
    attempts = retries + 1
    for attempt in range(1, attempts + 1):
        try:
            _attempt(url, part, size, timeout, progress)
            return
        except (_Retry, *_TRANSIENT) as err:
            if attempt == attempts:
                raise DataError(
                    f"{url}: download failed after {attempts} attempt(s): {error_line(err)}"
                ) from None
            delay = min(backoff * 2 ** (attempt - 1), MAX_BACKOFF_S)
            print(
                f"download: attempt {attempt}/{attempts} failed ({error_line(err)}); "
                f"retrying in {delay:g}s",
                file=sys.stderr,
            )
            time.sleep(delay)


def _verify(part: Path, url: str, size: int, sha256: str) -> None:
    """A file that fails its pin is removed, so the next run does not resume from it."""
    actual_size = part.stat().st_size
    if actual_size != size:
        part.unlink()
        raise DataError(f"{url}: size mismatch: expected {size} bytes, got {actual_size}")
    actual_sha = sha256_file(part)
    if actual_sha != sha256:
        part.unlink()
        raise DataError(f"{url}: sha256 mismatch: expected {sha256}, got {actual_sha}")


def fetch(
    url: str,
    dest: str | Path,
    *,
    size: int,
    sha256: str,
    retries: int = 5,
    timeout: float = 60.0,
    progress: bool = True,
    backoff: float | None = None,
    check: Callable[[Path], object] | None = None,
) -> Path:
    """Download `url` to `dest` through a resumable `<dest>.part`, moved in only once pinned.

    The `.part` survives a failed transfer so the next run asks for the rest with a Range
    request; one that fails its size, sha256 or `check` is deleted, and `dest` is untouched.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    _download(
        url,
        part,
        size=size,
        retries=retries,
        timeout=timeout,
        progress=progress,
        backoff=BACKOFF_S if backoff is None else backoff,
    )
    _verify(part, url, size, sha256)
    if check is not None:
        try:
            check(part)
        except DataError:
            part.unlink(missing_ok=True)
            raise
    os.replace(part, dest)
    return dest


def _url_kind(url: str) -> str:
    """The archive type from the URL's path; a path that does not say is taken as a zip."""
    name = Path(urlparse(url).path).name.lower()
    return "tar" if name.endswith((".tar.gz", ".tgz", ".tar")) else "zip"


def _from_url(ds: DatasetConfig, dest: Path, progress: bool) -> list[Member]:
    """A zip is checked as `.part` and moved in; a tar is fetched aside, then re-packed."""
    kind = _url_kind(ds.url)
    target = dest if kind == "zip" else dest.with_name(f".{dest.stem}.source.tar.gz")
    fetch(
        ds.url,
        target,
        size=ds.size_bytes,
        sha256=ds.sha256,
        retries=ds.retries,
        timeout=ds.timeout_s,
        progress=progress,
        check=lambda part: scan(part, ds.limits, kind),
    )
    if kind == "zip":
        return scan(dest, ds.limits, "zip")
    try:
        return _install(target, dest, ds.limits, "tar")
    finally:
        target.unlink(missing_ok=True)


# --- local and re-packing --------------------------------------------------------------------


def _write_zip(dest: Path, members: Iterable[tuple[Member, bytes]]) -> None:
    write_zip(dest, ((member.name, data) for member, data in members))


def _sorted_members(
    src: Path, limits: ArchiveLimits, kind: str, names: list[str], scratch: Path
) -> Iterator[tuple[Member, bytes]]:
    """Members in name order without holding them all in memory.

    A compressed tar can only be read front to back, so one out of order is staged through a
    scratch zip, which can be read in any order.
    """
    if names == sorted(names):
        yield from iter_members(src, limits, kind)
        return
    stage = scratch / "stage.zip"
    _write_zip(stage, iter_members(src, limits, kind))
    with zipfile.ZipFile(stage) as zf:
        for name in sorted(names):
            data = zf.read(name)
            yield Member(name, len(data)), data


def _repack(src: Path, tmp: Path, limits: ArchiveLimits, kind: str) -> None:
    """A tar or a folder becomes a deterministic stored zip: sorted names, fixed times."""
    names = [m.name for m in scan(src, limits, kind)]  # refuses unsafe entries before writing
    with tempfile.TemporaryDirectory(prefix=".repack.", dir=tmp.parent) as scratch:
        _write_zip(tmp, _sorted_members(src, limits, kind, names, Path(scratch)))


def _install(src: Path, dest: Path, limits: ArchiveLimits, kind: str) -> list[Member]:
    """Copy a zip or re-pack anything else into `dest`; checked before it replaces `dest`."""
    with atomic_path(dest) as tmp:
        if kind == "zip":
            scan(src, limits, "zip")
            shutil.copyfile(src, tmp)
        else:
            _repack(src, tmp, limits, kind)
        return scan(tmp, limits, "zip")


def _from_local(ds: DatasetConfig, dest: Path) -> list[Member]:
    src = Path(ds.path or "")
    if not src.exists():
        raise DataError(f"dataset.path {src}: no such file or folder")
    return _install(src, dest, ds.limits, archive_kind(src))


# --- synthetic -------------------------------------------------------------------------------


def _from_synthetic(params: Params, dest: Path) -> list[Member]:
    """The offline generator of the dataset: NIH-like cells, or OCT2017-like B-scans for an
    `oct*` dataset (imported here: numpy and PIL work only this source needs)."""
    with tempfile.TemporaryDirectory(prefix=".synthetic.", dir=dest.parent) as scratch:
        built = Path(scratch) / dest.name
        if params.dataset.name.startswith("oct"):
            from medimg.data.synthetic_oct import generate as generate_oct

            generate_oct(built, params.dataset.synthetic_oct, params.seed)
        else:
            from medimg.data.synthetic import generate

            generate(built, params.dataset.synthetic, params.seed)
        return _install(built, dest, params.dataset.limits, "zip")


# --- stage -----------------------------------------------------------------------------------


def _human(n: int) -> str:
    scaled = float(n)
    for unit in ("B", "KB", "MB"):
        if scaled < 1000:
            return f"{n} B" if unit == "B" else f"{scaled:.1f} {unit}"
        scaled /= 1000
    return f"{scaled:.1f} GB"


def run(params: Params, progress: bool = True) -> dict[str, Any]:
    """Put `paths.raw_archive` in place from `dataset.source`; returns a summary."""
    ds = params.dataset
    dest = Path(params.paths.raw_archive)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if ds.source == "synthetic":
        members = _from_synthetic(params, dest)
    elif ds.source == "url":
        members = _from_url(ds, dest, progress)
    else:
        members = _from_local(ds, dest)
    summary = {
        "source": ds.source,
        "origin": {"synthetic": "synthetic", "url": ds.url, "local": ds.path}[ds.source],
        "path": str(dest),
        "bytes": dest.stat().st_size,
        "sha256": sha256_file(dest),
        "members": len(members),
    }
    print(
        f"download: {ds.source} {summary['origin']} -> {dest} "
        f"({summary['members']} files, {_human(summary['bytes'])}, "
        f"sha256 {summary['sha256'][:12]})"
    )
    return summary
