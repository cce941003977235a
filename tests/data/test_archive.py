"""medimg.data.archive refuses hostile archives from their headers, naming the entry at fault."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from medimg.config import ArchiveLimits
from medimg.data.archive import (
    archive_kind,
    iter_members,
    open_zip,
    safe_name,
    scan,
)
from medimg.errors import DataError
from tests.conftest import make_nih_tree, png_bytes, zip_tree

LIMITS = ArchiveLimits()


def _zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return path


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes = b"", **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    tf.addfile(info, io.BytesIO(data) if data else None)


def _refused(path: Path, *fragments: str, limits: ArchiveLimits = LIMITS) -> str:
    """Both readers (bytes and headers-only) refuse, with every fragment in the message."""
    for read in (lambda: list(iter_members(path, limits)), lambda: scan(path, limits)):
        with pytest.raises(DataError) as info:
            read()
        message = str(info.value)
        assert info.value.exit_code == 3
        assert "\n" not in message
        for fragment in fragments:
            assert fragment in message, message
    return message


def test_zip_slip_refused(tmp_path: Path) -> None:
    bad = _zip(tmp_path / "a.zip", {"ok.png": b"x", "../evil.png": b"y"})
    _refused(bad, "'../evil.png'", "'..'")


def test_zip_absolute_entry_refused(tmp_path: Path) -> None:
    bad = _zip(tmp_path / "a.zip", {"/etc/evil.png": b"y"})
    _refused(bad, "'/etc/evil.png'", "absolute path")


def test_zip_windows_drive_entry_refused(tmp_path: Path) -> None:
    bad = _zip(tmp_path / "a.zip", {"C:\\evil.png": b"y"})
    _refused(bad, "evil.png", "absolute path")


def test_zip_symlink_entry_refused(tmp_path: Path) -> None:
    bad = tmp_path / "a.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("cells/ok.png", b"x")
        link = zipfile.ZipInfo("cells/link.png")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    _refused(bad, "'cells/link.png'", "symbolic link")


def test_zip_nothing_read_before_headers_pass(tmp_path: Path) -> None:
    """The unsafe entry comes last: no member is yielded before the refusal."""
    bad = _zip(tmp_path / "a.zip", {"a.png": b"x", "b.png": b"y", "../z.png": b"z"})
    members = iter_members(bad, LIMITS)
    with pytest.raises(DataError):
        next(members)


def test_tar_symlink_refused(tmp_path: Path) -> None:
    bad = tmp_path / "a.tar.gz"
    with tarfile.open(bad, "w:gz") as tf:
        _tar_add(tf, "imgs/ok.png", b"x")
        _tar_add(tf, "imgs/link.png", type=tarfile.SYMTYPE, linkname="/etc/passwd")
    _refused(bad, "'imgs/link.png'", "link")


def test_tar_hardlink_refused(tmp_path: Path) -> None:
    bad = tmp_path / "a.tgz"
    with tarfile.open(bad, "w:gz") as tf:
        _tar_add(tf, "imgs/ok.png", b"x")
        _tar_add(tf, "imgs/hard.png", type=tarfile.LNKTYPE, linkname="imgs/ok.png")
    _refused(bad, "'imgs/hard.png'", "link")


def test_tar_device_and_slip_refused(tmp_path: Path) -> None:
    dev = tmp_path / "dev.tar"
    with tarfile.open(dev, "w") as tf:
        _tar_add(tf, "imgs/null", type=tarfile.CHRTYPE)
    _refused(dev, "'imgs/null'", "not a regular file")
    slip = tmp_path / "slip.tar.gz"
    with tarfile.open(slip, "w:gz") as tf:
        _tar_add(tf, "imgs/../../evil.png", b"x")
    _refused(slip, "'imgs/../../evil.png'")
    absolute = tmp_path / "abs.tar"
    with tarfile.open(absolute, "w") as tf:
        _tar_add(tf, "/tmp/evil.png", b"x")
    _refused(absolute, "'/tmp/evil.png'", "absolute path")


def test_folder_symlink_refused(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    (root / "cls").mkdir(parents=True)
    (root / "cls" / "ok.png").write_bytes(b"x")
    os.symlink("/etc/passwd", root / "cls" / "link.png")
    _refused(root, "'cls/link.png'", "symbolic link")


def test_duplicate_entry_refused(tmp_path: Path) -> None:
    bad = tmp_path / "dup.tar"
    with tarfile.open(bad, "w") as tf:
        _tar_add(tf, "imgs/a.png", b"x")
        _tar_add(tf, "./imgs/a.png", b"evil")
    _refused(bad, "duplicate entry", "a.png")


def test_total_size_bound(tmp_path: Path) -> None:
    big = _zip(tmp_path / "a.zip", {"a.png": b"x" * 600, "b.png": b"y" * 600})
    _refused(
        big, "'b.png'", "1000 bytes", "max_total_bytes", limits=ArchiveLimits(max_total_bytes=1000)
    )


def test_entry_count_bound(tmp_path: Path) -> None:
    many = tmp_path / "many.tar.gz"
    with tarfile.open(many, "w:gz") as tf:
        for k in range(4):
            _tar_add(tf, f"imgs/{k}.png", b"x")
    _refused(many, "'imgs/3.png'", "more than 3 entries", limits=ArchiveLimits(max_entries=3))


def test_size_bound_counts_a_folder_too(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    for k in range(3):
        (root / f"{k}.png").write_bytes(b"x" * 400)
    _refused(root, "'2.png'", "max_total_bytes", limits=ArchiveLimits(max_total_bytes=1000))


def test_non_archive_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    _refused(text, "notes.txt", "not a folder or a .zip/.tar.gz archive")
    fake_zip = tmp_path / "fake.zip"
    fake_zip.write_text("not a zip")
    _refused(fake_zip, "fake.zip", "not a readable zip")
    fake_tar = tmp_path / "fake.tar.gz"
    fake_tar.write_bytes(b"\x1f\x8b garbage")
    _refused(fake_tar, "fake.tar.gz", "not a readable tar")
    _refused(tmp_path / "absent.zip", "absent.zip", "no such file")


def test_corrupt_zip_member_is_a_data_error(tmp_path: Path) -> None:
    good = _zip(tmp_path / "a.zip", {"a.png": png_bytes(seed=1)})
    raw = bytearray(good.read_bytes())
    start = raw.index(b"PK\x03\x04") + 30 + len("a.png")
    raw[start + 40] ^= 0xFF  # flip a payload byte: the CRC no longer matches
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"'a.png' unreadable"):
        list(iter_members(bad, LIMITS))


def test_safe_name_keeps_leading_dots() -> None:
    here = Path("x.zip")
    assert safe_name("./cell_images/.DS_Store", here) == "cell_images/.DS_Store"
    assert safe_name("cell_images\\Parasitized\\a.png", here) == "cell_images/Parasitized/a.png"
    assert safe_name("./", here) == ""


def test_kind_override_reads_a_part_file(tmp_path: Path, nih_zip: Path) -> None:
    part = tmp_path / "images.zip.part"
    part.write_bytes(nih_zip.read_bytes())
    assert len(scan(part, LIMITS, kind="zip")) == 24
    with pytest.raises(DataError, match="not a folder"):
        scan(part, LIMITS)


def test_zip_tar_folder_give_the_same_members(tmp_path: Path) -> None:
    tree = make_nih_tree(tmp_path / "src", per_class=3)
    as_zip = zip_tree(tree, tmp_path / "a.zip")
    as_tar = tmp_path / "a.tar.gz"
    with tarfile.open(as_tar, "w:gz") as tf:
        tf.add(tree / "cell_images", arcname="cell_images")
    readings = [
        sorted((m.name, m.size, data) for m, data in iter_members(p, LIMITS))
        for p in (as_zip, as_tar, tree)
    ]
    assert len(readings[0]) == 6
    assert readings[0] == readings[1] == readings[2]
    assert all(name.startswith("cell_images/") for name, _, _ in readings[0])
    assert sorted((m.name, m.size) for m in scan(as_tar, LIMITS)) == [
        (n, s) for n, s, _ in readings[0]
    ]
    assert [archive_kind(p) for p in (as_zip, as_tar, tree)] == ["zip", "tar", "dir"]


def test_open_zip_reads_entries_by_safe_name_one_at_a_time(tmp_path: Path) -> None:
    a, b = png_bytes(seed=1), png_bytes(seed=2)
    path = _zip(tmp_path / "a.zip", {"./x/a.png": a, "x/b.png": b, "x/": b""})
    with open_zip(path, LIMITS) as images:
        assert sorted(images) == ["x/a.png", "x/b.png"] and len(images) == 2
        assert images["x/b.png"] == b and images["x/a.png"] == a  # any order
        with pytest.raises(DataError, match=r"a.zip: no entry 'x/c.png'"):
            images["x/c.png"]


def test_open_zip_checks_every_header_first(tmp_path: Path) -> None:
    path = _zip(tmp_path / "slip.zip", {"ok.png": png_bytes(), "../evil.png": b"x"})
    with pytest.raises(DataError, match=r"slip.zip: unsafe entry '../evil.png'"):
        open_zip(path, LIMITS).__enter__()
    few = ArchiveLimits(max_entries=1)
    with pytest.raises(DataError, match="max_entries"):
        open_zip(_zip(tmp_path / "n.zip", {"a": b"1", "b": b"2"}), few).__enter__()


def test_open_zip_names_a_corrupt_entry(tmp_path: Path) -> None:
    good = _zip(tmp_path / "a.zip", {"a.png": png_bytes(seed=1)})
    raw = bytearray(good.read_bytes())
    raw[raw.index(b"PK\x03\x04") + 30 + len("a.png") + 40] ^= 0xFF
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(raw))
    with open_zip(bad, LIMITS) as images, pytest.raises(DataError, match=r"'a.png' unreadable"):
        images["a.png"]
