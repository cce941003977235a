"""Everything MLflow, in one module.

Only this module imports mlflow, and nothing happens at import: the tracking URI is set by
`configure`, called by the stages, so tests and library users choose their own store. The
store is SQLite (`mlruns/mlflow.db`) with artifacts under `mlruns/artifacts`; MLflow 3 no
longer accepts the plain file store for the registry and aliases we rely on.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import keras
import numpy as np

from medimg.config import MlflowConfig


def configure(cfg: MlflowConfig, dataset: str) -> str:
    """Point MLflow at the store of `cfg` and return the dataset's experiment id."""
    import mlflow

    if cfg.tracking_uri.startswith("sqlite:///"):
        Path(cfg.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    name = cfg.experiment_name(dataset)
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        exp_id = found.experiment_id
    else:
        artifacts = Path(cfg.artifact_root).resolve()
        artifacts.mkdir(parents=True, exist_ok=True)
        exp_id = mlflow.create_experiment(name, artifact_location=artifacts.as_uri())
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


@contextmanager
def run(
    run_name: str | None = None, run_id: str | None = None, tags: Mapping[str, str] | None = None
) -> Iterator[str]:
    """Start (or, with `run_id`, reopen) a run; yields its id and ends it on exit."""
    import mlflow

    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name) as active:
        if tags:
            mlflow.set_tags(dict(tags))
        yield active.info.run_id


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'epochs': 8}} → {'train.epochs': 8}; lists become strings."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def log_params(tree: Mapping[str, Any]) -> None:
    import mlflow

    flat = {k: str(v)[:6000] for k, v in flatten(tree).items()}
    items = sorted(flat.items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        mlflow.log_params(dict(items[i : i + 100]))


def log_metrics(metrics: Mapping[str, float], step: int | None = None, prefix: str = "") -> None:
    """Log the numeric leaves of a (nested) metrics dict; None and text are skipped."""
    import mlflow

    flat = flatten(metrics, prefix)
    numeric = {
        k.replace("@", "_at_"): float(v)
        for k, v in flat.items()
        if isinstance(v, int | float | np.floating | np.integer)
        and not isinstance(v, bool)
        and np.isfinite(v)
    }
    if numeric:
        mlflow.log_metrics(numeric, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path)


def log_text(text: str, name: str) -> None:
    import mlflow

    mlflow.log_text(text, name)


def set_tags(tags: Mapping[str, Any]) -> None:
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items()})


class EpochLogger(keras.callbacks.Callback):
    """Per-epoch loss/metrics and the learning rate, with the epoch as MLflow step."""

    def on_epoch_end(self, epoch: int, logs: Mapping[str, float] | None = None) -> None:
        values = dict(logs or {})
        values["learning_rate"] = current_learning_rate(self.model)
        log_metrics(values, step=epoch)


def current_learning_rate(model: keras.Model) -> float:
    lr = model.optimizer.learning_rate
    return float(keras.ops.convert_to_numpy(lr))


def log_keras_model(model: keras.Model, input_example: np.ndarray) -> str:
    """Log with the Keras flavour, signature and example; returns the model URI."""
    import mlflow
    from mlflow.models import infer_signature

    signature = infer_signature(input_example, model.predict(input_example, verbose=0))
    with _example_dir_fix():
        info = mlflow.keras.log_model(
            model,
            name="model",
            signature=signature,
            input_example=input_example,
            pip_requirements=_requirements(),
        )
    return info.model_uri


@contextmanager
def _example_dir_fix() -> Iterator[None]:
    """MLflow 3's Keras flavour writes the input example before creating the model folder
    (FileNotFoundError on `input_example.json`); create the folder first."""
    import os
    from unittest import mock

    import mlflow.keras.save as keras_save

    original = keras_save._save_example

    def save_example(mlflow_model: Any, example: Any, path: str, *args: Any, **kw: Any) -> Any:
        os.makedirs(path, exist_ok=True)
        return original(mlflow_model, example, path, *args, **kw)

    with mock.patch.object(keras_save, "_save_example", save_example):
        yield


def _requirements() -> list[str]:
    """Pinned from this environment; inferring them would re-import the model in a subprocess."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("keras", "tensorflow-cpu", "tensorflow", "numpy", "pillow"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return reqs


def git_commit(repo: str | Path = ".") -> str:
    """HEAD's sha, with '-dirty' when the tree has changes; 'unknown' outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


# ------------------------------------------------------------------------------ model registry


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def register_version(model_uri: str, name: str, tags: Mapping[str, Any]) -> str:
    """A new version of registered model `name` from `model_uri`; returns the version."""
    import mlflow

    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    return str(version.version)


def version_by_alias(name: str, alias: str) -> dict[str, Any] | None:
    """{'version', 'run_id', 'tags'} of the version holding `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        mv = _client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    return {"version": str(mv.version), "run_id": mv.run_id, "tags": dict(mv.tags)}


def version_info(name: str, version: str) -> dict[str, Any]:
    mv = _client().get_model_version(name, version)
    return {"version": str(mv.version), "run_id": mv.run_id, "tags": dict(mv.tags),
            "aliases": list(mv.aliases)}


def set_alias(name: str, alias: str, version: str) -> None:
    _client().set_registered_model_alias(name, alias, version)


def set_version_tags(name: str, version: str, tags: Mapping[str, Any]) -> None:
    client = _client()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def download_run_artifact(run_id: str, path: str, dest: str | Path) -> Path | None:
    """A run's artifact as a local file, or None when the run has no such artifact."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=path, dst_path=str(dest)
        )
    except (MlflowException, OSError):
        return None
    return Path(local)
