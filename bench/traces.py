"""Would MLflow traces do as the request log? One trace per scored image, as the served model
would write it, into a throwaway local store.

    python bench/traces.py [--requests 300]

Prints the time each request spends in `mlflow.start_span` (the request path: the export is
asynchronous), the time until every trace has landed in the store (the export work), the bytes
of tracking database per trace, and how long `mlflow.search_traces` takes to read them back.
The store is a temporary SQLite file, deleted at the end; nothing reaches the team's server.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args()
    import mlflow

    root = tempfile.mkdtemp(prefix="medimg-bench-traces-")
    try:
        db = os.path.join(root, "mlflow.db")
        mlflow.set_tracking_uri(f"sqlite:///{db}")
        mlflow.set_experiment("traces-bench")
        empty = os.path.getsize(db)  # the schema: not the traces' bytes
        row = {f"p{i}": float(i) for i in range(25)}  # ~ a request log row's numbers
        start, spans = time.perf_counter(), []
        for _ in range(args.requests):
            t = time.perf_counter()
            with mlflow.start_span(name="predict") as span:
                span.set_inputs({"sha256": "0" * 64})
                span.set_outputs(row)
            spans.append((time.perf_counter() - t) * 1000)
        mlflow.flush_trace_async_logging()
        landed = time.perf_counter() - start
        t = time.perf_counter()
        found = mlflow.search_traces(max_results=args.requests)
        read = time.perf_counter() - t
        per_trace_kb = (os.path.getsize(db) - empty) / args.requests / 1024
        print(f"| traces | request path p50 ms | all landed s | ms per trace | KB per trace "
              f"| search_traces s |\n|---|---|---|---|---|---|\n| {len(found)} "
              f"| {np.median(spans):.2f} | {landed:.1f} | {landed / args.requests * 1000:.0f} "
              f"| {per_trace_kb:.1f} | {read:.2f} |")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
