"""End to end: `dvc repro` on a temp copy of this repo, then the gate, a no-op and a failed gate.

Sizes are shrunk (a small synthetic set, the `tiny` model, 2 epochs) so the whole suite stays
within minutes on 2 cores; every stage, DVC and MLflow call is the real one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.test_serving_model import cells_for_server, predict_without_medimg

pytestmark = pytest.mark.e2e


def _sh(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")},
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "GIT_PYTHON_REFRESH": "quiet",
    }
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        )
    return out


def _copy_repo(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file() and not rel.startswith(("mlruns/", "data/", "models/", "reports/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    (dest / "dvc.lock").unlink(missing_ok=True)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"],
    ):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)


def _shrink(params_file: Path, **gate) -> None:
    params = yaml.safe_load(params_file.read_text())
    params["dataset"]["synthetic"].update({"patients": 16})
    params["validate"]["min_per_class"] = 10
    params["train"].update(
        {
            "architectures": ["tiny", "compact_cnn"],
            "epochs": 2,
            "overrides": {"compact_cnn": {"image_size": 32}},
        }
    )
    params["evaluate"].update(
        {"bootstrap": 100, "gradcam_examples": 2, "tflite_int8": False, "benchmark_images": 16}
    )  # int8 export is covered by test_export/test_evaluation
    params["gate"].update({"min_accuracy": 0.0, **gate})
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def _champion(repo: Path) -> str | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=f"sqlite:///{repo}/mlruns/mlflow.db")
    try:
        return str(client.get_model_version_by_alias("malaria-classifier", "champion").version)
    except MlflowException:
        return None


def test_dvc_repro_end_to_end_then_gate_noop_and_failed_gate(tmp_path):
    repo = tmp_path / "repo"
    _copy_repo(repo)
    _shrink(repo / "params.yaml")

    _sh(["dvc", "repro"], repo)
    metrics = _sh(["dvc", "metrics", "show", "--json"], repo).stdout
    for arch in ("tiny", "compact_cnn"):
        assert f"reports/eval/{arch}.json" in metrics
        assert (repo / "models" / arch / "model.keras").exists()
    assert (repo / "reports" / "compare.md").read_text().count("| tiny |") == 1
    assert _champion(repo) == "1"
    assert _sh(["medimg", "gate"], repo).returncode == 0

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{repo}/mlruns/mlflow.db")
    model = mlflow.pyfunc.load_model("models:/malaria-classifier@champion")
    assert model is not None
    # the champion loads and predicts two (real, when ../shared has them) cells without medimg
    rows, medimg_file = predict_without_medimg(
        f"sqlite:///{repo}/mlruns/mlflow.db",
        "models:/malaria-classifier@champion",
        cells_for_server(),
        tmp_path,
    )
    assert len(rows) == 2 and "/code/medimg/" in medimg_file

    _check_ui_server(repo, archs=("tiny", "compact_cnn"))

    t0 = time.perf_counter()
    noop = _sh(["dvc", "repro"], repo)
    assert "Running stage" not in noop.stdout
    assert time.perf_counter() - t0 < 30  # the bench measures the ≤3 s goal; this is a guard

    _shrink(repo / "params.yaml", min_accuracy=0.999)
    _sh(["dvc", "repro"], repo)
    gate = _sh(["medimg", "gate"], repo, check=False)
    assert gate.returncode == 1 and "FAIL" in gate.stdout
    assert _champion(repo) == "1"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _check_ui_server(repo: Path, archs: tuple[str, ...]) -> None:
    """`mlflow server` on our store: its REST API shows every run's test metrics and the alias."""
    import requests

    port = _free_port()
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{repo}/mlruns/mlflow.db",
            "--workers",
            "1",
        ],
        cwd=repo,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        exp = requests.get(
            f"{base}/experiments/get-by-name",
            params={"experiment_name": "medimg-malaria"},
            timeout=10,
        ).json()
        runs = requests.post(
            f"{base}/runs/search",
            timeout=10,
            json={"experiment_ids": [exp["experiment"]["experiment_id"]]},
        ).json()["runs"]
        by_name = {r["info"]["run_name"]: r for r in runs}
        assert set(archs) <= set(by_name)
        for arch in archs:
            metrics = {m["key"] for m in by_name[arch]["data"]["metrics"]}
            assert {"test_accuracy", "test_sensitivity", "val_accuracy"} <= metrics, arch
        alias = requests.get(
            f"{base}/registered-models/alias",
            timeout=10,
            params={"name": "malaria-classifier", "alias": "champion"},
        ).json()
        assert alias["model_version"]["version"] == "1"
    finally:
        server.terminate()
        server.wait(timeout=30)
