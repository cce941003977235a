"""The `download` stage: url (a real HTTP server on 127.0.0.1), local and synthetic sources.

Every failure must be one line naming what is wrong, exit with code 3 through `stage_main`,
and leave the earlier `images.zip` exactly as it was.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import tarfile
import threading
import types
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from medimg import download
from medimg.cli import stage_main
from medimg.config import Params, SyntheticConfig, parse_params
from medimg.download import fetch, run
from medimg.errors import DataError
from tests.conftest import make_nih_tree, png_bytes, shared_file, zip_tree

DEV_ZIP_SHA = "6e71bf8dd2f1e7bfadf1ba4bdbf919230bb4912d09e61039ef1279aa19f893f5"


# --- a real HTTP server ----------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    """Serves `files`; can cut the first response, ignore Range, or fail the first request."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {}
        self.cut_after: int | None = None
        self.ignore_range = False
        self.send_length = True
        self.fail_first: int | None = None
        self.log: list[tuple[str | None, int]] = []  # (Range header, status) per request

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        srv = self.server
        first = not srv.log
        rng = self.headers.get("Range")
        data = srv.files.get(self.path.lstrip("/"))
        if data is None or (first and srv.fail_first):
            status = 404 if data is None else srv.fail_first
            srv.log.append((rng, status))
            self.send_error(status)
            return
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        if rng and not srv.ignore_range and start >= len(data):
            srv.log.append((rng, 416))
            self._head(416, {"Content-Range": f"bytes */{len(data)}", "Content-Length": "0"})
            return
        if not rng or srv.ignore_range:
            start, status, extra = 0, 200, {}
        else:
            status, extra = 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        body = data[start:]
        if srv.send_length:
            extra["Content-Length"] = str(len(body))
        srv.log.append((rng, status))
        self._head(status, extra)
        if first and srv.cut_after is not None:
            body = body[: srv.cut_after]  # then the connection closes: a cut download
        self.wfile.write(body)

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def _fast_backoff(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Retries wait a few milliseconds; the delays asked for are recorded."""
    delays: list[float] = []
    monkeypatch.setattr(download, "BACKOFF_S", 0.001)
    monkeypatch.setattr(download.time, "sleep", lambda s: delays.append(s))
    return delays


# --- helpers ---------------------------------------------------------------------------------


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _payload(tmp_path: Path) -> bytes:
    """A real, safe NIH-layout zip of a few hundred kilobytes."""
    tree = make_nih_tree(tmp_path / "payload", per_class=4, size=64)
    return zip_tree(tree, tmp_path / "payload.zip").read_bytes()


def _raw(tmp_path: Path) -> Path:
    return tmp_path / "data" / "raw"


def _params(tmp_path: Path, **dataset: Any) -> dict[str, Any]:
    return {"paths": {"raw": str(_raw(tmp_path))}, "dataset": dataset}


def _url_params(tmp_path: Path, url: str, data: bytes, **extra: Any) -> Params:
    ds = {"source": "url", "url": url, "size_bytes": len(data), "sha256": _sha(data)}
    ds.update({"retries": 0, "timeout_s": 5} | extra)
    return parse_params(_params(tmp_path, **ds))


def _earlier(tmp_path: Path) -> tuple[Path, bytes, int]:
    """An images.zip from a previous run, which a failed run must not touch."""
    dest = _raw(tmp_path) / "images.zip"
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = b"previous archive"
    dest.write_bytes(old)
    os.utime(dest, ns=(1_000_000_000, 1_000_000_000))
    return dest, old, dest.stat().st_mtime_ns


def _assert_untouched(dest: Path, old: bytes, mtime: int) -> None:
    assert dest.read_bytes() == old
    assert dest.stat().st_mtime_ns == mtime


def _stage_exit(tmp_path: Path, params: dict[str, Any], capsys: pytest.CaptureFixture) -> tuple:
    """Run the stage as DVC would; return its exit code and its stderr."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit) as info:
        stage_main("download", ["--params", str(path)])
    return info.value.code, capsys.readouterr().err


def _zip_contents(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist() if not i.is_dir()}


def _leftovers(raw: Path) -> list[str]:
    return sorted(p.name for p in raw.iterdir()) if raw.exists() else []


# --- url -------------------------------------------------------------------------------------


def test_cut_download_resumes_in_the_next_run(tmp_path: Path, server: _Server) -> None:
    data = _payload(tmp_path)
    server.files["images.zip"] = data
    server.cut_after = len(data) // 3
    params = _url_params(tmp_path, server.url("images.zip"), data)
    with pytest.raises(DataError) as info:
        run(params)
    assert str(info.value).startswith(f"{server.url('images.zip')}: download failed after 1")
    part = _raw(tmp_path) / "images.zip.part"
    have = part.stat().st_size
    assert 0 < have < len(data)
    assert not (_raw(tmp_path) / "images.zip").exists()

    summary = run(params)
    assert server.log[1] == (f"bytes={have}-", 206)
    dest = _raw(tmp_path) / "images.zip"
    assert _sha(dest.read_bytes()) == _sha(data) == summary["sha256"]
    assert summary["members"] == 8
    assert _leftovers(_raw(tmp_path)) == ["images.zip"]


def test_cut_download_resumes_within_one_run(
    tmp_path: Path, server: _Server, _fast_backoff: list[float]
) -> None:
    data = _payload(tmp_path)
    server.files["images.zip"] = data
    server.cut_after = 5000
    fetch(
        server.url("images.zip"),
        tmp_path / "out.zip",
        size=len(data),
        sha256=_sha(data),
        retries=2,
        timeout=5,
        progress=False,
    )
    assert server.log == [(None, 200), ("bytes=5000-", 206)]
    assert _sha((tmp_path / "out.zip").read_bytes()) == _sha(data)
    assert _fast_backoff == [0.001]


def test_sha_mismatch_exits_3_and_keeps_earlier_archive(
    tmp_path: Path, server: _Server, capsys: pytest.CaptureFixture
) -> None:
    data = _payload(tmp_path)
    server.files["images.zip"] = data
    dest, old, mtime = _earlier(tmp_path)
    wrong = "0" * 64
    params = _params(
        tmp_path,
        source="url",
        url=server.url("images.zip"),
        size_bytes=len(data),
        sha256=wrong,
        retries=0,
    )
    code, err = _stage_exit(tmp_path, params, capsys)
    assert code == 3
    assert err.count("\n") == 1
    assert err.startswith(f"error: {server.url('images.zip')}: sha256 mismatch")
    assert f"expected {wrong}, got {_sha(data)}" in err
    _assert_untouched(dest, old, mtime)
    assert _leftovers(_raw(tmp_path)) == ["images.zip"]  # the bad .part is gone


def test_size_mismatch_refused_from_headers(tmp_path: Path, server: _Server) -> None:
    data = _payload(tmp_path)
    server.files["images.zip"] = data
    dest, old, mtime = _earlier(tmp_path)
    params = _url_params(tmp_path, server.url("images.zip"), data, size_bytes=len(data) + 10)
    with pytest.raises(DataError) as info:
        run(params)
    assert str(info.value) == (
        f"{server.url('images.zip')}: size mismatch: "
        f"expected {len(data) + 10} bytes, server has {len(data)}"
    )
    _assert_untouched(dest, old, mtime)
    assert _leftovers(_raw(tmp_path)) == ["images.zip"]


def test_size_mismatch_found_after_download(tmp_path: Path, server: _Server) -> None:
    """Without a Content-Length the size is only known at the end; the file is not kept."""
    data = _payload(tmp_path)
    server.files["images.zip"] = data
    server.send_length = False
    params = _url_params(tmp_path, server.url("images.zip"), data, size_bytes=len(data) - 1)
    with pytest.raises(DataError, match=rf"expected {len(data) - 1} bytes, got {len(data)}$"):
        run(params)
    assert _leftovers(_raw(tmp_path)) == []


def test_server_answering_200_to_range_restarts_from_zero(tmp_path: Path, server: _Server) -> None:
    data = _payload(tmp_path)
    server.files["images.zip"] = data
    server.ignore_range = True
    part = _raw(tmp_path) / "images.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"garbage that is not a prefix")
    run(_url_params(tmp_path, server.url("images.zip"), data))
    assert server.log == [("bytes=28-", 200)]
    assert (_raw(tmp_path) / "images.zip").read_bytes() == data


def test_complete_part_file_gets_416_and_is_installed(tmp_path: Path, server: _Server) -> None:
    data = _payload(tmp_path)
    server.files["images.zip"] = data
    part = _raw(tmp_path) / "images.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data)
    run(_url_params(tmp_path, server.url("images.zip"), data))
    assert server.log == [(f"bytes={len(data)}-", 416)]
    assert (_raw(tmp_path) / "images.zip").read_bytes() == data
    assert not part.exists()


def test_retries_exhausted_when_server_is_down(
    tmp_path: Path, capsys: pytest.CaptureFixture, _fast_backoff: list[float]
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/images.zip"
    dest, old, mtime = _earlier(tmp_path)
    params = _url_params(tmp_path, url, b"x" * 10, retries=3)
    with pytest.raises(DataError) as info:
        run(params)
    message = str(info.value)
    assert message.startswith(f"{url}: download failed after 4 attempt(s): ")
    assert "Connection refused" in message or "ConnectionError" in message
    assert "\n" not in message
    assert _fast_backoff == [0.001, 0.002, 0.004]  # exponential back-off
    assert capsys.readouterr().err.count("retrying in") == 3
    _assert_untouched(dest, old, mtime)


def test_server_error_is_retried(tmp_path: Path, server: _Server) -> None:
    data = _payload(tmp_path)
    server.files["images.zip"] = data
    server.fail_first = 503
    run(_url_params(tmp_path, server.url("images.zip"), data, retries=1))
    assert [status for _, status in server.log] == [503, 200]


def test_not_found_is_not_retried(tmp_path: Path, server: _Server) -> None:
    params = _url_params(tmp_path, server.url("missing.zip"), b"x", retries=5)
    with pytest.raises(DataError, match=r"/missing.zip: HTTP 404"):
        run(params)
    assert len(server.log) == 1


def test_unsafe_downloaded_archive_refused(tmp_path: Path, server: _Server) -> None:
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("cell_images/ok.png", png_bytes(seed=1))
        zf.writestr("../evil.png", b"x")
    data = evil.read_bytes()
    server.files["images.zip"] = data
    dest, old, mtime = _earlier(tmp_path)
    with pytest.raises(DataError, match=r"unsafe entry '\.\./evil\.png'"):
        run(_url_params(tmp_path, server.url("images.zip"), data))
    _assert_untouched(dest, old, mtime)
    assert _leftovers(_raw(tmp_path)) == ["images.zip"]


def test_downloaded_tar_is_repacked(tmp_path: Path, server: _Server) -> None:
    tree = make_nih_tree(tmp_path / "src", per_class=2)
    tgz = tmp_path / "cells.tar.gz"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(tree / "cell_images", arcname="cell_images")
    server.files["cells.tar.gz"] = tgz.read_bytes()
    run(_url_params(tmp_path, server.url("cells.tar.gz"), tgz.read_bytes()))
    dest = _raw(tmp_path) / "images.zip"
    assert _zip_contents(dest) == {
        p.relative_to(tree).as_posix(): p.read_bytes() for p in tree.rglob("*.png")
    }
    assert _leftovers(_raw(tmp_path)) == ["images.zip"]


# --- local -----------------------------------------------------------------------------------


def test_local_zip_copied_byte_identical(tmp_path: Path, nih_zip: Path) -> None:
    before = (nih_zip.read_bytes(), nih_zip.stat().st_mtime_ns)
    summary = run(parse_params(_params(tmp_path, source="local", path=str(nih_zip))))
    dest = _raw(tmp_path) / "images.zip"
    assert dest.read_bytes() == before[0]
    assert (nih_zip.read_bytes(), nih_zip.stat().st_mtime_ns) == before
    assert summary["members"] == 24
    assert summary["sha256"] == _sha(before[0])


def _tar_of(tree: Path, dest: Path, reverse: bool) -> Path:
    files = sorted(tree.rglob("*.png"), reverse=reverse)
    with tarfile.open(dest, "w:gz") as tf:
        for p in files:
            tf.add(p, arcname=p.relative_to(tree).as_posix())
    return dest


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "out-of-order"])
def test_local_tar_repacked_deterministically(tmp_path: Path, reverse: bool) -> None:
    tree = make_nih_tree(tmp_path / "src", per_class=3)
    tgz = _tar_of(tree, tmp_path / "cells.tgz", reverse)
    params = parse_params(_params(tmp_path, source="local", path=str(tgz)))
    run(params)
    dest = _raw(tmp_path) / "images.zip"
    first = dest.read_bytes()
    expected = {p.relative_to(tree).as_posix(): p.read_bytes() for p in tree.rglob("*.png")}
    assert _zip_contents(dest) == expected
    with zipfile.ZipFile(dest) as zf:
        infos = zf.infolist()
    assert [i.filename for i in infos] == sorted(expected)
    assert {(i.compress_type, i.date_time) for i in infos} == {
        (zipfile.ZIP_STORED, (1980, 1, 1, 0, 0, 0))
    }
    run(params)
    assert dest.read_bytes() == first  # deterministic: the same bytes, so DVC sees no change
    assert _leftovers(_raw(tmp_path)) == ["images.zip"]


def test_local_folder_repacked(tmp_path: Path) -> None:
    tree = make_nih_tree(tmp_path / "src", per_class=3)
    summary = run(parse_params(_params(tmp_path, source="local", path=str(tree))))
    expected = {p.relative_to(tree).as_posix(): p.read_bytes() for p in tree.rglob("*.png")}
    assert _zip_contents(_raw(tmp_path) / "images.zip") == expected
    assert summary["members"] == 6


def test_local_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "nowhere" / "cells.zip"
    code, err = _stage_exit(tmp_path, _params(tmp_path, source="local", path=str(missing)), capsys)
    assert code == 3
    assert err == f"error: dataset.path {missing}: no such file or folder\n"
    assert _leftovers(_raw(tmp_path)) == []


def test_local_unsafe_tar_refused_keeps_earlier(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar.gz"
    with tarfile.open(bad, "w:gz") as tf:
        info = tarfile.TarInfo("cell_images/Parasitized/link.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    dest, old, mtime = _earlier(tmp_path)
    with pytest.raises(DataError) as err:
        run(parse_params(_params(tmp_path, source="local", path=str(bad))))
    assert str(err.value) == f"{bad}: unsafe entry 'cell_images/Parasitized/link.png': link"
    _assert_untouched(dest, old, mtime)
    assert _leftovers(_raw(tmp_path)) == ["images.zip"]


def test_local_limits_apply(tmp_path: Path, nih_zip: Path) -> None:
    limits = {"max_entries": 10}
    params = parse_params(_params(tmp_path, source="local", path=str(nih_zip), limits=limits))
    with pytest.raises(DataError, match=r"more than 10 entries .*max_entries"):
        run(params)
    assert _leftovers(_raw(tmp_path)) == []


def test_local_not_an_archive(tmp_path: Path) -> None:
    text = tmp_path / "cells.txt"
    text.write_text("no")
    with pytest.raises(DataError, match=r"not a folder or a \.zip/\.tar\.gz archive"):
        run(parse_params(_params(tmp_path, source="local", path=str(text))))


def test_local_without_path_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, err = _stage_exit(tmp_path, _params(tmp_path, source="local"), capsys)
    assert code == 2
    assert "dataset" in err and "needs dataset.path" in err
    assert err.count("\n") == 1
    assert _leftovers(_raw(tmp_path)) == []


# --- synthetic -------------------------------------------------------------------------------


def test_synthetic_dispatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def generate(dest: Path, cfg: SyntheticConfig, seed: int) -> dict:
        calls.append((dest.name, cfg, seed))
        zip_tree(make_nih_tree(tmp_path / "gen", per_class=2), dest)
        return {}

    monkeypatch.setitem(
        sys.modules, "medimg.data.synthetic", types.SimpleNamespace(generate=generate)
    )
    params = parse_params(_params(tmp_path) | {"seed": 7})
    summary = run(params)
    assert calls == [("images.zip", params.dataset.synthetic, 7)]
    assert summary["members"] == 4
    assert _leftovers(_raw(tmp_path)) == ["images.zip"]


def test_synthetic_failure_keeps_earlier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def generate(dest: Path, cfg: SyntheticConfig, seed: int) -> dict:
        dest.write_bytes(b"half a zip")
        raise DataError("generator broke")

    monkeypatch.setitem(
        sys.modules, "medimg.data.synthetic", types.SimpleNamespace(generate=generate)
    )
    dest, old, mtime = _earlier(tmp_path)
    with pytest.raises(DataError, match="generator broke"):
        run(parse_params(_params(tmp_path)))
    _assert_untouched(dest, old, mtime)
    assert _leftovers(_raw(tmp_path)) == ["images.zip"]


def test_real_synthetic_generator(tmp_path: Path) -> None:
    small = {"patients": 2, "cells_per_patient": [2, 3], "size_range": [32, 40]}
    summary = run(parse_params(_params(tmp_path, synthetic=small)))
    assert summary["source"] == "synthetic"
    assert 4 <= summary["members"] <= 6 + 2  # the cells (+ any junk files the generator adds)


# --- real data -------------------------------------------------------------------------------


def test_real_malaria_dev_zip(tmp_path: Path) -> None:
    src = shared_file("malaria/cell_images_dev.zip")
    summary = run(parse_params(_params(tmp_path, source="local", path=str(src))))
    assert summary["sha256"] == DEV_ZIP_SHA  # copied byte for byte
    with zipfile.ZipFile(_raw(tmp_path) / "images.zip") as zf:
        pngs = [n for n in zf.namelist() if n.endswith(".png")]
    assert len(pngs) == 6000
    assert {n.split("/")[1] for n in pngs} == {"Parasitized", "Uninfected"}


def test_real_oct_sample_tar(tmp_path: Path) -> None:
    src = shared_file("oct/OCT2017_sample.tar.gz")
    summary = run(parse_params(_params(tmp_path, source="local", path=str(src))))
    names = list(_zip_contents(_raw(tmp_path) / "images.zip"))
    assert summary["members"] == len(names) == 32
    assert all(n.startswith("OCT2017/val/") and n.endswith(".jpeg") for n in names)
    assert {n.split("/")[2] for n in names} == {"CNV", "DME", "DRUSEN", "NORMAL"}
