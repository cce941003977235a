"""`medimg.io.progress`: a log file gets a few progress lines, not one per update."""

from __future__ import annotations

import time

from medimg import io as mio
from medimg.io import progress


def _redraws(err: str) -> int:
    return err.count("\r") + err.count("\n")


def test_a_short_job_prints_nothing_to_a_log(capsys):
    with progress(total=20_000, desc="predict", unit="img") as bar:
        for _ in range(20_000):
            bar.update(1)
    assert capsys.readouterr().err == ""  # pytest's capture is not a terminal


def test_a_long_job_prints_a_line_per_interval_not_per_update(capsys, monkeypatch):
    monkeypatch.setattr(mio, "LOG_PROGRESS_SECONDS", 0.2)
    with progress(total=20_000, desc="predict", unit="img") as bar:
        for _ in range(40):  # ~1 s of work in 500-image steps
            for _ in range(500):
                bar.update(1)
            time.sleep(0.025)
    err = capsys.readouterr().err
    assert 2 <= _redraws(err) <= 8, err  # 20,000 updates, a handful of lines
    assert "20000/20000" in err


def test_progress_can_be_switched_off(capsys):
    with progress(total=3, enabled=False) as bar:
        bar.update(3)
    assert capsys.readouterr().err == ""
