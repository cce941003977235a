"""How much memory does one architecture's training step take, apart from the data?

Builds the model at its input size, fits one epoch on 4 in-memory batches of random pixels
and prints the process's peak RSS per batch size, each in a fresh process. The train stage's
peak is this plus the input pipeline (shuffle buffer, cache) and MLflow: the part that grows
with the batch and the image size, not with the dataset.

    python bench/train_memory.py [--arch compact_cnn] [--size 224] [--batches 32,16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, resource, sys
import numpy as np
from medimg.models import build_model
arch, size, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = build_model(arch, (size, size, 3), 4)
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
x = np.random.default_rng(0).uniform(0, 255, (batch * 4, size, size, 3)).astype("float32")
model.fit(x, np.zeros(batch * 4, "int64"), batch_size=batch, epochs=1, verbose=0)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_mb": round(peak), "inputs_mb": round(x.nbytes / 1e6)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="compact_cnn")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", default="32,16")
    args = ap.parse_args()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    print(f"| {args.arch} at {args.size} px: batch | peak RSS MB | input arrays MB |")
    print("|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        cmd = [sys.executable, "-c", CHILD, args.arch, str(args.size), str(batch)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {batch} | {result['peak_mb']:,} | {result['inputs_mb']} |")


if __name__ == "__main__":
    main()
