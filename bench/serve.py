"""Serving under load, request logging off vs on: `mlflow models serve` of the champion, run
twice in turn on 127.0.0.1 only, a fresh free port each: without MEDIMG_REQUEST_LOG, then with
it set to a fresh temporary folder under /tmp (deleted at the end).

    python bench/serve.py [--tracking-uri sqlite:///mlruns/mlflow.db] [--model-uri URI]
                          [--clients 4] [--seconds 10] [--logging {off,on,both}]

For each server, once /ping answers: the first 1-image request, then the first 32-image
request (cold start: nothing sent before them), a short warm-up, then N clients for T seconds
each for 1-image and 32-image requests (and 1-image requests from a single client, the
latency without queueing). Malformed payloads are sent once, to the logging-off server (not
with --logging on). Every MEDIMG_REQUEST_LOG* variable of the caller's environment is removed
from the server's; logging on sets only MEDIMG_REQUEST_LOG.

Cells: full-resolution real ones from ../shared/data/malaria/cell_images_fullres.zip when
present (82-229 px, as clients would send them), else synthetic 128 px cells. Prints one
table: per server (`logging` off/on) the two cold-start latencies, then p50/p99 latency per
request and images/s per load row. With both servers: the p50 logging adds to a 1-image
request from 1 client (ms, goal <= 2) and how many fewer images/s 32-image requests from N
clients get (%, goal <= 10). How each server stopped: SIGTERM to its process group, then a
wait for the group to exit. For the logging-on server: rows in the log's part-*.parquet vs
images answered (the log's atexit flush is meant to write what is pending at the stop: a gap
says it did not) and the counters of its status-*.json (status.json from older models). Then
the HTTP status of each malformed payload. One run's figures: noisy on a shared CPU.
Bounded: every loop stops at its deadline and each server (its process group) is stopped.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FULLRES = REPO.parent / "shared" / "data" / "malaria" / "cell_images_fullres.zip"
LOG_ENV = "MEDIMG_REQUEST_LOG"  # medimg.monitoring.request_log.ENV_FOLDER
GOAL_P50_MS, GOAL_FEWER_PCT = 2.0, 10.0  # the issue's goals for logging's overhead


def cells() -> tuple[list[bytes], str]:
    if FULLRES.exists():
        with zipfile.ZipFile(FULLRES) as zf:
            names = sorted(n for n in zf.namelist() if n.lower().endswith(".png"))
            return [zf.read(n) for n in names[:64]], f"real full-res ({FULLRES.name})"
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(64):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out, "synthetic 128 px"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model_uri: str, tracking_uri: str, port: int, log: Path, request_log: Path | None
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(LOG_ENV)}
    env |= {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # uvicorn
        "MLFLOW_TRACKING_URI": tracking_uri,
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    if request_log is not None:
        env[LOG_ENV] = str(request_log)
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of the group remains."""
    try:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
        return False
    except OSError:  # no /proc: ask the kernel (zombies count as alive)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True


def stop_server(proc: subprocess.Popen, grace: float = 30.0) -> str:
    """SIGTERM to the server's process group (the mlflow CLI and the uvicorn it starts), then
    wait up to `grace` s for the whole group to exit (uvicorn shuts down, atexit flushes the
    request log); SIGKILL whatever is left. Returns how it ended."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        proc.wait()
        return "already exited"
    t0 = time.monotonic()
    deadline = t0 + grace
    while time.monotonic() < deadline:
        proc.poll()
        if not group_alive(proc.pid):
            proc.wait()
            return f"exited {time.monotonic() - t0:.1f} s after SIGTERM"
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return f"SIGKILLed: still running {grace:.0f} s after SIGTERM"


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise SystemExit(f"server exited with {proc.returncode}:\n" + "\n".join(tail))
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            time.sleep(0.5)
    raise SystemExit(f"server not ready in {timeout:.0f} s (log: {log})")


def body(images: list[bytes]) -> dict:
    rows = [[base64.b64encode(c).decode("ascii")] for c in images]
    return {"dataframe_split": {"columns": ["image"], "data": rows}}


def n_images(payload: dict) -> int:
    return len(payload["dataframe_split"]["data"])


def first(url: str, payload: dict) -> dict:
    """One request, timed (ms): the cold-start rows."""
    import requests

    t0 = time.perf_counter()
    ok = requests.post(f"{url}/invocations", json=payload, timeout=120).status_code == 200
    dt = (time.perf_counter() - t0) * 1000
    return {"requests": 1, "errors": 0 if ok else 1, "images": n_images(payload) if ok else 0,
            "p50_ms": dt, "p99_ms": None, "images_per_s": None}  # fmt: skip


def load(url: str, payloads: list[dict], clients: int, seconds: float) -> dict:
    """`clients` threads post payloads round-robin until the deadline; latencies in ms."""
    import requests

    latencies: list[float] = []
    images, errors = [0], [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(k: int) -> None:
        session, i = requests.Session(), k
        while time.monotonic() < deadline:
            payload = payloads[i % len(payloads)]
            t0 = time.perf_counter()
            resp = session.post(f"{url}/invocations", json=payload, timeout=60)
            dt = (time.perf_counter() - t0) * 1000
            with lock:
                if resp.status_code == 200:
                    latencies.append(dt)
                    images[0] += n_images(payload)
                else:
                    errors[0] += 1
            i += clients

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    lat = np.asarray(latencies or [np.nan])
    return {
        "requests": len(latencies),
        "errors": errors[0],
        "images": images[0],
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "images_per_s": images[0] / wall,
    }


def malformed(url: str) -> list[tuple[str, int]]:
    import requests
    from tests.conftest import bomb_png

    post = lambda **kw: requests.post(f"{url}/invocations", timeout=60, **kw).status_code  # noqa: E731
    json_ct = {"Content-Type": "application/json"}
    return [
        ("not JSON", post(data="{", headers=json_ct)),
        ("bad base64", post(json={"dataframe_split": {"columns": ["image"], "data": [["@@"]]}})),
        ("not an image", post(json=body([b"hello"]))),
        ("wrong array shape", post(json={"inputs": [[[1, 2], [3, 4]]]})),
        ("12000x12000 PNG", post(json=body([bomb_png()]))),
        ("unknown key", post(json={"images": []})),
    ]  # fmt: skip


def read_log(folder: Path) -> dict:
    """Rows in the request log's parts, and its status files (written by the server)."""
    import pyarrow.parquet as pq

    parts = sorted(folder.glob("part-*.parquet"))
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts)
    # status-<pid>.json; status.json from a model logged with an older medimg
    status = [json.loads(p.read_text()) for p in sorted(folder.glob("status*.json"))]
    return {"log_parts": len(parts), "log_rows": rows, "log_status": status}


def bench(
    args: argparse.Namespace, data: list[bytes], request_log: Path | None, check: bool
) -> dict:
    """One server (logging into `request_log`, or off), from start to stop: its rows, the
    images it answered and, with logging, what it wrote."""
    port, logging = free_port(), "off" if request_log is None else "on"
    log = Path("/tmp") / f"medimg-bench-serve-{os.getpid()}-{logging}.log"
    out: dict = {"request_log": request_log, "log": log}
    proc = start_server(args.model_uri, args.tracking_uri, port, log, request_log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, log)
        singles = [body([c]) for c in data]
        batches = [body(data[i : i + 32]) for i in range(0, len(data) - 31, 32)]
        cold = [  # nothing sent before these: what the first clients wait
            ("first request, 1 image (cold)", first(url, singles[0])),
            ("first request, 32 images (cold)", first(url, batches[0])),
        ]
        warm = [load(url, singles[:4], 1, 2.0), load(url, batches[:1], 1, 2.0)]  # warm-up
        n = args.clients
        rows = [  # one client: the latency of a request alone; N: under load, with queueing
            ("1 image / request, 1 client", load(url, singles, 1, args.seconds)),
            (f"1 image / request, {n} clients", load(url, singles, n, args.seconds)),
            (f"32 images / request, {n} clients", load(url, batches, n, args.seconds)),
        ]
        out["rows"] = cold + rows
        out["images"] = sum(r["images"] for r in warm + [r for _, r in cold + rows])
        if check:
            out["bad"] = malformed(url)
            out["alive"] = load(url, singles[:1], 1, 1.0)["errors"] == 0
    finally:
        out["stopped"] = stop_server(proc)
    if request_log is not None:
        out |= read_log(request_log)
    return out


def report(args: argparse.Namespace, kind: str, results: dict[str, dict]) -> None:
    print(f"\nmlflow models serve, {args.seconds:g} s per load row, {kind} cells, "
          f"{os.cpu_count()} CPUs, 127.0.0.1")  # fmt: skip
    print("| logging | request | requests | p50 ms | p99 ms | images/s | errors |")
    print("|---|---|---|---|---|---|---|")
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    for logging, res in results.items():
        for name, r in res["rows"]:
            print(f"| {logging} | {name} | {r['requests']} | {fmt(r['p50_ms'], '.1f')} "
                  f"| {fmt(r['p99_ms'], '.1f')} | {fmt(r['images_per_s'], '.0f')} "
                  f"| {r['errors']} |")  # fmt: skip
    if {"off", "on"} <= results.keys():
        off, on = (dict(results[k]["rows"]) for k in ("off", "on"))
        single = "1 image / request, 1 client"
        batch = f"32 images / request, {args.clients} clients"
        added = on[single]["p50_ms"] - off[single]["p50_ms"]
        fewer = 100 * (1 - on[batch]["images_per_s"] / off[batch]["images_per_s"])
        met = lambda ok: "yes" if ok else "NO"  # noqa: E731
        print("\n| logging on vs off | measured | goal | met |\n|---|---|---|---|")
        print(f"| p50 added: {single} | {added:+.1f} ms | <= {GOAL_P50_MS:g} ms "
              f"| {met(added <= GOAL_P50_MS)} |")  # fmt: skip
        print(f"| fewer images/s: {batch} | {fewer:+.1f} % | <= {GOAL_FEWER_PCT:g} % "
              f"| {met(fewer <= GOAL_FEWER_PCT)} |")  # fmt: skip
    for logging, res in results.items():
        print(f"\nserver, logging {logging}: {res['stopped']}")
        if res.get("request_log") is None:
            continue
        sent, rows = res["images"], res["log_rows"]
        gap = "" if rows == sent else f" ({rows - sent:+d}: NOT one row per image)"
        print(f"request log: {rows} rows in {res['log_parts']} part(s) for {sent} images "
              f"answered with 200{gap}")  # fmt: skip
        keys = ("logged", "written", "dropped", "lost", "errors", "queued", "last_error")
        for status in res["log_status"] or [None]:
            shown = {k: status.get(k) for k in keys} if status else "none written"
            print(f"status json: {shown}")
    for res in results.values():
        if "bad" in res:
            print("\n| malformed payload | HTTP status |\n|---|---|")
            for name, code in res["bad"]:
                print(f"| {name} | {code} |")
            alive = "yes" if res["alive"] else "NO"
            print(f"\nserver still serving after the malformed payloads: {alive}")


def writer_cost(data: list[bytes], repeats: int = 10) -> list[tuple[str, float]]:
    """CPU ms per cell of the request log's writer work, in process, on the same cells: what
    logging takes from serving when the cores are busy."""
    from datetime import UTC, datetime

    import pandas as pd
    from PIL import Image

    from medimg.data.properties import image_properties
    from medimg.monitoring.request_log import RequestLog, _Request, pixels_sha256

    images = [np.asarray(Image.open(io.BytesIO(c)).convert("RGB")) for c in data[:32]]
    answer = pd.DataFrame({"class": ["Parasitized"] * len(images), "probability": 0.9,
                           "p_Parasitized": 0.9, "threshold": 0.5})  # fmt: skip
    folder = Path(tempfile.mkdtemp(prefix="medimg-bench-writer-", dir="/tmp"))
    log = RequestLog(folder, start=False)
    request = lambda: _Request(datetime.now(UTC), images, answer.copy(), 0)  # noqa: E731
    steps = {
        "properties (original pixels)": lambda: [image_properties(x) for x in images],
        "sha256": lambda: [pixels_sha256(x) for x in images],
        "whole row (properties, hash, answer)": lambda: log._records(request()),
        "row + Parquet part of 32": lambda: log._write(log._records(request())),
    }
    out = []
    try:
        for name, step in steps.items():
            t0 = time.process_time()
            for _ in range(repeats):
                step()
            out.append((name, (time.process_time() - t0) / repeats / len(images) * 1000))
    finally:
        log.close()
        shutil.rmtree(folder, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", default=f"sqlite:///{REPO / 'mlruns' / 'mlflow.db'}")
    ap.add_argument("--model-uri", default="models:/malaria-classifier@champion")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--logging", choices=("off", "on", "both"), default="both")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    data, kind = cells()
    modes = ["off", "on"] if args.logging == "both" else [args.logging]
    results: dict[str, dict] = {}
    folders: list[Path] = []  # request logs, deleted whatever happens
    try:
        for logging in modes:
            request_log = None
            if logging == "on":
                request_log = Path(tempfile.mkdtemp(prefix="medimg-bench-reqlog-", dir="/tmp"))
                folders.append(request_log)
            results[logging] = bench(args, data, request_log, check=logging == "off")
    finally:
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)
    report(args, kind, results)
    print("\n| request log writer, per cell (in process, CPU time) | ms |\n|---|---|")
    for name, ms in writer_cost(data):
        print(f"| {name} | {ms:.3f} |")


if __name__ == "__main__":
    main()
