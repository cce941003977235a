"""Two training processes on 127.0.0.1, one TF_CONFIG each: one MultiWorkerMirroredStrategy
job, as on two machines. The chief writes the model and reports and logs one MLflow run; the
worker trains the same steps and leaves nothing behind."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from medimg.io import read_json
from tests.conftest import REPO, tiny_params, write_split_dir

TIMEOUT_S = 420  # two TensorFlow start-ups and one tiny epoch on a shared 2-core machine


def _free_ports(n: int) -> list[int]:
    """n distinct ports the OS just handed out on 127.0.0.1 (all held open at once)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _one_shard_per_split(split_dir: Path) -> None:
    """Rewrite each split as a single TFRecord file: fewer files than workers, the case that
    sharding by file cannot serve."""
    import tensorflow as tf

    from medimg.data.shards import shard_files, shard_name

    for split in ("train", "val", "test"):
        files = shard_files(split_dir, split)
        records = list(tf.data.TFRecordDataset(files).as_numpy_iterator())
        for f in files:
            Path(f).unlink()
        with tf.io.TFRecordWriter(str(split_dir / shard_name(split, 0, 1))) as writer:
            for record in records:
                writer.write(record)
    assert len(shard_files(split_dir, "train")) == 1


def _params_file(params, path: Path) -> Path:
    path.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    return path


def _epoch_losses(log: str) -> list[str]:
    """Keras' per-epoch lines (verbose=2): '6/6 - 3s - ... - loss: 0.6931 - val_...'."""
    return re.findall(r"(?<!\w)loss: ([0-9.]+)", log)


@pytest.mark.slow
def test_two_workers_train_one_model_and_only_the_chief_writes_and_logs(tmp_path):
    try:
        ports = _free_ports(2)
    except OSError as err:
        pytest.skip(f"cannot bind 127.0.0.1: {err}")
    chief = tiny_params(tmp_path / "chief")
    write_split_dir(chief)
    split_dir = Path(chief.paths.split)
    _one_shard_per_split(split_dir)
    # the worker's own paths (and MLflow store): the split is the same data, as after `dvc pull`
    worker = tiny_params(tmp_path / "worker", paths={"split": str(split_dir)})
    worker_tmp = tmp_path / "worker-tmp"
    worker_tmp.mkdir()

    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    procs: list[subprocess.Popen] = []
    logs = [tmp_path / "chief.log", tmp_path / "worker.log"]
    try:
        for index, params in enumerate((chief, worker)):
            task = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            extra = {"TF_CONFIG": json.dumps(task)} | ({"TMPDIR": str(worker_tmp)} if index else {})
            params_file = _params_file(params, tmp_path / f"params-{index}.yaml")
            cmd = [sys.executable, str(REPO / "stages" / "train.py"), "tiny", "--params"]
            with logs[index].open("w") as out:
                procs.append(
                    subprocess.Popen(
                        [*cmd, str(params_file)], env=env | extra, stdout=out, stderr=out
                    )
                )
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            time.sleep(0.2)
        codes = [p.poll() for p in procs]
        texts = [log.read_text() for log in logs]
        tails = "\n".join(
            f"--- {log.name}:\n{text[-3000:]}" for log, text in zip(logs, texts, strict=True)
        )
        assert codes == [0, 0], f"exit codes {codes} (None: killed after {TIMEOUT_S}s)\n{tails}"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    # both processes ran the same synchronous epoch: identical (global) loss values
    chief_losses, worker_losses = (_epoch_losses(t) for t in texts)
    assert chief_losses and chief_losses == worker_losses, tails

    paths = chief.paths
    assert paths.model_file("tiny").exists()
    metrics = read_json(paths.train_reports("tiny") / "metrics.json")
    assert metrics["epochs_run"] == 1
    assert (paths.train_reports("tiny") / "history.csv").exists()
    run_id = read_json(paths.train_run("tiny"))["run_id"]
    assert not paths.backup_dir("tiny").exists()

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=chief.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name("medimg-malaria")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = runs[0]
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    assert run.data.tags["replicas"] == "2" and run.data.tags["workers"] == "2"
    assert len(client.get_metric_history(run_id, "loss")) == 1

    # the worker wrote no model, report or MLflow store, and removed its checkpoint folder
    for folder in ("models", "reports", "mlruns"):
        assert not (tmp_path / "worker" / folder).exists(), folder
    assert list(worker_tmp.iterdir()) == []
