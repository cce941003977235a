"""The served model's request log: Parquet parts, off the request path, never failing a request."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pandas as pd
import pytest

from medimg.data.properties import PROPERTIES, image_properties
from medimg.monitoring.request_log import RequestLog, pixels_sha256


def image(seed: int, h: int = 20, w: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def answer(n: int) -> pd.DataFrame:
    p = np.linspace(0.1, 0.9, n)
    return pd.DataFrame(
        {
            "class": np.where(p >= 0.5, "Parasitized", "Uninfected"),
            "probability": np.maximum(p, 1 - p),
            "p_Parasitized": p,
            "threshold": 0.5,
        }
    )


def parts(folder) -> list:
    return sorted(folder.glob("part-*.parquet"))


def test_records_are_written_as_parquet_with_expected_columns(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIMG_REQUEST_LOG", str(tmp_path / "log"))
    monkeypatch.setenv("MEDIMG_MODEL_NAME", "malaria-classifier")
    monkeypatch.setenv("MEDIMG_MODEL_VERSION", "3")
    monkeypatch.delenv("MEDIMG_MODEL_ALIAS", raising=False)
    log = RequestLog.from_env(flush_seconds=60)
    images = [image(1), image(2, 30, 17), image(1).astype(np.float32)]
    log.log_request(images, answer(3))
    assert log.flush()
    log.close()

    files = parts(tmp_path / "log")
    assert len(files) == 1 and not list((tmp_path / "log").glob(".*tmp"))
    rows = pd.read_parquet(files[0])
    expected = {"time", "model_id", "model_name", "model_version", "model_alias", "sha256"}
    expected |= {"decision"}
    expected |= set(PROPERTIES) | {"probability", "p_Parasitized", "threshold"}
    assert set(rows.columns) == expected
    assert len(rows) == 3
    assert str(rows["time"].dt.tz) == "UTC"
    assert list(rows["model_name"]) == ["malaria-classifier"] * 3
    assert list(rows["model_version"]) == ["3"] * 3 and rows["model_alias"].isna().all()
    assert list(rows["sha256"]) == [pixels_sha256(x) for x in images]
    assert rows["sha256"][0] == rows["sha256"][2]  # same pixels as uint8 or float: same hash
    assert list(rows["height"]) == [20, 30, 20] and list(rows["width"]) == [24, 17, 24]
    assert rows["brightness"][1] == pytest.approx(image_properties(images[1])["brightness"])
    assert list(rows["decision"]) == list(answer(3)["class"])
    np.testing.assert_allclose(rows["p_Parasitized"], answer(3)["p_Parasitized"])
    status = json.loads((tmp_path / "log" / f"status-{os.getpid()}.json").read_text())
    assert status["written"] == 3 and status["errors"] == 0 and status["dropped"] == 0


def test_logging_is_off_without_the_env_var(monkeypatch):
    monkeypatch.delenv("MEDIMG_REQUEST_LOG", raising=False)
    assert RequestLog.from_env() is None


def test_time_based_flush_writes_without_an_explicit_flush(tmp_path):
    log = RequestLog(tmp_path, flush_every=1000, flush_seconds=0.2)
    log.log_request([image(1)], answer(1))
    deadline = time.monotonic() + 10
    while not parts(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    log.close()
    assert len(parts(tmp_path)) == 1


def unwritable(tmp_path):
    """A read-only folder; as root (where chmod does not bind) a *file* where the folder goes."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    if not os.access(folder, os.W_OK):
        return folder
    folder.chmod(0o700)
    folder.rmdir()
    folder.write_text("not a folder")
    return folder


def test_a_write_error_is_counted_and_never_raised(tmp_path):
    folder = unwritable(tmp_path)
    try:
        log = RequestLog(folder, flush_seconds=60)
        log.log_request([image(1), image(2)], answer(2))  # returns: no exception
        assert log.flush()
        log.log_request([image(3)], answer(1))
        assert log.flush()
        log.close()
        assert log.errors == 2 and log.lost == 3 and log.written == 0
        assert log.last_error and log.last_error.startswith("write:")
    finally:
        if folder.is_dir():
            folder.chmod(0o700)
    assert not folder.is_dir() or not parts(folder)


def test_the_folder_is_bounded_by_deleting_the_oldest_parts(tmp_path):
    log = RequestLog(tmp_path, max_mb=1e-9, flush_seconds=60)  # any part is over the bound
    for i in range(3):
        log.log_request([image(i)], answer(1))
        assert log.flush()
        time.sleep(0.01)
    first = parts(tmp_path)
    log.close()
    assert len(first) == 1  # only the newest part is kept
    assert log.deleted == 2 and log.written == 3
    assert pd.read_parquet(first[0])["sha256"][0] == pixels_sha256(image(2))

    roomy = RequestLog(tmp_path / "roomy", max_mb=512, flush_seconds=60)
    for i in range(3):
        roomy.log_request([image(i)], answer(1))
        assert roomy.flush()
    roomy.close()
    assert len(parts(tmp_path / "roomy")) == 3 and roomy.deleted == 0


def test_a_full_queue_drops_and_counts_without_waiting(tmp_path):
    log = RequestLog(tmp_path, queue_size=2, flush_seconds=60, start=False)
    started = time.monotonic()
    for i in range(5):  # one request of one image each; no writer running: 2 fit
        log.log_request([image(i)], answer(1))
    assert time.monotonic() - started < 1.0
    assert log.logged == 2 and log.dropped == 3
    log.start()
    assert log.flush()
    log.close()
    assert len(pd.read_parquet(parts(tmp_path)[0])) == 2
    assert json.loads((tmp_path / f"status-{os.getpid()}.json").read_text())["dropped"] == 3


def test_a_record_that_cannot_be_built_is_dropped_not_raised(tmp_path):
    log = RequestLog(tmp_path, flush_seconds=60)
    log.log_request([np.zeros((4, 4))[..., None][..., :0]], answer(1))  # no channels
    log.log_request(None, answer(1))  # type: ignore[arg-type]
    log.close()
    assert log.dropped == 2 and log.written == 0


def test_queued_pixels_are_bounded_in_bytes(tmp_path):
    log = RequestLog(tmp_path, max_queued_mb=2000 / 2**20, flush_seconds=60, start=False)
    log.log_request([image(1), image(2)], answer(2))  # 2 x 1440 bytes: over 2000
    log.log_request([image(3)], answer(1))
    assert log.dropped == 2 and log.logged == 1 and log.queued_bytes == 1440
    log.start()
    assert log.flush()
    log.close()
    assert log.queued_bytes == 0 and log.written == 1


# ------------------------------------------------- embeddings, kept images, model id, bounds


def embedding_reference(d: int = 6, k: int = 3) -> dict:
    """A monitoring reference with only what the log reads: its embedding PCA."""
    from medimg.monitoring.reference import fit_embedding

    features = np.random.default_rng(0).normal(size=(40, d)) * np.arange(d, 0, -1)
    return {"embedding": fit_embedding(features, components=k)}


def read_all(folder) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in parts(folder)], ignore_index=True)


def test_embeddings_are_logged_as_the_references_components(tmp_path):
    from medimg.monitoring.reference import project

    reference = embedding_reference()
    rng = np.random.default_rng(1)
    features = rng.normal(size=(5, 6))
    log = RequestLog(tmp_path, flush_seconds=60, reference=reference)
    log.log_request([image(1), image(2)], answer(2), features[:2])  # one (N, D) array
    # the served model's form: a list of (batch, D) embedding batches, of uneven sizes
    log.log_request([image(3), image(4), image(5)], answer(3), [features[2:4], features[4:]])
    assert log.flush()
    log.close()

    rows = read_all(tmp_path)
    emb = [c for c in rows.columns if c.startswith("emb_")]
    assert emb == ["emb_0", "emb_1", "emb_2"]
    expected = project(reference["embedding"], features)
    for name in emb:
        np.testing.assert_allclose(rows[name], expected[name], rtol=1e-12)
    assert log.errors == 0 and log.written == 5


@pytest.mark.parametrize(
    "features",
    [np.ones((2, 7)), np.ones((2, 5)), np.ones((1, 6)), np.ones((3, 6))],
    ids=["too-wide", "too-narrow", "too-few", "too-many"],
)
def test_a_wrong_embedding_shape_is_counted_and_the_records_still_written(tmp_path, features):
    log = RequestLog(tmp_path, flush_seconds=60, reference=embedding_reference())
    log.log_request([image(1), image(2)], answer(2), features)
    assert log.flush()
    log.close()
    assert log.errors == 1 and log.last_error.startswith("embedding:")
    assert log.written == 2 and log.lost == 0 and log.dropped == 0
    rows = read_all(tmp_path)
    assert len(rows) == 2 and not [c for c in rows.columns if c.startswith("emb_")]
    assert list(rows["sha256"]) == [pixels_sha256(image(1)), pixels_sha256(image(2))]


def test_without_a_reference_or_embeddings_no_component_is_logged(tmp_path):
    plain = RequestLog(tmp_path / "plain", flush_seconds=60)  # no reference
    plain.log_request([image(1)], answer(1), np.ones((1, 6)))
    with_ref = RequestLog(tmp_path / "ref", flush_seconds=60, reference=embedding_reference())
    with_ref.log_request([image(1)], answer(1))  # no embeddings (the model has none)
    for log in (plain, with_ref):
        assert log.flush()
        log.close()
        assert log.errors == 0 and log.written == 1
        assert not [c for c in read_all(log.folder).columns if c.startswith("emb_")]


def test_kept_images_are_content_addressed_pngs_of_the_same_pixels(tmp_path):
    from PIL import Image

    log = RequestLog(tmp_path, flush_seconds=60, keep_images=True)
    log.log_request([image(1), image(2, 30, 17)], answer(2))
    assert log.flush()
    # the same pixels again (as floats, and as uint8 in a later part): no second file
    log.log_request([image(1).astype(np.float32), image(1)], answer(2))
    log.close()
    assert log.errors == 0

    rows = read_all(tmp_path)
    shas = [pixels_sha256(image(1)), pixels_sha256(image(2, 30, 17))]
    assert list(rows["image_file"]) == [f"images/{shas[i]}.png" for i in (0, 1, 0, 0)]
    kept = sorted((tmp_path / "images").iterdir())
    assert [p.name for p in kept] == sorted(f"{s}.png" for s in shas)
    for rel, original in [
        (rows["image_file"][0], image(1)),
        (rows["image_file"][1], image(2, 30, 17)),
    ]:
        with Image.open(tmp_path / rel) as img:
            assert img.format == "PNG"
            decoded = np.asarray(img)
        np.testing.assert_array_equal(decoded, original)
        assert pixels_sha256(decoded) == (tmp_path / rel).stem


def test_images_are_not_kept_unless_asked(tmp_path):
    log = RequestLog(tmp_path, flush_seconds=60)
    log.log_request([image(1)], answer(1))
    log.close()
    assert "image_file" not in read_all(tmp_path).columns
    assert not (tmp_path / "images").exists()


def test_an_image_that_cannot_be_kept_is_counted_and_its_record_written(tmp_path):
    (tmp_path / "images").write_text("a file where the images folder goes")
    log = RequestLog(tmp_path, flush_seconds=60, keep_images=True)
    log.log_request([image(1)], answer(1))
    log.close()
    assert log.errors == 1 and log.last_error.startswith("image:")
    rows = read_all(tmp_path)
    assert log.written == 1 and rows["image_file"].isna().all()
    assert list(rows["sha256"]) == [pixels_sha256(image(1))]


@pytest.mark.parametrize(
    ("env", "argument", "kept"),
    [
        ("1", False, True),
        ("true", False, True),
        (" YES ", False, True),
        ("0", True, False),
        ("false", True, False),
        ("No", True, False),
        (None, True, True),
        (None, False, False),
        ("", True, True),
    ],
)
def test_keep_images_env_overrides_the_models_setting(tmp_path, monkeypatch, env, argument, kept):
    monkeypatch.setenv("MEDIMG_REQUEST_LOG", str(tmp_path))
    if env is None:
        monkeypatch.delenv("MEDIMG_REQUEST_LOG_KEEP_IMAGES", raising=False)
    else:
        monkeypatch.setenv("MEDIMG_REQUEST_LOG_KEEP_IMAGES", env)
    log = RequestLog.from_env(keep_images=argument, flush_seconds=60)
    log.log_request([image(1)], answer(1))
    log.close()
    assert log.keep_images is kept
    assert (tmp_path / "images" / f"{pixels_sha256(image(1))}.png").exists() is kept
    assert ("image_file" in read_all(tmp_path).columns) is kept


def test_the_model_id_lands_in_its_column(tmp_path):
    log = RequestLog(tmp_path / "a", flush_seconds=60, model_id="m-0123abc")
    log.log_request([image(1), image(2)], answer(2))
    log.close()
    assert list(read_all(tmp_path / "a")["model_id"]) == ["m-0123abc"] * 2
    unknown = RequestLog(tmp_path / "b", flush_seconds=60)
    unknown.log_request([image(1)], answer(1))
    unknown.close()
    assert read_all(tmp_path / "b")["model_id"].isna().all()


def test_the_folder_bound_also_deletes_kept_images(tmp_path):
    log = RequestLog(tmp_path, max_mb=1e-9, flush_seconds=60, keep_images=True)
    for i in range(3):
        log.log_request([image(i)], answer(1))
        assert log.flush()
        time.sleep(0.01)
    log.close()
    assert len(parts(tmp_path)) == 1 and not list((tmp_path / "images").glob("*.png"))
    assert log.written == 3 and log.errors == 0

    roomy = RequestLog(tmp_path / "roomy", max_mb=512, flush_seconds=60, keep_images=True)
    for i in range(3):
        roomy.log_request([image(i)], answer(1))
        assert roomy.flush()
    roomy.close()
    assert len(list((tmp_path / "roomy" / "images").glob("*.png"))) == 3 and roomy.deleted == 0
