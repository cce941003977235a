"""Training on several machines: who the chief is, and Keras 3 under MultiWorkerMirroredStrategy.

`TF_CONFIG` (JSON: the cluster's `chief`/`worker` addresses, and this task's type and index)
makes `medimg.train.fit` one replica of a synchronous job: every task runs the same steps and
the gradients are all-reduced over the network, but only the chief writes the model and the
reports and talks to MLflow. The helpers that read `TF_CONFIG` are pure functions of the
parsed dict, so the chief/worker decision is tested without a cluster.

Keras 3.15 with TF 2.21 cannot `fit` under MultiWorkerMirroredStrategy as documented
(keras-team/keras#20585, tensorflow/tensorflow#72388); `collective_trainer` works around both
failures with public APIs only, see `CollectiveTrainer`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import keras

from medimg.errors import ConfigError

TRAINING_JOBS = ("chief", "worker")  # the only task types MultiWorkerMirroredStrategy trains on


def read_tf_config(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """`TF_CONFIG` parsed, or None when unset or empty.

    Bad JSON fails here with the variable's name, before TensorFlow would fail with a less
    helpful message in the middle of creating the strategy.
    """
    raw = (os.environ if environ is None else environ).get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"TF_CONFIG: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError("TF_CONFIG: must be a JSON object with 'cluster' and 'task'")
    return config


def _cluster(tf_config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return (tf_config or {}).get("cluster") or {}


def training_tasks(tf_config: Mapping[str, Any] | None) -> int:
    """How many tasks train (chief + workers): the machines of one job; 0 without a cluster."""
    return sum(len(_cluster(tf_config).get(job) or []) for job in TRAINING_JOBS)


def is_multi_worker(tf_config: Mapping[str, Any] | None) -> bool:
    """More than one training task: fit runs under MultiWorkerMirroredStrategy."""
    return training_tasks(tf_config) > 1


def task_of(tf_config: Mapping[str, Any] | None) -> tuple[str, int] | None:
    """This process's (task type, index), checked against the cluster; None without a cluster.

    Another task type (`ps`, `evaluator`) is refused: this pipeline trains synchronously, on
    chief and worker tasks only.
    """
    if training_tasks(tf_config) == 0:
        return None
    task = (tf_config or {}).get("task") or {}
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in TRAINING_JOBS:
        raise ConfigError(f"TF_CONFIG: task.type: {kind!r}; expected one of {TRAINING_JOBS}")
    members = _cluster(tf_config).get(kind) or []
    if not isinstance(index, int) or not 0 <= index < len(members):
        raise ConfigError(
            f"TF_CONFIG: task.index: {index!r}; cluster.{kind} has {len(members)} task(s)"
        )
    return kind, index


def is_chief(tf_config: Mapping[str, Any] | None) -> bool:
    """Whether this task writes the model and reports and logs to MLflow.

    The `chief` task when the cluster has one, else worker 0 (TensorFlow's own convention);
    a process without a cluster in TF_CONFIG is alone, hence its own chief.
    """
    task = task_of(tf_config)
    if task is None:
        return True
    kind, index = task
    if kind == "chief":
        return True
    return index == 0 and not _cluster(tf_config).get("chief")


def shard_by_data(dataset: Any) -> Any:
    """`dataset` with tf.data auto-sharding by DATA: every worker reads all the shard files and
    keeps its share of the batches.

    The default (AUTO) shards by file and fails when a split has fewer TFRecord files than
    there are workers (a small split is one file); by data, every split works and, with the
    same seeded shuffle on every worker, the workers' batches never overlap.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


class CollectiveTrainer(keras.Model):
    """The model `fit` trains under MultiWorkerMirroredStrategy (Keras 3.15, TF 2.21).

    Two failures of plain `fit` there, and what avoids them:

    1. A model *constructed* inside a strategy scope makes `fit` build it from the first batch,
       averaged across workers by `strategy.reduce` of the whole (images, labels) tuple, which
       the collective strategy cannot do with a nested value ("Attempt to convert a value
       (PerReplica...)"). Built by `collective_trainer` outside the scope, around layers that
       were created (with their variables) inside it, this wrapper owns no variables and is
       built already; `fit` then runs under the strategy because it is called in its scope.
    2. Each step's logs are then averaged across workers with `strategy.reduce(..., axis=0)`,
       which fails on the scalar loss and metrics ("Invalid reduction dimension 0 for input
       with 0 dimensions"). The steps below give every log a leading axis of one.

    Per-step logs are thus the mean over workers; the per-epoch logs (history, callbacks,
    MLflow) are Keras' metric results, whose variables sum over all replicas: exact.
    """

    def train_step(self, data: Any) -> dict[str, Any]:
        return _leading_axis(super().train_step(data))

    def test_step(self, data: Any) -> dict[str, Any]:
        return _leading_axis(super().test_step(data))


def _leading_axis(logs: Mapping[str, Any]) -> dict[str, Any]:
    return {name: keras.ops.expand_dims(value, 0) for name, value in logs.items()}


def collective_trainer(model: keras.Model) -> keras.Model:
    """`model` (built in the strategy scope) wrapped for `fit` under the collective strategy.

    Call it outside any strategy scope (see `CollectiveTrainer`), then compile and fit the
    wrapper inside `strategy.scope()`. Save `model`, not the wrapper.
    """
    import tensorflow as tf

    if tf.distribute.has_strategy():
        raise RuntimeError("collective_trainer: call it outside strategy.scope()")
    inputs = keras.Input(shape=model.input_shape[1:], name="image")
    return CollectiveTrainer(inputs, model(inputs), name=f"{model.name}_workers")


def barrier(strategy: Any) -> int:
    """Wait until every worker gets here (one all-reduce); returns the number of replicas.

    Workers call it after the chief has written and logged: a worker that left earlier would
    look crashed to the chief's coordination service, and one that waits here fails (instead
    of exiting 0) when the chief dies before it is done.
    """
    import tensorflow as tf

    ones = strategy.experimental_distribute_values_from_function(lambda _: tf.constant(1.0))
    return int(strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None))
