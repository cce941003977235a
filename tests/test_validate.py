"""The `validate` stage: manifest contract, corrupt/junk policy, the GX suite and its outputs."""

from __future__ import annotations

import json
import re
import shutil
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import yaml

from medimg.cli import stage_main
from medimg.config import ArchiveLimits, ValidateConfig, load_params
from medimg.data.archive import iter_members
from medimg.data.manifest import (
    MANIFEST_COLUMNS,
    build_manifest,
    inspect_image,
    is_junk,
    patient_id,
)
from medimg.validate import run
from tests.conftest import (
    REPO,
    make_nih_tree,
    nih_name,
    png_bytes,
    shared_file,
    tmp_params_dict,
    zip_tree,
)

# Real NIH names also start `C37BP2_`, `C1ThinF_`, `C5thin_original`: only `C<number>` is common.
NIH_ANY_NAME = r"^(C\d+)"


def write_params(tmp_path: Path, **sections: dict) -> Path:
    """A params.yaml whose every path lives in tmp_path; `validate` is relaxed for tiny data."""
    sections["validate"] = {"min_per_class": 2, **sections.get("validate", {})}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tmp_params_dict(tmp_path, **sections)))
    return path


def raw_zip(tmp_path: Path, extra: dict[str, bytes] | None = None, **tree: int) -> Path:
    """An NIH tree (12 + 12 images, 6 patients) plus `extra` files, zipped as the raw input."""
    src = make_nih_tree(tmp_path / "src", **tree)
    for rel, data in (extra or {}).items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    dest = tmp_path / "data" / "raw" / "images.zip"
    dest.parent.mkdir(parents=True, exist_ok=True)
    return zip_tree(src, dest)


def manifest_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "validated" / "manifest.parquet"


def report(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "reports" / "validation.json").read_text())


def run_stage(params_file: Path) -> None:
    stage_main("validate", ["--params", str(params_file)])


def fails(tmp_path: Path, params_file: Path, capsys: pytest.CaptureFixture) -> str:
    """Run the stage expecting exit 3 and no manifest; return stderr for the caller's checks."""
    with pytest.raises(SystemExit) as exc:
        run_stage(params_file)
    assert exc.value.code == 3
    assert not manifest_path(tmp_path).exists()
    rep = report(tmp_path)
    assert rep["success"] is False and rep["failed_expectations"]
    err = capsys.readouterr().err
    assert "error: validation failed:" in err
    assert "data_docs/index.html" in err
    assert (tmp_path / "reports" / "data_docs" / "index.html").exists()
    return err


def succeeds(tmp_path: Path, params_file: Path) -> pd.DataFrame:
    run_stage(params_file)
    rep = report(tmp_path)
    assert rep["success"] is True and rep["failed_expectations"] == []
    return pd.read_parquet(manifest_path(tmp_path))


BAD = f"cell_images/Uninfected/{nih_name(100, 999)}"


# ---------------------------------------------------------------- pure pieces


def test_junk_names_and_extensions() -> None:
    junk = ["Thumbs.db", ".DS_Store"]
    assert is_junk("cell_images/Parasitized/Thumbs.db", junk)
    assert is_junk("cell_images/Parasitized/notes.txt", junk)
    assert is_junk("__MACOSX/cell_images/Parasitized/._a.png", junk)
    assert not is_junk("cell_images/Parasitized/C1P1_cell_1.PNG", junk)


def test_patient_from_file_name() -> None:
    cfg = ValidateConfig()
    nih = re.compile(cfg.patient_pattern("malaria"))
    oct_ = re.compile(cfg.patient_pattern("oct2017"))
    assert patient_id("C33P1thinF_IMG_20150619_114756a_cell_179.png", nih) == "C33"
    assert patient_id("CNV-6294785-1.jpeg", oct_) == "6294785"
    assert patient_id("readme.png", nih) is None


def test_pixel_bound_is_checked_before_decoding() -> None:
    info = inspect_image(png_bytes(64), max_pixels=1000)
    assert info["decodable"] is False and (info["width"], info["height"]) == (64, 64)
    assert "dataset.limits.max_image_pixels" in info["error"]


def test_manifest_columns_and_rows(tmp_path: Path, nih_zip: Path) -> None:
    frame = build_manifest(nih_zip, ValidateConfig(workers=2), ArchiveLimits(), "malaria")
    assert tuple(frame.columns) == MANIFEST_COLUMNS
    assert len(frame) == 24 and set(frame["status"]) == {"ok"}
    row = frame.iloc[0]
    assert row["format"] == "PNG" and row["mode"] == "RGB" and row["channels"] == 3
    assert row["width"] == 32 and row["decodable"] and pd.isna(row["split_folder"])
    assert frame["patient"].nunique() == 6 and frame["sha256"].str.len().eq(64).all()


# ---------------------------------------------------------------- the stage on tiny zips


def test_thumbs_db_is_counted_not_fatal(tmp_path: Path) -> None:
    raw_zip(
        tmp_path,
        {
            f"cell_images/{c}/Thumbs.db": b"\xd0\xcf\x11\xe0 not an image"
            for c in ("Parasitized", "Uninfected")
        },
    )
    frame = succeeds(tmp_path, write_params(tmp_path))  # on an empty gx folder
    assert (tmp_path / "gx" / "great_expectations.yml").exists()
    assert frame["status"].value_counts().to_dict() == {"ok": 24, "junk": 2}
    assert set(frame["status"]) <= {"ok", "junk", "corrupt", "rejected"}
    rep = report(tmp_path)
    assert (rep["images"], rep["valid"], rep["junk"], rep["corrupt"]) == (24, 24, 2, 0)
    assert rep["patients"] == 6 and rep["per_class"] == {"Parasitized": 12, "Uninfected": 12}
    assert (tmp_path / "reports" / "data_docs" / "index.html").exists()


def test_corrupt_png_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = bytearray(png_bytes(32, seed=999))
    data[len(data) // 3 : len(data) // 3 + 64] = b"\xff" * 64  # garbage inside the pixel data
    raw_zip(tmp_path, {BAD: bytes(data)})
    err = fails(tmp_path, write_params(tmp_path), capsys)
    assert "images decode [validate.max_corrupt_fraction]: 1 unexpected" in err
    assert f"{BAD}: OSError: unrecognized data stream" in err


def test_truncated_png_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = png_bytes(32, seed=999)
    raw_zip(tmp_path, {BAD: data[: len(data) // 2]})
    err = fails(tmp_path, write_params(tmp_path), capsys)
    assert "images decode" in err and "truncated" in err


def test_zero_byte_file_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw_zip(tmp_path, {BAD: b""})
    err = fails(tmp_path, write_params(tmp_path), capsys)
    assert "empty file (0 bytes)" in err


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_mode_outside_policy_fails(tmp_path: Path, capsys, mode: str) -> None:
    raw_zip(tmp_path, {BAD: png_bytes(32, mode, seed=999)})
    err = fails(tmp_path, write_params(tmp_path), capsys)
    assert f"mode = {mode}" in err and "mode in set [validate.modes]" in err
    assert report(tmp_path)["rejected"] == 1


def test_modes_allowed_by_params_pass(tmp_path: Path) -> None:
    modes = ["L", "RGBA", "I;16"]
    extra = {
        f"cell_images/Uninfected/{nih_name(100, 900 + i)}": png_bytes(32, m, seed=900 + i)
        for i, m in enumerate(modes)
    }
    raw_zip(tmp_path, extra)
    frame = succeeds(tmp_path, write_params(tmp_path, validate={"modes": ["RGB", *modes]}))
    assert set(frame["mode"]) == {"RGB", *modes}
    assert frame.set_index("mode")["channels"].to_dict() == {"RGB": 3, "L": 1, "RGBA": 4, "I;16": 1}


def test_image_over_pixel_bound_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    raw_zip(tmp_path, {BAD: png_bytes(64, seed=999)})
    params = write_params(tmp_path, dataset={"limits": {"max_image_pixels": 2000}})
    err = fails(tmp_path, params, capsys)
    assert "dataset.limits.max_image_pixels" in err and "64x64" in err


def test_empty_class_folder_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = make_nih_tree(tmp_path / "src", classes=("Parasitized",))
    dest = tmp_path / "data" / "raw" / "images.zip"
    dest.parent.mkdir(parents=True)
    zip_tree(src, dest)
    with zipfile.ZipFile(dest, "a") as zf:
        zf.writestr("cell_images/Uninfected/", b"")  # a folder entry, no files in it
    err = fails(tmp_path, write_params(tmp_path), capsys)
    assert "all classes present [validate.classes]: observed 1" in err
    assert "missing class 'Uninfected'" in err


def test_unexpected_class_folder_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    extra = {
        f"cell_images/Unsure/{nih_name(101, 700 + k)}": png_bytes(seed=700 + k) for k in range(3)
    }
    raw_zip(tmp_path, extra)
    err = fails(tmp_path, write_params(tmp_path), capsys)
    assert "classes [validate.classes]: 3 unexpected" in err and "(class = Unsure)" in err
    assert [f["check"] for f in report(tmp_path)["failed_expectations"]] == ["classes"]


def test_same_image_in_two_classes_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    copy = f"cell_images/Uninfected/{nih_name(100, 998)}"
    raw_zip(tmp_path, {copy: png_bytes(32, seed=1)})  # seed 1 is the first Parasitized image
    err = fails(tmp_path, write_params(tmp_path), capsys)
    assert "no image in two classes" in err and copy in err


def test_corrupt_within_fraction_is_excluded_and_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raw_zip(tmp_path, {BAD: b"not a png at all"})
    frame = succeeds(tmp_path, write_params(tmp_path, validate={"max_corrupt_fraction": 0.1}))
    corrupt = frame[frame["status"] == "corrupt"]
    assert corrupt["path"].tolist() == [BAD] and not corrupt["decodable"].any()
    rep = report(tmp_path)
    assert rep["valid"] == 24 and rep["corrupt"] == 1 and rep["corrupt_files"][0]["path"] == BAD
    assert BAD in capsys.readouterr().err


def test_failure_leaves_earlier_manifest_untouched(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    raw_zip(tmp_path, {BAD: png_bytes(32, "L", seed=999)})
    earlier = manifest_path(tmp_path)
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"the manifest of an earlier, valid archive")
    before = earlier.stat().st_mtime_ns
    with pytest.raises(SystemExit) as exc:
        run_stage(write_params(tmp_path))
    assert exc.value.code == 3
    assert earlier.read_bytes() == b"the manifest of an earlier, valid archive"
    assert earlier.stat().st_mtime_ns == before
    assert "mode in set" in capsys.readouterr().err


def test_committed_context_is_reused_without_churn(tmp_path: Path) -> None:
    """Reruns leave the committed GX files and the JSON metric byte-identical for DVC."""
    committed = REPO / "gx"
    if not (committed / "great_expectations.yml").exists():
        pytest.skip("no committed gx/ context")
    shutil.copytree(committed, tmp_path / "gx", ignore=shutil.ignore_patterns("uncommitted"))
    raw_zip(tmp_path)
    params = load_params(write_params(tmp_path))
    first = run(params)
    assert first == report(tmp_path) and first["success"] is True
    snapshot = tracked_files(tmp_path / "gx")
    metric = (tmp_path / "reports" / "validation.json").read_bytes()
    run(params)
    assert tracked_files(tmp_path / "gx") == snapshot
    assert (tmp_path / "reports" / "validation.json").read_bytes() == metric


def tracked_files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "uncommitted" not in p.parts
    }


# ---------------------------------------------------------------- real data


def test_real_dev_zip(tmp_path: Path) -> None:
    dest = tmp_path / "data" / "raw" / "images.zip"
    dest.parent.mkdir(parents=True)
    shutil.copy(shared_file("malaria/cell_images_dev.zip"), dest)
    params = load_params(write_params(tmp_path, validate={"patient_regex": NIH_ANY_NAME}))
    start = time.perf_counter()
    out = run(params)  # the whole stage: manifest, suite and Data Docs on 6,000 rows
    took = time.perf_counter() - start
    print(f"validate on {dest.name}: {out['files']} files in {took:.1f} s")
    assert took < 60
    assert (out["valid"], out["patients"], out["junk"], out["corrupt"]) == (6000, 140, 0, 0)
    assert out["per_class"] == {"Parasitized": 3000, "Uninfected": 3000}
    frame = pd.read_parquet(manifest_path(tmp_path))
    assert len(frame) == 6000 and set(frame["width"]) == {128} and set(frame["mode"]) == {"RGB"}


def test_real_fullres_zip(tmp_path: Path) -> None:
    dest = tmp_path / "data" / "raw" / "images.zip"
    dest.parent.mkdir(parents=True)
    shutil.copy(shared_file("malaria/cell_images_fullres.zip"), dest)
    params = write_params(
        tmp_path,
        validate={"patient_regex": NIH_ANY_NAME, "width": [64, 256], "height": [64, 256]},
    )
    frame = succeeds(tmp_path, params)
    rep = report(tmp_path)
    assert rep["valid"] == 200 and rep["patients"] == 7
    assert frame["width"].between(64, 256).all()


def test_real_oct_sample(tmp_path: Path) -> None:
    sample = shared_file("oct/OCT2017_sample.tar.gz")
    dest = tmp_path / "data" / "raw" / "images.zip"
    dest.parent.mkdir(parents=True)
    with zipfile.ZipFile(dest, "w") as zf:
        for member, data in iter_members(sample, ArchiveLimits()):
            zf.writestr(member.name, data)
    params = write_params(
        tmp_path,
        dataset={"name": "oct2017"},
        validate={
            "classes": ["CNV", "DME", "DRUSEN", "NORMAL"],
            "modes": ["L"],
            "formats": ["JPEG"],
            "min_per_class": 8,
        },
    )
    frame = succeeds(tmp_path, params)
    assert report(tmp_path)["valid"] == 32
    assert set(frame["split_folder"]) == {"val"} and frame["patient"].str.fullmatch(r"\d+").all()
    assert load_params(params).paths.manifest == manifest_path(tmp_path)
