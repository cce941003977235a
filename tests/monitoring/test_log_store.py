"""Reading the request log back: the window of one model's requests (by id, name, version,
time, last N), parts of different schemas read as one table, clear errors for a folder that
cannot give a window, and the writers' health counters summed over serving processes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medimg.monitoring.log_store import LogError, log_health, read_window
from medimg.monitoring.reference import fit_embedding, project
from medimg.monitoring.request_log import RequestLog, pixels_sha256

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def at(minute: float) -> datetime:
    return T0 + timedelta(minutes=minute)


def row(minute: float, model_id: str | None = "m1", **extra) -> dict:
    """One logged request as `RequestLog` writes it (time: tz-aware UTC, microseconds)."""
    return {
        "time": at(minute),
        "model_id": model_id,
        "model_name": "malaria",
        "model_version": "3",
        "sha256": f"{model_id}-{minute}",
        "brightness": float(minute),
        "decision": "Parasitized",
        **extra,
    }


def write_part(folder, name: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / f"part-{name}.parquet")


def minutes(frame: pd.DataFrame) -> list[float]:
    return [(t - T0).total_seconds() / 60 for t in frame["time"]]


@pytest.fixture
def log(tmp_path):
    """Two models' requests over three parts, out of time order across and within parts."""
    folder = tmp_path / "log"
    write_part(folder, "a", [row(5), row(1), row(2, "m2")])
    write_part(folder, "b", [row(3, "m2"), row(0), row(9, "m2")])
    write_part(folder, "c", [row(7), row(4), row(8, "m2")])
    return folder


def test_model_id_filter_keeps_only_that_models_requests_oldest_first(log) -> None:
    frame = read_window(log, model_id="m1")
    assert minutes(frame) == [0, 1, 4, 5, 7]
    assert set(frame["model_id"]) == {"m1"}
    assert list(frame.index) == list(range(5))
    assert str(frame["time"].dt.tz) == "UTC"
    assert minutes(read_window(log)) == [0, 1, 2, 3, 4, 5, 7, 8, 9]  # None: any model


def test_model_name_and_version_filters(tmp_path) -> None:
    folder = tmp_path / "log"
    write_part(folder, "a", [row(0, model_version="3"), row(1, model_version="4")])
    write_part(folder, "b", [row(2, model_name="oct", model_version="3")])
    assert minutes(read_window(folder, model_version="3")) == [0, 2]
    assert minutes(read_window(folder, model_version=4)) == [1]  # compared as text
    assert minutes(read_window(folder, model_name="malaria")) == [0, 1]
    assert minutes(read_window(folder, model_name="malaria", model_version="3")) == [0]
    assert read_window(folder, model_name="malaria", model_version="9").empty


def test_a_filter_on_a_column_the_log_lacks_is_a_log_error(tmp_path) -> None:
    folder = tmp_path / "log"
    old = [{k: v for k, v in row(0).items() if k != "model_id"}]
    write_part(folder, "a", old)
    with pytest.raises(LogError, match="no model_id column"):
        read_window(folder, model_id="m1")
    assert len(read_window(folder)) == 1


def test_last_n_are_the_newest_n_of_that_model_oldest_first(log) -> None:
    assert minutes(read_window(log, last=2)) == [8, 9]
    assert minutes(read_window(log, model_id="m1", last=3)) == [4, 5, 7]  # m2 holds 8, 9
    assert minutes(read_window(log, model_id="m1", last=50)) == [0, 1, 4, 5, 7]


def test_last_n_with_ties_at_the_cut_off_gives_exactly_n(tmp_path) -> None:
    folder = tmp_path / "log"
    write_part(folder, "a", [row(0), row(2, sha256="x"), row(3)])
    write_part(folder, "b", [row(2, sha256="y"), row(1), row(2, sha256="z")])
    frame = read_window(folder, last=3)
    assert minutes(frame) == [2, 2, 3]  # 3 newest; two of the three tied at the cut-off
    assert set(frame["sha256"]) < {"x", "y", "z", "m1-3"} and "m1-3" in set(frame["sha256"])
    assert minutes(read_window(folder, last=4)) == [2, 2, 2, 3]  # the whole tie fits
    assert minutes(read_window(folder, last=5)) == [1, 2, 2, 2, 3]


def test_last_zero_is_an_empty_window(log) -> None:
    assert read_window(log, last=0).empty


def test_a_date_that_is_not_one_is_a_log_error(log) -> None:
    with pytest.raises(LogError, match="'yesterday': not an ISO date/time"):
        read_window(log, since="yesterday")


@pytest.mark.parametrize(
    ("since", "until"),
    [
        ("2024-05-01T12:02:00", "2024-05-01T12:07:00"),  # naive: UTC
        ("2024-05-01T14:02:00+02:00", "2024-05-01T08:07:00-04:00"),  # aware: converted
        ("2024-05-01 12:02:00Z", "2024-05-01 12:07:00+00:00"),
        (at(2), at(7)),
        (at(2).replace(tzinfo=None), at(7).replace(tzinfo=None)),
    ],
)
def test_since_is_inclusive_and_until_exclusive_in_utc(log, since, until) -> None:
    assert minutes(read_window(log, since=since, until=until)) == [2, 3, 4, 5]


def test_since_and_until_combine_with_model_and_last(log) -> None:
    assert minutes(read_window(log, since="2024-05-01T12:04:00")) == [4, 5, 7, 8, 9]
    assert minutes(read_window(log, until="2024-05-01T12:02:00")) == [0, 1]
    window = read_window(log, model_id="m1", since="2024-05-01T12:01:00", until=at(7), last=2)
    assert minutes(window) == [4, 5]


def test_columns_reads_only_those_and_time(log) -> None:
    frame = read_window(log, model_id="m2", columns=["brightness", "not_logged", "time"])
    assert list(frame.columns) == ["time", "brightness"]
    assert list(frame["brightness"]) == [2.0, 3.0, 8.0, 9.0]  # filtered on an unread column


def test_parts_with_different_schemas_are_read_as_one_table(tmp_path) -> None:
    """A part written before embeddings (and model ids) were logged, beside newer ones."""
    folder = tmp_path / "log"
    write_part(folder, "1-old", [row(0, model_id=None), row(1, model_id=None)])
    write_part(folder, "2-new", [row(2, emb_0=0.5, emb_1=-1.0, image_file="images/h.png")])
    write_part(folder, "3-new", [row(3, emb_0=1.5, emb_1=2.0, image_file=None)])
    frame = read_window(folder)
    assert minutes(frame) == [0, 1, 2, 3]
    assert {"emb_0", "emb_1", "image_file", "brightness"} <= set(frame.columns)
    np.testing.assert_array_equal(frame["emb_0"], [np.nan, np.nan, 0.5, 1.5])
    assert frame["model_id"].isna().tolist() == [True, True, False, False]
    assert frame["image_file"].tolist()[2] == "images/h.png"
    assert minutes(read_window(folder, model_id="m1")) == [2, 3]
    only = read_window(folder, columns=["emb_1"])
    assert list(only.columns) == ["time", "emb_1"] and only["emb_1"].isna().sum() == 2


def test_a_missing_folder_is_a_log_error(tmp_path) -> None:
    with pytest.raises(LogError, match="no request log folder"):
        read_window(tmp_path / "nowhere")


def test_a_folder_without_parts_is_a_log_error(tmp_path) -> None:
    (tmp_path / "status-1.json").write_text("{}")
    (tmp_path / ".part-x.parquet.tmp").write_bytes(b"half a part")  # a write under way
    with pytest.raises(LogError, match="no parts yet"):
        read_window(tmp_path)


def test_an_unreadable_part_is_a_log_error(tmp_path) -> None:
    write_part(tmp_path, "a", [row(0)])
    (tmp_path / "part-b.parquet").write_bytes(b"not parquet")
    with pytest.raises(LogError, match="unreadable request log part"):
        read_window(tmp_path)


def test_a_window_written_by_the_request_log_reads_back(tmp_path) -> None:
    """Two served models (ids m-1, m-2) log into one folder, m-1 with its embedding
    reference, and `medimg monitor`'s reader gets m-1's requests back."""
    rng = np.random.default_rng(0)
    embedding = fit_embedding(rng.normal(size=(50, 6)), components=2)
    images = [rng.integers(0, 256, (12, 10 + i, 3), dtype=np.uint8) for i in range(3)]
    answer = pd.DataFrame(
        {
            "class": ["Parasitized", "Uninfected", "Parasitized"],
            "probability": [0.9, 0.8, 0.7],
            "p_Parasitized": [0.9, 0.2, 0.7],
            "threshold": 0.5,
        }
    )
    features = rng.normal(size=(3, 6))
    first = RequestLog(
        tmp_path, flush_seconds=60, model_id="m-1", reference={"embedding": embedding}
    )
    second = RequestLog(tmp_path, flush_seconds=60, model_id="m-2")
    first.log_request(images[:2], answer.iloc[:2], features[:2])
    assert first.flush()
    second.log_request(images[2:], answer.iloc[2:].reset_index(drop=True))
    assert second.flush()
    first.log_request(images[2:], answer.iloc[2:].reset_index(drop=True), features[2:])
    first.close()
    second.close()

    frame = read_window(tmp_path, model_id="m-1")
    assert len(frame) == 3 and set(frame["model_id"]) == {"m-1"}
    assert list(frame["sha256"]) == [pixels_sha256(x) for x in images]
    assert list(frame["width"]) == [10, 11, 12]
    assert list(frame["decision"]) == ["Parasitized", "Uninfected", "Parasitized"]
    expected = project(embedding, features)
    np.testing.assert_allclose(frame["emb_1"], expected["emb_1"])
    assert str(frame["time"].dt.tz) == "UTC" and frame["time"].is_monotonic_increasing

    other = read_window(tmp_path, model_id="m-2")
    assert list(other["sha256"]) == [pixels_sha256(images[2])]
    assert other["emb_0"].isna().all()  # unified with m-1's parts, no embedding logged
    assert list(read_window(tmp_path, last=1)["model_id"]) == ["m-1"]
    since = read_window(tmp_path, since=frame["time"].iloc[2].isoformat())
    assert list(since["model_id"]) == ["m-1"]

    health = log_health(tmp_path)
    assert health["processes"] == 1  # one serving process: one status file
    assert health["written"] >= 1 and health["errors"] == 0


# ------------------------------------------------------------------------------ log_health


def status(folder, pid: int, **fields) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"status-{pid}.json").write_text(json.dumps(fields))


def test_log_health_sums_every_serving_process(tmp_path) -> None:
    status(tmp_path, 1, logged=10, written=8, dropped=1, lost=1, errors=1, deleted_parts=2)
    status(tmp_path, 22, logged=5, written=5, dropped=0, lost=0, errors=0, deleted_parts=0)
    status(tmp_path, 333, logged=1, written=None)  # missing or null counters count as 0
    health = log_health(tmp_path)
    assert health == {
        "logged": 16,
        "written": 13,
        "dropped": 1,
        "lost": 1,
        "errors": 1,
        "deleted_parts": 2,
        "last_error": None,
        "processes": 3,
    }


def test_log_health_keeps_the_newest_last_error(tmp_path) -> None:
    # sorted by name, the newest error comes first: the order of the files must not matter
    status(tmp_path, 1, updated="2024-05-01T12:30:00+00:00", last_error="write: disk full")
    status(tmp_path, 2, updated="2024-05-01T12:10:00+00:00", last_error="write: older")
    status(tmp_path, 3, updated="2024-05-01T12:50:00+00:00", last_error=None)  # healthy
    assert log_health(tmp_path)["last_error"] == "write: disk full"


def test_log_health_ignores_unreadable_status_files(tmp_path) -> None:
    status(tmp_path, 1, logged=4, errors=2)
    (tmp_path / "status-2.json").write_text('{"logged": 1')  # cut short
    (tmp_path / "status-3.json").write_bytes(b"\xff\xfe not json")
    (tmp_path / ".status-4.json.tmp").write_text(json.dumps({"logged": 100}))  # being written
    health = log_health(tmp_path)
    assert health["processes"] == 1 and health["logged"] == 4 and health["errors"] == 2


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_log_health_of_a_folder_without_status_is_zero(tmp_path, where) -> None:
    folder = tmp_path / "log"
    if where == "empty":
        folder.mkdir()
    health = log_health(folder)
    assert health["processes"] == 0 and health["last_error"] is None
    assert all(health[name] == 0 for name in ("logged", "written", "errors", "deleted_parts"))
