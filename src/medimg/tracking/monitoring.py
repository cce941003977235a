"""MLflow's side of `medimg monitor`: the reference stored with a model version, and the
monitoring run that records each check of a window.

The reference is the served model's own `monitoring_reference` artifact (logged by evaluate
with the pyfunc), found through the version's logged model: the MLmodel file names it, so
this reads one small JSON, not the weights. Each check is a run in the experiment
`<experiment>-monitoring` (kept out of the training experiment the team compares), tagged with
the model name, version and alias and with its metrics linked to the version's logged model
(`model_id`): the version's model page lists every check, drifted or not.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from medimg.config import MlflowConfig
from medimg.errors import MedimgError, error_line

REFERENCE_KEY = "monitoring_reference"  # medimg.classifier_logging.REFERENCE_ARTIFACT
KIND_TAG = ("medimg.kind", "monitoring")


def _client() -> Any:
    import mlflow

    return mlflow.MlflowClient()


def version_model(name: str, version: str) -> dict[str, Any]:
    """The version's logged model: {model_id, artifact_location, run_id, aliases}."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        mv = client.get_model_version(name, str(version))
        model_id = getattr(mv, "model_id", None) or str(mv.source).removeprefix("models:/")
        logged = client.get_logged_model(model_id)
    except MlflowException as err:
        raise MedimgError(f"{name} v{version}: {error_line(err)}") from None
    return {
        "model_id": model_id,
        "artifact_location": logged.artifact_location.rstrip("/"),
        "run_id": mv.run_id,
        "aliases": list(mv.aliases),
    }


def version_reference(name: str, version: str) -> dict[str, Any] | None:
    """The monitoring reference stored with `name` v`version`, or None when the version was
    logged without one (before monitoring existed)."""
    import json

    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    location = version_model(name, version)["artifact_location"]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mlmodel = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{location}/MLmodel", dst_path=tmp
            )
            flavor = yaml.safe_load(Path(mlmodel).read_text())["flavors"]["python_function"]
            entry = (flavor.get("artifacts") or {}).get(REFERENCE_KEY)
            if entry is None:
                return None
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{location}/{entry['path']}", dst_path=tmp
            )
            return json.loads(Path(local).read_text())
        except (MlflowException, OSError, KeyError, ValueError) as err:
            why = error_line(err)
            raise MedimgError(f"{name} v{version}: cannot read its reference: {why}") from None


def log_monitoring_run(
    cfg: MlflowConfig,
    experiment: str,
    name: str,
    version: str,
    *,
    alias: str | None,
    metrics: Mapping[str, float],
    params: Mapping[str, Any],
    files: list[Path],
    verdict: str,
) -> str:
    """One monitoring run (experiment `experiment`, created when missing): the window's
    metrics linked to the version's logged model, the report files as artifacts; its id."""
    import mlflow

    from medimg.tracking.runs import ensure_experiment

    model = version_model(name, version)
    exp_id = ensure_experiment(experiment, cfg)
    tags = {
        KIND_TAG[0]: KIND_TAG[1],
        "model_name": name,
        "model_version": str(version),
        "model_alias": alias or "",
        "model_id": model["model_id"],
        "verdict": verdict,
    }
    run_name = f"{name}-v{version}-{verdict}"
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name) as active:
        mlflow.set_tags(tags)
        mlflow.log_params({k: str(v)[:6000] for k, v in params.items()})
        mlflow.log_metrics(dict(metrics), model_id=model["model_id"])
        for file in files:
            mlflow.log_artifact(str(file), "monitoring")
        return active.info.run_id
