"""Serving under load: `mlflow models serve` of the champion, N clients for T seconds each
for 1-image and 32-image requests (and 1-image requests from a single client, the latency
without queueing), on 127.0.0.1 only; then malformed payloads.

    python bench/serve.py [--tracking-uri sqlite:///mlruns/mlflow.db] [--model-uri URI]
                          [--clients 4] [--seconds 10]

Cells: full-resolution real ones from ../shared/data/malaria/cell_images_fullres.zip when
present (82-229 px, as clients would send them), else synthetic 128 px cells. Prints a table:
p50/p99 latency per request, images/s, and the HTTP status of each malformed payload.
Bounded: every loop stops at its deadline and the server is always stopped.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FULLRES = REPO.parent / "shared" / "data" / "malaria" / "cell_images_fullres.zip"


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


def start_server(model_uri: str, tracking_uri: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]  # fmt: skip
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # uvicorn
        "MLFLOW_TRACKING_URI": tracking_uri,
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            time.sleep(0.5)
    raise SystemExit("server not ready in time")


def body(images: list[bytes]) -> dict:
    rows = [[base64.b64encode(c).decode("ascii")] for c in images]
    return {"dataframe_split": {"columns": ["image"], "data": rows}}


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
                    images[0] += len(payload["dataframe_split"]["data"])
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", default=f"sqlite:///{REPO / 'mlruns' / 'mlflow.db'}")
    ap.add_argument("--model-uri", default="models:/malaria-classifier@champion")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    data, kind = cells()
    port, log = free_port(), Path("/tmp") / f"medimg-bench-serve-{os.getpid()}.log"
    proc = start_server(args.model_uri, args.tracking_uri, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc)
        singles = [body([c]) for c in data]
        batches = [body(data[i : i + 32]) for i in range(0, len(data) - 31, 32)]
        load(url, singles[:4], 1, 2.0)  # warm-up: graph tracing, first allocations
        load(url, batches[:1], 1, 2.0)
        n = args.clients
        rows = [  # one client: the latency of a request alone; N: under load, with queueing
            ("1 image / request, 1 client", load(url, singles, 1, args.seconds)),
            (f"1 image / request, {n} clients", load(url, singles, n, args.seconds)),
            (f"32 images / request, {n} clients", load(url, batches, n, args.seconds)),
        ]
        bad = malformed(url)
        alive = load(url, singles[:1], 1, 1.0)["errors"] == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    print(f"\nmlflow models serve, {args.seconds:.0f} s per row, {kind} cells, "
          f"{os.cpu_count()} CPUs, 127.0.0.1")  # fmt: skip
    print("| request | requests | p50 ms | p99 ms | images/s | errors |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['requests']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
              f"| {r['images_per_s']:.0f} | {r['errors']} |")  # fmt: skip
    print("\n| malformed payload | HTTP status |\n|---|---|")
    for name, code in bad:
        print(f"| {name} | {code} |")
    print(f"\nserver still serving after the malformed payloads: {'yes' if alive else 'NO'}")


if __name__ == "__main__":
    main()
