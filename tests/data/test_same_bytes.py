"""Same params, same archive bytes, whatever the CPU: numpy's SIMD paths switched off must not
change one byte of either synthetic dataset, and the default must match `dvc.lock`.

numpy picks its exp/sin/cos/arctan2 at run time by SIMD level and each rounds its own way;
`NPY_DISABLE_CPU_FEATURES="X86_V3 X86_V4"` makes this machine take the AVX2-less, AVX-512-less
paths an older CPU would, and `OPENBLAS_CORETYPE=Haswell` the BLAS kernels of one without
AVX-512. Each archive is generated in a fresh process, since numpy reads the variable at import.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
OLD_CPU = {"NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4", "OPENBLAS_CORETYPE": "Haswell"}

_GENERATE = """
import sys
from pathlib import Path
from medimg.config import load_params
params = load_params(sys.argv[1])
dest = Path(sys.argv[2])
if params.dataset.name.startswith("oct"):
    from medimg.data.synthetic_oct import generate
    cfg = params.dataset.synthetic_oct
else:
    from medimg.data.synthetic import generate
    cfg = params.dataset.synthetic
patients = int(sys.argv[3])
if patients:
    cfg = cfg.model_copy(update={"patients": patients})
generate(dest, cfg, params.seed)
"""


def _md5_of_generated(tmp: Path, params: Path, patients: int, env: dict[str, str]) -> str:
    dest = tmp / f"images-{len(list(tmp.iterdir()))}.zip"
    run_env = {**os.environ, **env}
    for key in OLD_CPU:  # a variable inherited from the shell would hide the difference
        if key not in env:
            run_env.pop(key, None)
    cmd = [sys.executable, "-c", _GENERATE, str(params), str(dest), str(patients)]
    subprocess.run(cmd, env=run_env, check=True, cwd=REPO)
    return hashlib.md5(dest.read_bytes()).hexdigest()


def _params(tmp: Path, **dataset) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["dataset"].update(dataset)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("dataset", ["malaria", "oct2017"])
def test_same_bytes_with_and_without_numpy_simd(tmp_path, dataset):
    params = _params(tmp_path, name=dataset)
    patients = 12 if dataset == "malaria" else 4
    here = _md5_of_generated(tmp_path, params, patients, {})
    old_cpu = _md5_of_generated(tmp_path, params, patients, OLD_CPU)
    assert here == old_cpu


def test_default_archive_matches_the_committed_dvc_lock(tmp_path):
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    (out,) = lock["stages"]["download"]["outs"]
    params = _params(tmp_path)  # the committed defaults: synthetic malaria
    assert _md5_of_generated(tmp_path, params, 0, OLD_CPU) == out["md5"]


_EXACTMATH = """
import hashlib, numpy as np
from medimg.data import exactmath as em
x = np.random.default_rng(0).uniform(-60, 60, 200_000)
out = [em.exp(x / 4), em.sin(x), em.cos(x), em.log(np.abs(x) + 1e-3), em.power(np.abs(x), 1.3),
       em.hypot(x, x[::-1])]
print(hashlib.md5(b"".join(a.tobytes() for a in out)).hexdigest())
"""


def test_exactmath_gives_the_same_bits_without_simd():
    """The functions every pixel goes through: bit-equal, not merely close, on an old CPU."""

    def digest(env: dict[str, str]) -> str:
        run_env = {k: v for k, v in os.environ.items() if k not in OLD_CPU} | env
        cmd = [sys.executable, "-c", _EXACTMATH]
        return subprocess.run(cmd, env=run_env, check=True, capture_output=True, text=True).stdout

    assert digest({}) == digest(OLD_CPU)
