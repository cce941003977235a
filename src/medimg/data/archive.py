"""Safe reading of image archives (.zip, .tar.gz/.tgz/.tar) and folders.

A dataset archive comes from outside: an entry named `../../etc/x`, an absolute path, a
link or a device must never be followed or extracted, and a decompression bomb must be
stopped from its headers, before its bytes are read. Every reader in medimg goes through
`iter_members` (or `scan` for the headers alone), so these rules hold for the synthetic,
downloaded and local sources alike.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from medimg.config import ArchiveLimits
from medimg.errors import DataError, error_line

# What a truncated or corrupt compressed stream raises while its bytes are read.
_READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError)


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
    # PurePosixPath already drops `./` parts; stripping characters would eat `.DS_Store`'s dot.
    return "" if str(pure) == "." else str(pure)


class _Budget:
    """Counts entries and bytes against the limits before anything is read."""

    def __init__(self, archive: Path, limits: ArchiveLimits) -> None:
        self.archive, self.limits = archive, limits
        self.entries = 0
        self.total = 0
        self.names: set[str] = set()

    def take(self, name: str, size: int) -> Member:
        """Account for one regular file; two entries with one name would make readers disagree."""
        clean = safe_name(name, self.archive)
        if clean in self.names:
            raise DataError(f"{self.archive}: duplicate entry {name!r}")
        self.names.add(clean)
        self.entries += 1
        self.total += size
        if self.entries > self.limits.max_entries:
            raise DataError(
                f"{self.archive}: more than {self.limits.max_entries} entries at {name!r} "
                "(dataset.limits.max_entries)"
            )
        if self.total > self.limits.max_total_bytes:
            raise DataError(
                f"{self.archive}: uncompressed size passes {self.limits.max_total_bytes} bytes "
                f"at {name!r} (dataset.limits.max_total_bytes)"
            )
        return Member(clean, size)


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{path}: not a readable zip ({error_line(err)})") from None


def _zip_headers(
    zf: zipfile.ZipFile, path: Path, budget: _Budget
) -> list[tuple[Member, zipfile.ZipInfo]]:
    files = []
    for info in zf.infolist():
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise DataError(f"{path}: unsafe entry {info.filename!r}: symbolic link")
        if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise DataError(f"{path}: unsafe entry {info.filename!r}: not a regular file")
        safe_name(info.filename, path)
        if not info.is_dir():
            files.append((budget.take(info.filename, info.file_size), info))
    return files


def _zip_members(path: Path, budget: _Budget, read: bool) -> Iterator[tuple[Member, bytes]]:
    with _open_zip(path) as zf:
        files = _zip_headers(zf, path, budget)  # every header before any bytes
        for member, info in files:
            if not read:
                yield member, b""
                continue
            try:
                data = zf.read(info)
            except (*_READ_ERRORS, NotImplementedError) as err:
                why = error_line(err)
                raise DataError(f"{path}: entry {info.filename!r} unreadable ({why})") from None
            if len(data) != member.size:
                raise DataError(f"{path}: entry {info.filename!r} size differs from its header")
            yield member, data


def _tar_headers(
    tf: tarfile.TarFile, path: Path, budget: _Budget
) -> list[tuple[Member, tarfile.TarInfo]]:
    files = []
    for m in tf.getmembers():
        if m.issym() or m.islnk():
            raise DataError(f"{path}: unsafe entry {m.name!r}: link")
        if not (m.isfile() or m.isdir()):
            raise DataError(f"{path}: unsafe entry {m.name!r}: not a regular file")
        safe_name(m.name, path)
        if m.isfile():
            files.append((budget.take(m.name, m.size), m))
    return files


def _open_tar(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:*")
    except _READ_ERRORS as err:
        raise DataError(f"{path}: not a readable tar archive ({error_line(err)})") from None


def _tar_members(path: Path, budget: _Budget, read: bool) -> Iterator[tuple[Member, bytes]]:
    with _open_tar(path) as tf:
        try:
            files = _tar_headers(tf, path, budget)
        except _READ_ERRORS as err:
            raise DataError(f"{path}: not a readable tar archive ({error_line(err)})") from None
        for member, info in files:
            if not read:
                yield member, b""
                continue
            try:  # by TarInfo, not by name: a name lookup scans every member
                fh = tf.extractfile(info)
                data = fh.read() if fh else b""
            except _READ_ERRORS as err:
                raise DataError(
                    f"{path}: entry {info.name!r} unreadable ({error_line(err)})"
                ) from None
            yield member, data


def _dir_members(path: Path, budget: _Budget, read: bool) -> Iterator[tuple[Member, bytes]]:
    files = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_symlink():
            raise DataError(f"{path}: unsafe entry {rel!r}: symbolic link")
        if p.is_file():
            files.append((budget.take(rel, p.stat().st_size), p))
    for member, p in files:
        yield member, (p.read_bytes() if read else b"")


def _members(
    path: str | Path, limits: ArchiveLimits, kind: str | None, read: bool
) -> Iterator[tuple[Member, bytes]]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    readers = {"zip": _zip_members, "tar": _tar_members, "dir": _dir_members}
    yield from readers[kind or archive_kind(path)](path, _Budget(path, limits), read)


def iter_members(
    path: str | Path, limits: ArchiveLimits, kind: str | None = None
) -> Iterator[tuple[Member, bytes]]:
    """Yield (member, bytes) for each regular file, in archive order.

    All headers are checked first (unsafe names, links, duplicates, entry count, total size),
    so a bad archive fails before a single image is decoded or written anywhere. `kind`
    ('zip' or 'tar') is for files whose name does not say, such as a download's `.part`.
    """
    yield from _members(path, limits, kind, read=True)


def scan(path: str | Path, limits: ArchiveLimits, kind: str | None = None) -> list[Member]:
    """The same header checks as `iter_members`, without reading or decompressing any bytes."""
    return [m for m, _ in _members(path, limits, kind, read=False)]


class ZipImages(Mapping[str, bytes]):
    """A checked zip as a read-only name → bytes mapping, read one entry at a time.

    The split stage writes its shards in shuffled order; a dict of every image would make its
    memory grow with the dataset (1 GB RSS on 19k cells). A zip's central directory gives
    random access instead, so only the entry being written is in memory.
    """

    def __init__(self, zf: zipfile.ZipFile, path: Path, infos: dict[str, zipfile.ZipInfo]):
        self._zf, self._path, self._infos = zf, path, infos

    def __getitem__(self, name: str) -> bytes:
        info = self._infos.get(name)
        if info is None:
            raise DataError(f"{self._path}: no entry {name!r}")
        try:
            data = self._zf.read(info)
        except (*_READ_ERRORS, NotImplementedError) as err:
            raise DataError(
                f"{self._path}: entry {name!r} unreadable ({error_line(err)})"
            ) from None
        if len(data) != info.file_size:
            raise DataError(f"{self._path}: entry {name!r} size differs from its header")
        return data

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)


@contextmanager
def open_zip(path: str | Path, limits: ArchiveLimits) -> Iterator[ZipImages]:
    """Random access to a zip's regular files by their safe names, after the header checks."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    with _open_zip(path) as zf:
        infos = {m.name: info for m, info in _zip_headers(zf, path, _Budget(path, limits))}
        yield ZipImages(zf, path, infos)
