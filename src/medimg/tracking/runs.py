"""MLflow runs: where they go, and what they record.

Only `medimg.tracking` imports mlflow (and `medimg.pyfunc_classifier`, an MLflow model),
and nothing happens at import: the tracking URI is set by `configure`, called by the stages,
so tests and library users choose their own store. The local default is SQLite
(`mlruns/mlflow.db`) with artifacts under `mlruns/artifacts`; MLflow 3 no longer accepts the
plain file store for the registry and aliases we rely on.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np

from medimg.config import MlflowConfig

# MLflow 3's UI opens an experiment without this tag on the GenAI trace overview; with it, on
# the training runs (the UI's "custom model development" kind).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def tracking_uri(cfg: MlflowConfig) -> str:
    """`MLFLOW_TRACKING_URI` when set (a teammate's shell, CI), else `mlflow.tracking_uri`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


def is_local_store(uri: str) -> bool:
    """A store on this machine (SQLite or files): one user, no server in between."""
    return uri.startswith(("sqlite:", "file:", "/", ".")) or "://" not in uri


def configure(cfg: MlflowConfig, dataset: str) -> str:
    """Point MLflow at the store (env over params) and return the dataset's experiment id.

    A server is checked first, so a stage fails in seconds with one line naming the URI or
    the refused user, before any training. On a server, artifacts go where it says (proxied);
    on a local store, under `mlflow.artifact_root`.
    """
    import mlflow

    from medimg.tracking.server import check_credentials, check_reachable

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    check_reachable(uri)
    check_credentials(uri)
    user_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if user_env is None:  # MLflow exports the URI to the environment; only the user's counts
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    name = cfg.experiment_name(dataset)
    found = mlflow.get_experiment_by_name(name)
    exp_id = ensure_experiment(name, cfg)  # a new one is tagged there
    if found is not None and found.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        _set_kind(exp_id)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def ensure_experiment(name: str, cfg: MlflowConfig) -> str:
    """The id of experiment `name`, created when missing (on a local store with its artifacts
    under `mlflow.artifact_root`; a server puts them where it says)."""
    import mlflow

    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    if is_local_store(tracking_uri(cfg)):
        artifacts = Path(cfg.artifact_root).resolve()
        artifacts.mkdir(parents=True, exist_ok=True)
        exp_id = mlflow.create_experiment(name, artifact_location=artifacts.as_uri())
    else:
        exp_id = mlflow.create_experiment(name)
    _set_kind(exp_id)  # the UI's model-training view, not its GenAI one
    return exp_id


def _set_kind(exp_id: str) -> None:
    """Tag the experiment's kind; cosmetic, so an account that may only read (a server's
    default READ) is not stopped by its 403."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with suppress(MlflowException):
        mlflow.MlflowClient().set_experiment_tag(exp_id, *EXPERIMENT_KIND)


@contextmanager
def run(
    run_name: str | None = None,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    system_metrics: bool = False,
) -> Iterator[str]:
    """Start (or, with `run_id`, reopen) a run; yields its id and ends it on exit.

    `system_metrics` samples CPU, memory (and GPU) use into the run while it is open: the
    numbers that explain a slow epoch in the UI.
    """
    import mlflow

    with mlflow.start_run(
        run_id=run_id,
        run_name=None if run_id else run_name,
        log_system_metrics=system_metrics,
    ) as active:
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


def log_metrics(
    metrics: Mapping[str, Any],
    step: int | None = None,
    prefix: str = "",
    model_id: str | None = None,
    dataset: Any = None,
) -> None:
    """Log the numeric leaves of a (nested) metrics dict; None and text are skipped.

    `model_id` and `dataset` (from `split_dataset`) link the values to the logged model and
    the data they were measured on, so MLflow 3 shows them on the model's page.
    """
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
        mlflow.log_metrics(numeric, step=step, model_id=model_id, dataset=dataset)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    mlflow.log_artifact(str(path), artifact_path)


def split_dataset(split_manifest: str | Path, dataset: str, fingerprint: str) -> Any:
    """The split (`<dataset>-split`) as an MLflow dataset whose digest is its fingerprint.

    Two runs with the same digest were trained and tested on the same patients; the UI groups
    them by it.
    """
    import mlflow
    import pandas as pd

    frame = pd.read_parquet(split_manifest)
    return mlflow.data.from_pandas(
        frame,
        source=str(Path(split_manifest).resolve()),
        name=f"{dataset}-split",
        digest=fingerprint,
    )


def log_dataset(dataset: Any, context: str) -> None:
    """Record `dataset` as an input of the active run (`context`: train, val or test)."""
    import mlflow

    mlflow.log_input(dataset, context=context)


def log_text(text: str, name: str) -> None:
    import mlflow

    mlflow.log_text(text, name)


def set_tags(tags: Mapping[str, Any]) -> None:
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_code_model(
    model_code: Path,
    code_paths: list[Path],
    artifacts: Mapping[str, Path],
    config: Mapping[str, Any],
    signature_params: Mapping[str, float],
    input_example: Any = None,
    name: str = "classifier",
) -> tuple[str, str]:
    """Log a pyfunc written as MLflow "models from code"; returns (model URI, model id).

    `model_code` is the file that calls `mlflow.models.set_model`; `code_paths` travel with
    the model, so it loads where the package that wrote it is not installed. Requirements are
    pinned from this environment, so MLflow neither infers them in a subprocess nor validates
    the example by serving it.
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    params = ParamSchema([ParamSpec(k, "double", float(v)) for k, v in signature_params.items()])
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(model_code),
        code_paths=[str(p) for p in code_paths],
        artifacts={k: str(v) for k, v in artifacts.items()},
        model_config=dict(config),
        signature=ModelSignature(params=params),
        input_example=input_example,
        pip_requirements=_requirements(),
    )
    return info.model_uri, info.model_id


def _requirements() -> list[str]:
    """Pinned from this environment; inferring them would re-import the model in a subprocess."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    # pyarrow: the served model's request log writes Parquet (medimg.monitoring.request_log)
    packages = ("keras", "tensorflow-cpu", "tensorflow", "numpy", "pillow", "pandas", "pydantic")
    for pkg in (*packages, "pyarrow"):
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
