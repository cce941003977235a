"""The manifest of a raw archive: one row per member, built in parallel, and the frame the
expectation suite checks.

Statuses: `ok` (checked, usable), `junk` (not an image, never fatal), `corrupt` (empty,
undecodable, or over `dataset.limits.max_image_pixels`), `rejected` (decodable but flagged by a
failed expectation). The columns and dtypes (`MANIFEST_DTYPES`) are the contract the split
stage reads.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
from PIL import Image, UnidentifiedImageError

from medimg.config import ArchiveLimits, SplitConfig, ValidateConfig
from medimg.data.archive import iter_members
from medimg.data.images import IMAGE_SUFFIXES
from medimg.errors import ConfigError
from medimg.io import atomic_path, progress

# The manifest contract the split stage reads: column -> pandas dtype, in this order.
MANIFEST_DTYPES: dict[str, str] = {
    "path": "str",
    "class": "str",
    "split_folder": "str",
    "patient": "str",
    "format": "str",
    "width": "Int64",
    "height": "Int64",
    "mode": "str",
    "channels": "Int64",
    "bytes": "int64",
    "sha256": "str",
    "decodable": "bool",
    "error": "str",
    "status": "str",
}
MANIFEST_COLUMNS = tuple(MANIFEST_DTYPES)

NOT_DECODED: Mapping[str, Any] = {
    "format": None,
    "width": None,
    "height": None,
    "mode": None,
    "channels": None,
    "decodable": False,
    "error": None,
}

# ---------------------------------------------------------------- manifest


def is_junk(path: str, junk_names: Collection[str]) -> bool:
    """Not an image at all: OS droppings and AppleDouble forks would otherwise count as corrupt."""
    pure = PurePosixPath(path)
    if pure.name in junk_names or pure.name.startswith("._") or "__MACOSX" in pure.parts:
        return True
    return pure.suffix.lower() not in IMAGE_SUFFIXES


def inspect_image(data: bytes, max_pixels: int) -> dict[str, Any]:
    """Header first, then a full decode: a bomb is refused from its header, truncation is caught.

    Any decoder exception means the bytes are not a usable image, whatever its type, so all are
    caught and recorded rather than crashing the stage on hostile data.
    """
    info = dict(NOT_DECODED)
    if not data:
        return {**info, "error": "empty file (0 bytes)"}
    try:
        with Image.open(io.BytesIO(data)) as img:
            info.update(
                format=img.format,
                width=img.width,
                height=img.height,
                mode=img.mode,
                channels=len(img.getbands()),
            )
            pixels = img.width * img.height
            if pixels > max_pixels:
                return {
                    **info,
                    "error": f"{img.width}x{img.height} = {pixels} pixels is over "
                    f"dataset.limits.max_image_pixels ({max_pixels}); not decoded",
                }
            img.load()
    except UnidentifiedImageError:  # its message holds a memory address: keep reports stable
        return {**info, "error": "UnidentifiedImageError: not a recognised image format"}
    except Image.DecompressionBombError as err:
        return {**info, "error": f"{err} (dataset.limits.max_image_pixels); not decoded"}
    except Exception as err:
        return {**info, "error": f"{type(err).__name__}: {err}"}
    return {**info, "decodable": True}


def compile_patient_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"validate.patient_regex: not a valid regex ({err})") from None


def patient_id(file_name: str, pattern: re.Pattern[str]) -> str | None:
    """Group 1 of the pattern, searched like GX's regex expectation does, so both agree."""
    match = pattern.search(file_name)
    if not match:
        return None
    return match.group(1) if pattern.groups else match.group(0)


def manifest_row(
    name: str,
    data: bytes,
    cfg: ValidateConfig,
    limits: ArchiveLimits,
    pattern: re.Pattern[str],
    split_folders: Collection[str],
) -> dict[str, Any]:
    """Everything the suite and the split stage need to know about one archive member."""
    parts = PurePosixPath(name).parts
    junk = is_junk(name, cfg.junk_names)
    image = NOT_DECODED if junk else inspect_image(data, limits.max_image_pixels)
    status = "junk" if junk else ("ok" if image["decodable"] else "corrupt")
    return {
        "path": name,
        "class": parts[-2] if len(parts) >= 2 else "",
        "split_folder": parts[-3] if len(parts) >= 3 and parts[-3] in split_folders else None,
        "patient": patient_id(parts[-1], pattern),
        **image,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "status": status,
    }


def _member_count(archive: Path) -> int | None:
    """A total for the progress bar where it costs nothing (a zip's central directory)."""
    if archive.suffix.lower() != ".zip":
        return None
    try:
        with zipfile.ZipFile(archive) as zf:
            return sum(not info.is_dir() for info in zf.infolist())
    except (zipfile.BadZipFile, OSError):
        return None


def _ordered_parallel(
    fn: Callable[[str, bytes], dict[str, Any]],
    items: Iterable[tuple[str, bytes]],
    workers: int,
) -> Iterator[dict[str, Any]]:
    """Map in a thread pool, in archive order, holding only a bounded window of bytes in memory.

    Threads are enough: PIL's decoders, zlib and hashlib release the GIL while they work.
    """
    window = max(8, workers * 4)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for name, data in items:
            pending.append(pool.submit(fn, name, data))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def manifest_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Fixed columns and dtypes, so an all-None column still has the contract's Parquet type."""
    frame = pd.DataFrame(list(rows), columns=list(MANIFEST_COLUMNS))
    return frame.astype(MANIFEST_DTYPES)


def build_manifest(
    archive: Path,
    cfg: ValidateConfig,
    limits: ArchiveLimits,
    dataset: str,
    split_folders: Collection[str] | None = None,
) -> pd.DataFrame:
    """One row per regular file of the archive (junk and corrupt included, with their status).

    `split_folders` are the folder names that mark a predefined split (default: the values of
    `split.predefined_folders`); `run` passes the ones from params.
    """
    archive = Path(archive)
    pattern = compile_patient_pattern(cfg.patient_pattern(dataset))
    folders = frozenset(
        SplitConfig().predefined_folders.values() if split_folders is None else split_folders
    )
    workers = cfg.workers or os.cpu_count() or 1

    def row(name: str, data: bytes) -> dict[str, Any]:
        return manifest_row(name, data, cfg, limits, pattern, folders)

    Image.init()  # load every format plugin now, not racing in the first worker threads
    members = ((m.name, data) for m, data in iter_members(archive, limits))
    bar = progress(
        _ordered_parallel(row, members, workers),
        total=_member_count(archive),
        desc=f"manifest {archive.name}",
        unit="file",
    )
    return manifest_frame(bar)


# ---------------------------------------------------------------- policy and checked frame


def corrupt_within_policy(manifest: pd.DataFrame, cfg: ValidateConfig) -> bool:
    """True when the corrupt share of images (junk aside) is small enough to just exclude."""
    images = int((manifest["status"] != "junk").sum())
    corrupt = int((manifest["status"] == "corrupt").sum())
    return images == 0 or corrupt / images <= cfg.max_corrupt_fraction


def checked_frame(manifest: pd.DataFrame, cfg: ValidateConfig) -> pd.DataFrame:
    """The rows the suite sees, plus helper columns that turn group checks into row checks.

    Corrupt rows stay in (and fail `decodable`) only when their share is over the policy.
    Class counts are computed over the expected classes only, so an unexpected folder fails
    the class-set check alone instead of also skewing the count and balance checks.
    """
    keep = manifest["status"] != "junk"
    if corrupt_within_policy(manifest, cfg):
        keep &= manifest["status"] != "corrupt"
    frame = manifest.loc[keep].reset_index(drop=True)
    expected = frame["class"].isin(cfg.classes)
    counts = frame.loc[expected, "class"].value_counts()
    class_images = frame["class"].map(counts).where(expected).astype("Int64")
    frame["known_class"] = frame["class"].where(expected)
    frame["class_images"] = class_images
    frame["class_imbalance"] = (counts.max() / class_images).astype("Float64")
    frame["file"] = frame["path"].map(lambda p: PurePosixPath(p).name).astype("str")
    decoded = frame.loc[frame["decodable"]]
    per_sha = decoded.groupby("sha256")["class"].nunique()
    frame["sha256_classes"] = frame["sha256"].map(per_sha).where(frame["decodable"]).astype("Int64")
    return frame


def write_manifest(manifest: pd.DataFrame, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        manifest.to_parquet(tmp, index=False)
