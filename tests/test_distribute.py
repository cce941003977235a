"""Who trains how under TF_CONFIG: pure functions of the parsed dict, no cluster needed.
The two-process job itself is tests/test_train_multiworker.py (slow)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medimg.distribute import (
    collective_trainer,
    is_chief,
    is_multi_worker,
    read_tf_config,
    task_of,
    training_tasks,
)
from medimg.errors import ConfigError

WORKERS = ["10.0.0.1:2222", "10.0.0.2:2222", "10.0.0.3:2222"]


def _config(task_type: str, index: int, chief: bool = False) -> dict:
    cluster = {"worker": WORKERS, **({"chief": ["10.0.0.9:2222"]} if chief else {})}
    return {"cluster": cluster, "task": {"type": task_type, "index": index}}


def test_without_tf_config_a_process_trains_alone_and_is_its_own_chief():
    assert read_tf_config({}) is None and read_tf_config({"TF_CONFIG": "  "}) is None
    assert training_tasks(None) == 0 and not is_multi_worker(None)
    assert task_of(None) is None and is_chief(None)


def test_worker_zero_is_the_chief_when_the_cluster_has_no_chief_task():
    assert is_multi_worker(_config("worker", 0)) and training_tasks(_config("worker", 0)) == 3
    assert [is_chief(_config("worker", i)) for i in range(3)] == [True, False, False]


def test_the_chief_task_is_the_chief_and_then_no_worker_is():
    assert training_tasks(_config("chief", 0, chief=True)) == 4
    assert is_chief(_config("chief", 0, chief=True))
    assert [is_chief(_config("worker", i, chief=True)) for i in range(3)] == [False] * 3


def test_a_cluster_of_one_task_is_not_multi_worker():
    config = {"cluster": {"worker": WORKERS[:1]}, "task": {"type": "worker", "index": 0}}
    assert not is_multi_worker(config) and is_chief(config)


def test_tf_config_is_read_from_the_environment_and_bad_values_name_the_variable():
    config = _config("worker", 1)
    assert read_tf_config({"TF_CONFIG": json.dumps(config)}) == config
    assert not is_chief(read_tf_config({"TF_CONFIG": json.dumps(config)}))
    with pytest.raises(ConfigError, match="TF_CONFIG: not valid JSON"):
        read_tf_config({"TF_CONFIG": "{worker: 1"})
    with pytest.raises(ConfigError, match="TF_CONFIG: must be a JSON object"):
        read_tf_config({"TF_CONFIG": "[1, 2]"})
    with pytest.raises(ConfigError, match=r"task\.index: 3; cluster\.worker has 3"):
        is_chief(_config("worker", 3))
    with pytest.raises(ConfigError, match=r"task\.type: 'ps'"):
        is_chief(_config("ps", 0) | {"cluster": {"worker": WORKERS, "ps": ["10.0.0.8:2222"]}})
    with pytest.raises(ConfigError, match=r"task\.type: None"):
        task_of({"cluster": {"worker": WORKERS}})


def test_collective_trainer_trains_and_logs_scalars_outside_a_cluster():
    """The multi-worker wrapper, checked where it runs in one process: same weights, scalar
    epoch logs although each step returns its logs with a leading axis."""
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    trainer = collective_trainer(model)
    assert trainer.weights == model.weights  # owns none of its own
    trainer.compile("adam", "binary_crossentropy", metrics=["accuracy"])
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = (x[:, :1] > 0).astype("float32")
    history = trainer.fit(x, y, batch_size=8, epochs=2, validation_data=(x, y), verbose=0)
    assert set(history.history) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(isinstance(v, float) for values in history.history.values() for v in values)


def test_workers_log_nothing_to_mlflow_but_keep_every_other_callback(tmp_path):
    from medimg.models.recipe import resolve_plan
    from medimg.train import EpochLogger, make_callbacks
    from tests.conftest import tiny_params

    params = tiny_params(tmp_path)
    plan = resolve_plan(params, "tiny")
    chief = make_callbacks(params, plan, tmp_path, 48)
    worker = make_callbacks(params, plan, tmp_path, 48, chief=False)
    assert [type(c) for c in chief if not isinstance(c, EpochLogger)] == [type(c) for c in worker]
    assert any(isinstance(c, EpochLogger) for c in chief)
    assert not any(isinstance(c, EpochLogger) for c in worker)
