"""Safe reading of image archives (.zip, .tar.gz/.tgz/.tar) and folders.

A dataset archive comes from outside: an entry named `../../etc/x`, an absolute path, a
link or a device must never be followed or extracted, and a decompression bomb must be
stopped from its headers, before its bytes are read. Every reader in medimg goes through
`iter_members`, so these rules hold for the synthetic, downloaded and local sources alike.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from medimg.config import ArchiveLimits
from medimg.errors import DataError

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")


@dataclass(frozen=True)
class Member:
    """One regular file of an archive: its posix path inside it and its uncompressed size."""

    name: str
    size: int


def archive_kind(path: Path) -> str:
    """'zip', 'tar' or 'dir'; anything else is a DataError naming the path."""
    if path.is_dir():
        return "dir"
    name = path.name.lower()
    if name.endswith(".zip"):
        return "zip"
    if name.endswith((".tar.gz", ".tgz", ".tar")):
        return "tar"
    raise DataError(f"{path}: not a folder or a .zip/.tar.gz archive")


def safe_name(name: str, archive: Path) -> str:
    """Normalise an entry name, refusing absolute paths, drive letters and `..`."""
    clean = name.replace("\\", "/")
    pure = PurePosixPath(clean)
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        raise DataError(f"{archive}: unsafe entry {name!r}: absolute path")
    if ".." in pure.parts:
        raise DataError(f"{archive}: unsafe entry {name!r}: '..' in path")
    return str(pure).lstrip("./") if str(pure) != "." else ""


class _Budget:
    """Counts entries and bytes against the limits before anything is read."""

    def __init__(self, archive: Path, limits: ArchiveLimits) -> None:
        self.archive, self.limits = archive, limits
        self.entries = 0
        self.total = 0

    def take(self, name: str, size: int) -> None:
        self.entries += 1
        self.total += size
        if self.entries > self.limits.max_entries:
            raise DataError(
                f"{self.archive}: more than {self.limits.max_entries} entries "
                "(dataset.limits.max_entries)"
            )
        if self.total > self.limits.max_total_bytes:
            raise DataError(
                f"{self.archive}: uncompressed size passes {self.limits.max_total_bytes} bytes "
                f"at {name!r} (dataset.limits.max_total_bytes)"
            )


def _zip_members(path: Path, budget: _Budget) -> Iterator[tuple[Member, bytes]]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{path}: not a readable zip ({err})") from None
    with zf:
        infos = zf.infolist()
        for info in infos:  # check every header before reading any bytes
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise DataError(f"{path}: unsafe entry {info.filename!r}: symbolic link")
            safe_name(info.filename, path)
            if not info.is_dir():
                budget.take(info.filename, info.file_size)
        for info in infos:
            if info.is_dir():
                continue
            data = zf.read(info)
            if len(data) != info.file_size:
                raise DataError(f"{path}: entry {info.filename!r} size differs from its header")
            yield Member(safe_name(info.filename, path), info.file_size), data


def _tar_members(path: Path, budget: _Budget) -> Iterator[tuple[Member, bytes]]:
    try:
        tf = tarfile.open(path, "r:*")
        members = tf.getmembers()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable tar archive ({err})") from None
    with tf:
        for m in members:
            if m.issym() or m.islnk():
                raise DataError(f"{path}: unsafe entry {m.name!r}: link")
            if not (m.isfile() or m.isdir()):
                raise DataError(f"{path}: unsafe entry {m.name!r}: not a regular file")
            safe_name(m.name, path)
            if m.isfile():
                budget.take(m.name, m.size)
        for m in members:
            if not m.isfile():
                continue
            fh = tf.extractfile(m)
            data = fh.read() if fh else b""
            yield Member(safe_name(m.name, path), m.size), data


def _dir_members(path: Path, budget: _Budget) -> Iterator[tuple[Member, bytes]]:
    files = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_symlink():
            raise DataError(f"{path}: unsafe entry {rel!r}: symbolic link")
        if p.is_file():
            size = p.stat().st_size
            budget.take(rel, size)
            files.append((rel, p, size))
    for rel, p, size in files:
        yield Member(rel, size), p.read_bytes()


def iter_members(path: str | Path, limits: ArchiveLimits) -> Iterator[tuple[Member, bytes]]:
    """Yield (member, bytes) for each regular file, in archive order.

    All headers are checked first (unsafe names, links, entry count, total size), so a bad
    archive fails before a single image is decoded or written anywhere.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    readers = {"zip": _zip_members, "tar": _tar_members, "dir": _dir_members}
    yield from readers[archive_kind(path)](path, _Budget(path, limits))


def list_members(path: str | Path, limits: ArchiveLimits) -> list[Member]:
    return [m for m, _ in iter_members(path, limits)]
