"""The one writer of dataset zips: the same entries give the same bytes on any machine.

Every source (synthetic malaria, synthetic OCT, a re-packed tar or folder) ends as a zip that
DVC hashes; `dvc.lock` stays put only if nothing but the content reaches the file. Entry
times, the creating OS and permissions are fixed here, entries are stored (PNG and JPEG are
already compressed), and a folder entry is written only where the caller lists one.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip can hold: no clock in the bytes
_FILE_MODE = 0o100644 << 16
_DIR_MODE = (0o40755 << 16) | 0x10  # unix mode, plus MS-DOS's directory bit


def zip_entry(name: str) -> zipfile.ZipInfo:
    """Header of one stored entry; a name ending in '/' is a folder."""
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.create_system = 3  # unix: the default depends on the OS the zip is written on
    info.external_attr = _DIR_MODE if name.endswith("/") else _FILE_MODE
    info.compress_type = zipfile.ZIP_STORED
    return info


def write_zip(dest: Path, entries: Iterable[tuple[str, bytes]]) -> None:
    """Write `entries` (name, bytes), in the order given, as a deterministic stored zip.

    Entries are consumed one at a time, so a generator keeps one image in memory.
    """
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries:
            zf.writestr(zip_entry(name), data)
