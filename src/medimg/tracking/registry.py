"""The model registry: versions, aliases, and finding a model's files from a `--model` spec."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medimg.errors import MedimgError, error_line

SERVING_MODEL_NAME = "classifier"
SERVING_ALIASES = ("champion", "challenger", "previous")
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


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


def set_alias(name: str, alias: str, version: str) -> None:
    _client().set_registered_model_alias(name, alias, version)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # None (no console), or a closed stream
        return False


@contextmanager
def download_progress_on_terminal_only() -> Iterator[None]:
    """MLflow's "Downloading artifacts" bar only when stderr is a terminal.

    In a log (`medimg predict DIR 2>err`, CI) its carriage-return updates are dozens of lines
    of noise. MLflow reads the variable when a download starts, so it is set for the download
    only and removed after; a value the user exported is left alone.
    """
    if PROGRESS_BAR_ENV in os.environ or _is_terminal(sys.stderr):
        yield
        return
    os.environ[PROGRESS_BAR_ENV] = "false"
    try:
        yield
    finally:
        os.environ.pop(PROGRESS_BAR_ENV, None)


def download_run_artifact(run_id: str, path: str, dest: str | Path) -> Path | None:
    """A run's artifact as a local file, or None when the run has no such artifact."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        with download_progress_on_terminal_only():
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=str(dest)
            )
    except (MlflowException, OSError):
        return None
    return Path(local)


def read_run_json(run_id: str, path: str) -> Any | None:
    """A run's JSON artifact (e.g. the champion's `eval/slices.json`, which the gate compares
    slice by slice), or None when the run has no such artifact or it is not JSON."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = download_run_artifact(run_id, path, tmp)
        if local is None or not local.is_file():
            return None
        try:
            return json.loads(local.read_text())
        except ValueError:
            return None


def resolve_model(spec: str, name: str, dest: Path) -> tuple[Path, dict[str, Any]]:
    """The `.keras` file behind `spec`, downloaded under `dest`, and what the registry says.

    `spec`: an alias of `name` (champion, challenger, previous, or any other), a version
    number, a `models:/` URI, `runs:/<run_id>/<model>` or a bare run id (that run's logged
    model, `classifier` preferred). Works for the pyfunc serving model (the `.keras` artifact)
    and for the Keras flavour (`data/model.keras`). The info has `model_uri`, `name`,
    `version`, `run_id`, `tags`, the version's `operating_threshold` (and `patient_threshold`)
    when tagged, and the serving model's `classes`/`threshold` when it is one.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri, info = _model_source(spec, name)
    try:
        with download_progress_on_terminal_only():
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except (MlflowException, OSError) as err:
        raise MedimgError(f"model {spec!r} ({uri}): cannot download: {error_line(err)}") from None
    keras_files = sorted(local.rglob("*.keras")) if local.is_dir() else [local]
    keras_files = [p for p in keras_files if p.suffix == ".keras"]
    if not keras_files:
        raise MedimgError(f"model {spec!r} ({uri}) holds no .keras file")
    info |= _serving_config(local)
    threshold = info.get("tags", {}).get("operating_threshold")
    if threshold is not None:
        info["operating_threshold"] = float(threshold)
    patient = info.get("tags", {}).get("patient_threshold")
    if patient is not None:
        info["patient_threshold"] = float(patient)  # the version's tag before the config's
    return keras_files[0], {**info, "spec": spec, "model_uri": uri}


def _model_source(spec: str, name: str) -> tuple[str, dict[str, Any]]:
    """(download URI, registry info) for a `--model` spec; a one-line error if unknown."""
    import re

    if spec.startswith("models:/"):
        return spec, _models_uri_info(spec)
    if spec.startswith("runs:/"):
        return spec, {"run_id": spec.removeprefix("runs:/").split("/")[0], "tags": {}}
    if re.fullmatch(r"[0-9a-f]{32}", spec):
        return _run_model_uri(spec), {"run_id": spec, "tags": {}}
    if spec.isdigit():
        return f"models:/{name}/{spec}", _version(name, spec, None)
    return f"models:/{name}@{spec}", _version(name, None, spec)


def _models_uri_info(uri: str) -> dict[str, Any]:
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return _version(name, None, alias)
    parts = rest.split("/")
    if len(parts) == 2 and parts[1].isdigit():
        return _version(parts[0], parts[1], None)
    return _logged_model_info(rest)  # models:/m-<id>: a logged model, maybe unregistered


def _logged_model_info(model_id: str) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    try:
        logged = _client().get_logged_model(model_id)
    except MlflowException as err:
        raise MedimgError(f"model {model_id}: {error_line(err)}") from None
    return {"run_id": logged.source_run_id, "tags": {}}


def _version(name: str, version: str | None, alias: str | None) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    try:
        client = _client()
        mv = (
            client.get_model_version_by_alias(name, alias)
            if alias
            else client.get_model_version(name, version)
        )
    except MlflowException as err:
        what = f"alias {alias!r}" if alias else f"version {version}"
        hint = "; run `dvc repro register`" if alias in SERVING_ALIASES else ""
        raise MedimgError(f"{name}: no {what} ({error_line(err)}){hint}") from None
    return {
        "name": name,
        "version": str(mv.version),
        "run_id": mv.run_id,
        "tags": dict(mv.tags),
        "aliases": list(mv.aliases),
    }


def _run_model_uri(run_id: str) -> str:
    """`models:/<id>` of the run's logged model: the serving `classifier`, else the newest."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        experiment = client.get_run(run_id).info.experiment_id
        models = list(
            client.search_logged_models(
                experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}'"
            )
        )
    except MlflowException as err:
        raise MedimgError(f"run {run_id}: {error_line(err)}") from None
    if not models:
        raise MedimgError(f"run {run_id}: no logged model")
    models.sort(key=lambda m: (m.name == SERVING_MODEL_NAME, m.creation_timestamp))
    return f"models:/{models[-1].model_id}"


def _serving_config(local: Path) -> dict[str, Any]:
    """`classes`, `image_size`, `threshold` of a downloaded serving model ({} for others)."""
    from mlflow.models import Model

    mlmodel = local / "MLmodel"
    if not mlmodel.exists():
        return {}
    flavor = Model.load(str(mlmodel)).flavors.get("python_function", {})
    config = flavor.get("config") or {}  # where pyfunc keeps `model_config`
    keys = ("classes", "image_size", "threshold", "tta", "temperature", "patient_threshold")
    return {k: config[k] for k in keys if k in config}
