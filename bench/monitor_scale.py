"""`medimg monitor` at scale: wall time and peak memory over a large request log.

    python bench/monitor_scale.py [--tracking-uri sqlite:///<repo>/mlruns/mlflow.db]
                                  [--model malaria-classifier@champion]
                                  [--rows 100000] [--seed 0]

The champion of the repo's MLflow store is resolved to its logged model id and its monitoring
reference (`medimg.tracking.monitoring.version_model` / `version_reference`); a version
without a reference stops the bench (run `dvc repro` first: evaluate stores it). Then
synthetic request logs are written to a temporary folder (deleted at the end) with the served
log's schema and naming (`medimg.monitoring.request_log`): `part-<utc>-<pid>-<seq>.parquet`
of 256 rows each, one row per request with time (tz-aware UTC, spread over one day), the
champion's model id / name / version / alias, a random sha256, every image property, `emb_i`
and `p_<class>` drawn from the reference itself (inverse CDF: `np.interp` of uniform draws
over its `levels` / `quantiles`, column by column), the decision and probability that
`medimg.scoring.result_frame` derives from `p_<class>` at the version's operating threshold,
plus a writer's `status-<pid>.json`. Seeded (`numpy.random.default_rng(seed)`).

Three cases, with N = `--rows`: a log of N rows checked with `--last N`, a log of 4N rows with
`--last N` (memory should not follow the log) and the same 4N rows with `--last N/10`
(memory should follow the window). Each runs the real command as its own process,

    python -m medimg.cli --params <repo>/params.yaml monitor --log DIR --model SPEC
                         --last W --out <tmp>/out --no-mlflow

with MLFLOW_TRACKING_URI set to the store, timing its wall seconds (process start to exit,
TensorFlow's import included: `medimg` imports it for every command module) and reading its
peak RSS from `os.wait4`'s rusage. Writing the logs is not timed. A clean window drawn from
the reference must not drift: exit code 0; another code is reported with the command's
output, not hidden.

MLflow logging is off (`--no-mlflow`): a monitoring run needs the registered version in the
store it writes to, and the bench must not add runs to the repo's store. What it skips is one
small run with two artifacts, independent of the window's size.

Prints one markdown table (log rows, window, parts, wall s, CPU s, peak RSS MB, exit code)
and the goal: under 60 s for 100k requests on 2 cores, memory bounded by the window.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PART_ROWS = 256  # RequestLog's flush_every
GOAL_S = 60.0
DAY_US = 24 * 3600 * 1_000_000


def resolve_champion(spec: str, tracking_uri: str) -> dict[str, Any]:
    """{name, version, alias, model_id, reference, threshold} of `spec` (NAME@ALIAS or
    NAME/VERSION) in the store; reference None when the version has none."""
    import mlflow

    from medimg.commands.card import resolve
    from medimg.tracking import monitoring as tracked

    mlflow.set_tracking_uri(tracking_uri)
    default_name = spec.split("@", 1)[0].rsplit("/", 1)[0]
    name, version = resolve(spec, default_name)
    model = tracked.version_model(name, version)
    reference = tracked.version_reference(name, version)
    tags = mlflow.MlflowClient().get_model_version(name, version).tags
    alias = spec.split("@", 1)[1] if "@" in spec else None
    return {
        "name": name,
        "version": version,
        "alias": alias,
        "model_id": model["model_id"],
        "reference": reference,
        "threshold": float(tags.get("operating_threshold", 0.5)),
    }


def draw(group: dict[str, Any], name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n values of column `name` of a reference group, by inverse CDF over its quantiles."""
    levels = np.asarray(group["levels"], dtype=np.float64)
    quantiles = np.asarray(group["properties"][name]["quantiles"], dtype=np.float64)
    return np.interp(rng.random(n), levels, quantiles)


def synth_columns(champion: dict[str, Any], n: int, rng: np.random.Generator) -> dict[str, Any]:
    """Every column of n served requests, in the served log's column order, oldest first."""
    from medimg.data.properties import PROPERTIES

    ref = champion["reference"]
    end = datetime.now(UTC).replace(microsecond=0)
    start_us = int((end - timedelta(days=1)).timestamp() * 1_000_000)
    times = np.sort(start_us + rng.integers(0, DAY_US, n))
    digests = rng.bytes(32 * n)
    cols: dict[str, Any] = {
        "time": times,
        "model_id": champion["model_id"],
        "model_name": champion["name"],
        "model_version": str(champion["version"]),
        "model_alias": champion["alias"],
        "sha256": np.array([digests[32 * i : 32 * i + 32].hex() for i in range(n)]),
    }
    for name in PROPERTIES:
        cols[name] = draw(ref, name, n, rng)
    embedding = ref.get("embedding") or {}
    for name in embedding.get("properties", {}):
        cols[name] = draw(embedding, name, n, rng)
    predictions = ref["predictions"]
    classes = list(predictions["classes"])
    probs = {name: draw(predictions, name, n, rng) for name in predictions["properties"]}
    if len(classes) == 2:  # scoring.result_frame: binary models log the positive class's p
        p = probs[f"p_{classes[1]}"]
        positive = p >= champion["threshold"]
        cols["decision"] = np.where(positive, classes[1], classes[0])
        cols["probability"] = np.where(positive, p, 1.0 - p)
        cols |= probs
        cols["threshold"] = champion["threshold"]
    else:
        stacked = np.stack([probs[f"p_{c}"] for c in classes], axis=1)
        cols["decision"] = np.asarray(classes)[stacked.argmax(axis=1)]
        cols["probability"] = stacked.max(axis=1)
        cols |= probs
        cols["threshold"] = np.nan
    return cols


def write_log(folder: Path, cols: dict[str, Any], pid: int) -> int:
    """The columns as `part-<utc>-<pid>-<seq>.parquet` of PART_ROWS rows (the schema
    `pa.Table.from_pylist` gives the served writer's records) and a status file; parts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    n = len(cols["time"])
    schema = None
    seq = 0
    for lo in range(0, n, PART_ROWS):
        hi = min(n, lo + PART_ROWS)
        part = {k: v[lo:hi] if isinstance(v, np.ndarray) else [v] * (hi - lo)
                for k, v in cols.items()}  # fmt: skip
        if schema is None:  # what the served writer's records infer to
            stamps = [datetime.fromtimestamp(t / 1e6, UTC) for t in part["time"].tolist()]
            records = [
                {k: (stamps[i] if k == "time" else _plain(v[i])) for k, v in part.items()}
                for i in range(hi - lo)
            ]
            schema = pa.Table.from_pylist(records).schema
        arrays = [pa.array(part[f.name], type=f.type) for f in schema]
        table = pa.Table.from_arrays(arrays, schema=schema)
        seq += 1
        last = datetime.fromtimestamp(int(part["time"][-1]) / 1e6, UTC)
        name = f"part-{last.strftime('%Y%m%dT%H%M%S%fZ')}-{pid}-{seq:06d}.parquet"
        pq.write_table(table, folder / name)
    status = {"folder": str(folder), "pid": pid, "updated": datetime.now(UTC).isoformat(),
              "logged": n, "written": n, "dropped": 0, "lost": 0, "errors": 0,
              "deleted_parts": 0, "queued": 0, "queued_bytes": 0, "max_bytes": 0,
              "last_error": None}  # fmt: skip
    (folder / f"status-{pid}.json").write_text(json.dumps(status, indent=1))
    return seq


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def run_monitor(log: Path, out: Path, spec: str, last: int, tracking_uri: str) -> dict[str, Any]:
    """The real `medimg monitor` as its own process: wall s, CPU s, peak RSS MB, exit code,
    its output."""
    cmd = [sys.executable, "-m", "medimg.cli", "--params", str(REPO / "params.yaml"),
           "monitor", "--log", str(log), "--model", spec, "--last", str(last),
           "--out", str(out), "--no-mlflow"]  # fmt: skip
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri)
    if out.exists():
        shutil.rmtree(out)
    with tempfile.TemporaryFile("w+") as output:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read()
    return {
        "wall": wall,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss_mb": usage.ru_maxrss / 1024,  # KB on Linux
        "code": proc.returncode,
        "output": text,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=f"sqlite:///{REPO / 'mlruns' / 'mlflow.db'}")
    parser.add_argument("--model", default="malaria-classifier@champion")
    parser.add_argument("--rows", type=int, default=100_000, help="N (see the docstring)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.rows < 10:
        parser.error("--rows must be >= 10")
    from medimg.errors import MedimgError

    try:
        champion = resolve_champion(args.model, args.tracking_uri)
    except MedimgError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if champion["reference"] is None:
        print(
            f"{champion['name']} v{champion['version']} has no monitoring reference: "
            "run `dvc repro` first",
            file=sys.stderr,
        )
        return 1
    n = args.rows
    cases = [(n, n), (4 * n, n), (4 * n, n // 10)]
    print(
        f"{args.model} = {champion['name']} v{champion['version']} "
        f"(logged model {champion['model_id']}); {os.cpu_count()} CPUs visible"
    )
    rng = np.random.default_rng(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="medimg-monitor-scale-"))
    try:
        logs: dict[int, tuple[Path, int]] = {}
        for size in sorted({rows for rows, _ in cases}):
            t0 = time.perf_counter()
            folder = tmp / f"log-{size}"
            parts = write_log(folder, synth_columns(champion, size, rng), 40000 + size % 9973)
            logs[size] = (folder, parts)
            mb = sum(p.stat().st_size for p in folder.iterdir()) / 2**20
            print(
                f"log of {size} rows: {parts} parts, {mb:.0f} MB, written in "
                f"{time.perf_counter() - t0:.0f} s (not timed)"
            )
        results = []
        for rows, window in cases:
            folder, parts = logs[rows]
            r = run_monitor(folder, tmp / "out", args.model, window, args.tracking_uri)
            results.append((rows, window, parts, r))
            lines = r["output"].strip().splitlines()
            verdict = next((x for x in lines if "requests:" in x), lines[-1] if lines else "")
            print(f"  {rows} rows, --last {window}: exit {r['code']}: {verdict.strip()}")
            if r["code"] != 0:
                print("    " + "\n    ".join(lines[-30:]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("| log rows | window | parts | wall s | CPU s | peak RSS MB | exit code |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for rows, window, parts, r in results:
        print(
            f"| {rows} | {window} | {parts} | {r['wall']:.1f} | {r['cpu']:.1f} | "
            f"{r['rss_mb']:.0f} | {r['code']} |"
        )
    first = results[0][3]
    print(
        f"\ngoal: {n} requests in < {GOAL_S:.0f} s: {first['wall']:.1f} s "
        f"({'met' if first['wall'] < GOAL_S else 'NOT met'}); memory bounded by the window: "
        f"peak RSS {results[0][3]['rss_mb']:.0f} MB ({n} of {n}) vs "
        f"{results[1][3]['rss_mb']:.0f} MB ({n} of {4 * n}) vs "
        f"{results[2][3]['rss_mb']:.0f} MB ({n // 10} of {4 * n})"
    )
    return 0 if all(r["code"] == 0 for *_, r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
