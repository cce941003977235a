from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from medimg.config import parse_params
from medimg.errors import ConfigError
from medimg.io import read_json
from medimg.models.loading import load_model
from medimg.models.recipe import check_architectures, class_weights, resolve_plan
from medimg.train import cache_mode, fit
from tests.conftest import REPO, tiny_params, write_split_dir


def _client(params):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=params.mlflow.tracking_uri)


def test_one_epoch_run_is_tracked_and_its_model_loads(split_params):
    result = fit(split_params, "tiny")
    paths = split_params.paths
    assert paths.model_file("tiny").exists()
    metrics = read_json(paths.train_reports("tiny") / "metrics.json")
    assert metrics["epochs_run"] == 1 and metrics["params"] > 0 and metrics["keras_bytes"] > 0
    history = (paths.train_reports("tiny") / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,") and "val_accuracy" in history[0] and len(history) == 2

    client = _client(split_params)
    run = client.get_run(result["run_id"])
    assert run.info.run_name == "tiny"
    assert run.data.params["train.epochs"] == "1" and run.data.params["plan.image_size"] == "32"
    for key in ("loss", "accuracy", "val_accuracy", "val_loss", "learning_rate"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 1, key
    assert run.data.tags["dataset_fingerprint"] == read_json(paths.classes_json)["fingerprint"]
    assert run.data.tags["device"] == "CPU" and run.data.tags["git_commit"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"plots", "history", "model_summary.txt"} <= artifacts
    # counts are params, not metrics; the split is the run's dataset input, digest = fingerprint
    assert (
        int(run.data.params["params"]) == metrics["params"]
        and "final_params" not in run.data.metrics
    )
    inputs = {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
    fingerprint = read_json(paths.classes_json)["fingerprint"]
    assert inputs == {("malaria-split", fingerprint)}
    raw = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    pred = np.asarray(load_model(paths.model_file("tiny"))(raw))
    assert pred.shape == (3, 1) and ((pred >= 0) & (pred <= 1)).all()
    assert read_json(paths.train_run("tiny"))["run_id"] == result["run_id"]


def test_auto_cache_keeps_uint8_images_in_memory_only_while_they_fit(tmp_path):
    train = tiny_params(tmp_path).train
    assert train.cache == "auto" and train.cache_max_memory_mb == 1024
    assert cache_mode(train, 19_284, 64) == "memory"  # the NIH set at 64 px: 237 MB
    assert cache_mode(train, 100_000, 224) == "disk"  # OCT2017 at 224 px: 15 GB
    for fixed in ("memory", "disk", "none"):
        assert cache_mode(train.model_copy(update={"cache": fixed}), 100_000, 224) == fixed


def test_disk_cache_trains_and_is_removed_afterwards(tmp_path, capsys):
    params = tiny_params(tmp_path, train={"cache": "disk"})
    write_split_dir(params)
    stale = params.paths.cache_dir("tiny")
    stale.mkdir(parents=True)
    (stale / "train_0.lockfile").write_text("a killed run")  # would block tf.data's cache
    fit(params, "tiny")
    assert f"image cache disk in {stale}" in capsys.readouterr().out
    assert params.paths.model_file("tiny").exists() and not stale.exists()


def test_plan_merges_recipe_train_and_overrides(tmp_path):
    params = tiny_params(
        tmp_path,
        train={"architectures": ["tiny"], "epochs": 3, "overrides": {"tiny": {"epochs": 5}}},
    )
    plan = resolve_plan(params, "tiny")
    assert plan.epochs == 5 and plan.batch_size == 8
    assert plan.image_size == 32 and plan.optimizer == "adam"  # the tiny model's recipe


def test_augmentation_follows_the_recipe_unless_overridden(tmp_path):
    params = tiny_params(tmp_path, train={"overrides": {"resnet_mini": {"augmentation": False}}})
    # seed 001 trained its basic CNN without augmentation, seed 000 its ResNet with it
    assert resolve_plan(params, "simple_cnn").augmentation is False
    assert resolve_plan(params, "compact_cnn").augmentation is True
    assert resolve_plan(params, "resnet_mini").augmentation is False
    with pytest.raises(ConfigError, match=r"train\.overrides\.tiny\.augmentation"):
        tiny_params(tmp_path, train={"overrides": {"tiny": {"augmentation": "sometimes"}}})


def test_bad_train_params_fail_with_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        parse_params({"train": {"epochs": -1}})
    params = tiny_params(tmp_path, train={"architectures": ["tiny", "resnet9000"]})
    with pytest.raises(ConfigError, match=r"train\.architectures\.1: unknown .*available: .*tiny"):
        check_architectures(params)


def test_class_weights_balance_the_train_counts():
    w = class_weights({"a": 30, "b": 10}, ["a", "b"])
    assert w[0] * 30 == pytest.approx(w[1] * 10)


def _params_file(params, tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump(mode="json", by_alias=True)))
    return path


@pytest.mark.slow
def test_training_resumes_after_a_kill(tmp_path):
    epochs = 40
    params = tiny_params(
        tmp_path, train={"architectures": ["tiny"], "epochs": epochs, "early_stopping_patience": 0}
    )
    write_split_dir(params)
    cmd = [sys.executable, str(REPO / "stages" / "train.py"), "tiny", "--params"]
    cmd.append(str(_params_file(params, tmp_path)))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = params.paths.backup_dir("tiny") / "history.csv"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 4:  # header + 3 epochs
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not params.paths.model_file("tiny").exists()

    subprocess.run(cmd, env=env, check=True, capture_output=True)
    metrics = read_json(params.paths.train_reports("tiny") / "metrics.json")
    assert metrics["resumed_from_epoch"] >= 3
    assert metrics["epochs_run"] == epochs
    runs = _client(params).search_runs(
        [_client(params).get_experiment_by_name("medimg-malaria").experiment_id]
    )
    assert len(runs) == 1  # the killed attempt's MLflow run was reopened, not duplicated
    assert not params.paths.backup_dir("tiny").exists()


MIRRORED = """
import sys, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
from medimg.config import load_params
from medimg.train import choose_strategy, fit
params = load_params(sys.argv[1])
strategy = choose_strategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2, strategy
result = fit(params, "tiny", strategy=strategy)
print("REPLICAS", strategy.num_replicas_in_sync, result["epochs_run"])
"""


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(split_params, tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", MIRRORED, str(_params_file(split_params, tmp_path))],
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "REPLICAS 2 1" in out.stdout
    run = _client(split_params).get_run(read_json(split_params.paths.train_run("tiny"))["run_id"])
    assert run.data.tags["replicas"] == "2"


def test_cosine_schedule_warms_up_then_decays_and_label_smoothing_is_binary_only(tmp_path):
    import keras

    from medimg.models.recipe import compile_model, learning_rate

    train = {"schedule": "cosine", "learning_rate": 0.01, "epochs": 4}
    params = tiny_params(tmp_path, train=train)
    plan = resolve_plan(params, "tiny")
    schedule = learning_rate(plan, steps_per_epoch=10)
    values = [
        float(keras.ops.convert_to_numpy(schedule(step))) for step in (0, 10, plan.epochs * 10)
    ]
    assert values[0] == 0.0 and values[1] == pytest.approx(0.01) and values[2] == pytest.approx(0.0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    with pytest.raises(ConfigError, match="label_smoothing"):
        compile_model(model, plan, 3, 10, False, label_smoothing=0.1)
