"""The `train` stage: one architecture, from shards to a tracked `.keras` model.

The plan (recipe merged with params) is `medimg.models.recipe.resolve_plan`; this module runs
it: tf.data pipelines, precision and distribution strategy, callbacks (resume after a kill,
best checkpoint, per-epoch MLflow metrics), then the model, reports and the served model.
With TF_CONFIG naming several machines (`medimg.distribute`), every machine trains and only
the chief writes and logs.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from medimg import distribute, tracking
from medimg.config import Params, TrainConfig
from medimg.errors import ConfigError, DataError
from medimg.io import atomic_path, read_json, write_json, write_text
from medimg.models.augment import build_augmenter, with_augmentation
from medimg.models.recipe import (
    TrainPlan,
    check_architectures,
    class_weights,
    compile_model,
    model_kwargs,
    resolve_plan,
)


class Throughput(keras.callbacks.Callback):
    """Training images/s per epoch, and the first epoch seen (>0 after a resume)."""

    def __init__(self, images_per_epoch: int) -> None:
        super().__init__()
        self.images = images_per_epoch
        self.first_epoch: int | None = None
        self.rates: list[float] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self.first_epoch is None:
            self.first_epoch = epoch
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        rate = self.images / max(1e-9, time.perf_counter() - self._t0)
        self.rates.append(rate)
        if logs is not None:
            logs["images_per_s"] = rate


class EpochLogger(keras.callbacks.Callback):
    """Per-epoch loss/metrics and the learning rate into the MLflow run, epoch as the step."""

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        values = dict(logs or {})
        lr = self.model.optimizer.learning_rate
        values["learning_rate"] = float(keras.ops.convert_to_numpy(lr))
        tracking.log_metrics(values, step=epoch)


def make_callbacks(
    params: Params, plan: TrainPlan, backup: Path, n_train: int, chief: bool = True
) -> list:
    """Checkpoints and history go to `backup`; only the chief logs to MLflow. Every worker
    gets the same list otherwise: they all see the same epoch logs, so they all stop, save
    and lower the learning rate at the same epochs, as synchronous training needs."""
    t = params.train
    mode = "min" if t.monitor == "val_loss" else "max"
    cbs: list[keras.callbacks.Callback] = [
        keras.callbacks.BackupAndRestore(str(backup / "state")),
        keras.callbacks.ModelCheckpoint(
            str(backup / "best.weights.h5"),
            monitor=t.monitor,
            mode=mode,
            save_best_only=True,
            save_weights_only=True,
        ),
        Throughput(n_train),
        keras.callbacks.CSVLogger(str(backup / "history.csv"), append=True),
        *([EpochLogger()] if chief else []),
    ]
    if t.early_stopping_patience:
        cbs.append(
            keras.callbacks.EarlyStopping(t.monitor, mode=mode, patience=t.early_stopping_patience)
        )
    if plan.schedule == "plateau":
        cbs.append(
            keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.5, patience=2, min_lr=1e-6)
        )
    return cbs


def device_info() -> dict[str, Any]:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return {
        "device": f"{len(gpus)}x GPU" if gpus else "CPU",
        "gpus": len(gpus),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
    }


def configure_precision(mode: str, has_gpu: bool) -> str:
    """mixed_float16 on GPU by default ('auto'); float32 on CPU where it would only slow down."""
    policy = "mixed_float16" if mode == "on" or (mode == "auto" and has_gpu) else "float32"
    keras.mixed_precision.set_global_policy(policy)
    return policy


def choose_strategy(devices: list[str] | None = None):
    """MultiWorkerMirroredStrategy when TF_CONFIG names several machines (each one trains on
    all its GPUs); else MirroredStrategy over several devices (all GPUs by default); else the
    default one. Call it before any other TensorFlow work: the multi-worker strategy has to
    configure the runtime's collective ops before it starts."""
    import tensorflow as tf

    if devices is None and distribute.is_multi_worker(distribute.read_tf_config()):
        return tf.distribute.MultiWorkerMirroredStrategy()
    if devices is None:
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
    if len(devices) > 1:
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.get_strategy()


def _class_info(params: Params) -> dict[str, Any]:
    path = params.paths.classes_json
    if not path.exists():
        raise DataError(f"{path}: not found; run the split stage first")
    info = read_json(path)
    if info["images"]["val"] == 0:
        raise ConfigError("params.yaml: split.fractions.val: training needs a validation split")
    return info


def cache_mode(train: TrainConfig, images: int, image_size: int) -> str:
    """'memory', 'disk' or 'none' for tf.data's image cache.

    `auto` keeps the uint8 images in RAM only while train+val fit in `cache_max_memory_mb`
    at the model's input size; beyond that (OCT2017 at 224 px is ~10 GB) they go to disk, so
    the train stage's memory does not grow with the dataset.
    """
    if train.cache != "auto":
        return train.cache
    need = images * image_size * image_size * 3
    return "memory" if need <= train.cache_max_memory_mb * 1e6 else "disk"


def _datasets(params: Params, plan: TrainPlan, num_classes: int):
    import shutil

    from medimg.data.shards import make_dataset

    images = read_json(params.paths.classes_json)["images"]
    mode = cache_mode(params.train, images["train"] + images["val"], plan.image_size)
    root = params.paths.cache_dir(plan.arch)
    if mode == "disk":  # a killed run leaves tf.data lock files: every attempt starts clean
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
    print(f"train {plan.arch}: image cache {mode}" + (f" in {root}" if mode == "disk" else ""))

    def cache(split: str) -> str:
        return str(root / split) if mode == "disk" else mode

    common = dict(num_classes=num_classes, seed=params.seed)
    train = make_dataset(
        params.paths.split,
        "train",
        plan.image_size,
        plan.batch_size,
        training=True,
        shuffle_buffer=params.train.shuffle_buffer,
        cache=cache("train"),
        **common,
    )
    val = make_dataset(
        params.paths.split, "val", plan.image_size, plan.batch_size, cache=cache("val"), **common
    )
    return train, val


@dataclass(frozen=True)
class TrainJob:
    """What `fit`'s steps share: one architecture's plan, its data summary (classes.json) and
    this task's place in the job (one machine, or the chief or a worker of several)."""

    params: Params
    plan: TrainPlan
    info: dict[str, Any]
    strategy: Any
    tf_config: dict[str, Any] | None
    multi: bool
    chief: bool
    device: dict[str, Any]
    policy: str

    @property
    def backup(self) -> Path:
        return self.params.paths.backup_dir(self.plan.arch)


def fit(params: Params, arch: str, strategy=None) -> dict[str, Any]:
    """Train `arch`, track it in MLflow and write the model, history and metrics.

    With TF_CONFIG naming several machines this is one task of a synchronous job: every task
    trains on its share of each batch; the chief alone writes and logs, the others keep their
    checkpoints in a temporary directory that they delete (see `medimg.distribute`).
    """
    job = _start(params, arch, strategy)
    train_ds, val_ds = _datasets(params, job.plan, job.info["num_classes"])
    if job.multi:  # a split of one shard file has to serve every worker
        train_ds, val_ds = distribute.shard_by_data(train_ds), distribute.shard_by_data(val_ds)
    _reset_backup(job)
    model, trainer = _build(job)
    with _checkpoints_and_run(job) as (folder, run_id):
        throughput, seconds = _train(job, trainer, train_ds, val_ds, folder)
        if job.chief:
            result = _finish(job, model, throughput=throughput, seconds=seconds, run_id=run_id)
        else:
            result = {"epochs_run": len(throughput.rates), "train_seconds": round(seconds, 2)}
    _clean_backup(folder)
    _clean_backup(params.paths.cache_dir(arch))
    if job.multi:  # workers leave once the chief has written and logged (or fail if it died)
        distribute.barrier(job.strategy)
    return result


def _start(params: Params, arch: str, strategy: Any) -> TrainJob:
    """Checks, the MLflow store (an unreachable server fails now), the distribution strategy
    (before any other TensorFlow call), the seed, the plan and the precision policy."""
    check_architectures(params)
    tf_config = distribute.read_tf_config()
    multi, chief = distribute.is_multi_worker(tf_config), distribute.is_chief(tf_config)
    if chief:
        tracking.configure(params.mlflow, params.dataset.name)
    strategy = strategy or choose_strategy()
    keras.utils.set_random_seed(params.seed)
    plan = resolve_plan(params, arch)
    info = _class_info(params)
    device = device_info()
    policy = configure_precision(params.train.mixed_precision, device["gpus"] > 0)
    return TrainJob(params, plan, info, strategy, tf_config, multi, chief, device, policy)


def _reset_backup(job: TrainJob) -> None:
    """The chief's checkpoint folder, emptied of the leftovers of a run that failed before its
    first epoch ended; a multi-worker run always starts over, as its workers keep no state to
    resume from."""
    if not job.chief:
        return
    if job.multi or not (job.backup / "state").exists():
        _clean_backup(job.backup)
    job.backup.mkdir(parents=True, exist_ok=True)


def _build(job: TrainJob) -> tuple[keras.Model, keras.Model]:
    """(the model to save, the compiled model to train: the same with augmentation in front)."""
    from medimg.models import build_model

    params, plan, num_classes = job.params, job.plan, job.info["num_classes"]
    with job.strategy.scope():
        shape = (plan.image_size, plan.image_size, 3)
        model = build_model(plan.arch, shape, num_classes, **model_kwargs(plan))
        trainer = (
            with_augmentation(model, build_augmenter(params.train.augment, params.seed))
            if plan.augmentation
            else model
        )
    if job.multi:  # wrapped outside the scope on purpose: see distribute.CollectiveTrainer
        trainer = distribute.collective_trainer(trainer)
    steps = int(np.ceil(job.info["images"]["train"] / plan.batch_size))
    with job.strategy.scope():
        t = params.train
        compile_model(trainer, plan, num_classes, steps, t.xla, t.label_smoothing)
    return model, trainer


@contextmanager
def _checkpoints_and_run(job: TrainJob) -> Iterator[tuple[Path, str | None]]:
    """(checkpoint folder, MLflow run id) while training. The chief: its backup folder and a
    run (the killed attempt's, reopened, so one architecture keeps one run). A worker: a
    temporary folder it deletes, and no run."""
    if not job.chief:
        with tempfile.TemporaryDirectory(prefix="medimg-") as folder:
            yield Path(folder), None
        return
    params, plan = job.params, job.plan
    resume_id = None if job.multi else _read_resume_id(job.backup)
    tags = {
        "architecture": plan.arch,
        "git_commit": tracking.git_commit(),
        "dataset": params.dataset.name,
        "dataset_fingerprint": job.info["fingerprint"],
        "precision_policy": job.policy,
        "replicas": job.strategy.num_replicas_in_sync,
        "workers": max(1, distribute.training_tasks(job.tf_config)),
        **job.device,
    }
    with tracking.run(plan.arch, resume_id, tags, system_metrics=True) as run_id:
        (job.backup / "mlflow_run_id").write_text(run_id)
        if resume_id is None:
            tracking.log_params(
                {**params.model_dump(mode="json", by_alias=True), "plan": asdict(plan)}
            )
            tracking.log_dataset(split_dataset(params), "train")  # one input: the whole split
        yield job.backup, run_id


def _train(
    job: TrainJob, trainer: keras.Model, train_ds: Any, val_ds: Any, folder: Path
) -> tuple[Throughput, float]:
    """`trainer.fit`, then the best epoch's weights: (its throughput callback, seconds)."""
    params, plan = job.params, job.plan
    callbacks = make_callbacks(params, plan, folder, job.info["images"]["train"], job.chief)
    counts, classes = job.info["counts"]["train"], job.info["classes"]
    weights = class_weights(counts, classes) if params.train.class_weights else None
    t0 = time.perf_counter()
    with job.strategy.scope() if job.multi else nullcontext():  # see distribute.CollectiveTrainer
        trainer.fit(
            train_ds,
            validation_data=val_ds,
            epochs=plan.epochs,
            callbacks=callbacks,
            class_weight=weights,
            shuffle=False,  # the tf.data pipeline shuffles, seeded
            verbose=2,
        )
    seconds = time.perf_counter() - t0
    if (folder / "best.weights.h5").exists():
        trainer.load_weights(str(folder / "best.weights.h5"))
    return next(c for c in callbacks if isinstance(c, Throughput)), seconds


def _finish(
    job: TrainJob, model: keras.Model, *, throughput: Throughput, seconds: float, run_id: str
) -> dict[str, Any]:
    """The chief's last step: write the DVC outputs and log the same to the MLflow run."""
    from medimg.analysis.plots import plot_learning_curves, save_figure

    params, plan, paths = job.params, job.plan, job.params.paths
    model_file = paths.model_file(plan.arch)
    model_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(model_file, suffix=".keras") as tmp:
        keras.saving.save_model(model, str(tmp))
    history = _read_history(job.backup / "history.csv")
    reports = paths.train_reports(plan.arch)
    reports.mkdir(parents=True, exist_ok=True)
    write_text(reports / "history.csv", history_csv(history))
    best = _best_epoch(history, params.train.monitor)
    metrics = {
        "params": int(model.count_params()),
        "keras_bytes": model_file.stat().st_size,
        "epochs_run": len(history["epoch"]),
        "best_epoch": best["epoch"],
        "val_accuracy": best.get("val_accuracy"),
        "val_loss": best.get("val_loss"),
        "train_seconds": round(seconds, 2),
        "images_per_s": round(float(np.median(throughput.rates)), 1) if throughput.rates else None,
        "resumed_from_epoch": throughput.first_epoch or 0,
    }
    write_json(reports / "metrics.json", metrics)
    fig = plot_learning_curves(history, title=f"{plan.arch} learning curves")
    save_figure(fig, reports / "learning_curves.png")
    summary: list[str] = []
    model.summary(print_fn=lambda line, **_: summary.append(line))
    counts = ("params", "keras_bytes", "epochs_run", "best_epoch", "resumed_from_epoch")
    tracking.log_params({k: metrics[k] for k in counts})  # sizes and counts, not measurements
    tracking.log_metrics({f"final_{k}": v for k, v in metrics.items() if k not in counts})
    tracking.log_artifact(reports / "learning_curves.png", "plots")
    tracking.log_artifact(reports / "history.csv", "history")
    tracking.log_text("\n".join(summary), "model_summary.txt")
    run_info = {  # evaluate logs the served model into this run, with its operating point
        "run_id": run_id,
        "architecture": plan.arch,
        "image_size": plan.image_size,
        "plan": asdict(plan),
    }
    write_json(paths.train_run(plan.arch), run_info)
    print(f"train {plan.arch}: {json.dumps(metrics)}")
    return {**metrics, **run_info}


def split_dataset(params: Params) -> Any:
    """The split as the MLflow dataset of this pipeline (digest: the split fingerprint)."""
    fingerprint = read_json(params.paths.classes_json)["fingerprint"]
    return tracking.split_dataset(params.paths.split_manifest, params.dataset.name, fingerprint)


def _read_history(path: Path) -> dict[str, list[float]]:
    """CSVLogger's file, de-duplicated by epoch (a resumed run appends to it)."""
    import pandas as pd

    frame = pd.read_csv(path).drop_duplicates("epoch", keep="last").sort_values("epoch")
    return {c: frame[c].astype(float).tolist() for c in frame.columns}


def history_csv(history: dict[str, list[float]]) -> str:
    import pandas as pd

    frame = pd.DataFrame(history)
    frame["epoch"] = frame["epoch"].astype(int) + 1
    return frame.to_csv(index=False)


def _best_epoch(history: dict[str, list[float]], monitor: str) -> dict[str, Any]:
    values = np.asarray(history.get(monitor, history["loss"]), dtype=float)
    i = int(np.nanargmin(values) if monitor == "val_loss" else np.nanargmax(values))
    return {k: float(v[i]) for k, v in history.items()} | {"epoch": i + 1}


def _read_resume_id(backup: Path) -> str | None:
    """The MLflow run of a killed attempt, reopened so one architecture keeps one run."""
    marker = backup / "mlflow_run_id"
    if (backup / "state").exists() and marker.exists():
        return marker.read_text().strip() or None
    return None


def _clean_backup(backup: Path) -> None:
    import shutil

    shutil.rmtree(backup, ignore_errors=True)


def run(params: Params, arch: str) -> dict[str, Any]:
    return fit(params, arch)
