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
    return {
        "version": str(mv.version),
        "run_id": mv.run_id,
        "tags": dict(mv.tags),
        "aliases": list(mv.aliases),
    }


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


# ----------------------------------------------------------------------- serving model (pyfunc)
# The registered model that `mlflow models serve` and `mlflow.pyfunc.load_model` use, and how
# `medimg predict/explain/export` find a model's `.keras` file from an alias, version or run.
# The `.keras` file is an artifact of the pyfunc and is loaded with safe_mode=True; decoding and
# scoring are `medimg.predict.serving_predict`, so the wrapper only adapts MLflow's interface.

SERVING_MODEL_NAME = "classifier"
SERVING_ALIASES = ("champion", "challenger", "previous")


def log_serving_model(
    keras_path: Path,
    classes: list[str],
    image_size: int,
    threshold: float = 0.5,
    input_example: np.ndarray | None = None,
) -> str:
    """Log, in the active run, the pyfunc `classifier` that serves `keras_path`; returns its URI.

    It takes base64 PNG/JPEG in a DataFrame (`image` column) or raw (N, H, W, 3) pixels, so no
    input schema is set (one would reject the other kind); its only signature entry is the
    optional request parameter `threshold`. `input_example` (raw pixels) is stored as base64
    PNGs, the request format most clients will copy. Requirements are pinned (`_requirements`),
    so MLflow neither infers them in a subprocess nor validates the example by serving it.
    """
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    signature = ModelSignature(params=ParamSchema([ParamSpec("threshold", "double", threshold)]))
    config = {"classes": list(classes), "image_size": int(image_size), "threshold": threshold}
    info = mlflow.pyfunc.log_model(
        name=SERVING_MODEL_NAME,
        python_model=_serving_model_class()(),
        artifacts={"keras_model": str(keras_path)},
        model_config=config,
        signature=signature,
        input_example=_serving_example(input_example),
        pip_requirements=[*_requirements(), *_serving_requirements()],
    )
    return info.model_uri


def _serving_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return [f"pandas=={version('pandas')}"]
    except PackageNotFoundError:
        return []


def _serving_example(images: np.ndarray | None) -> Any:
    """Up to two example images as the DataFrame of base64 PNGs a client would send."""
    if images is None or len(images) == 0:
        return None
    import base64
    import io

    import pandas as pd
    from PIL import Image

    encoded = []
    for image in np.asarray(images)[:2]:
        buf = io.BytesIO()
        Image.fromarray(np.clip(image, 0, 255).round().astype(np.uint8)).save(buf, format="PNG")
        encoded.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return pd.DataFrame({"image": encoded})


_SERVING_CLASS: list[type] = []


def _serving_model_class() -> type:
    """The PythonModel subclass, built on first use so importing this module imports no mlflow.

    Defined in a function, cloudpickle stores it by value in the logged model; its methods
    call `medimg.predict` and `medimg.evaluation` by name, so the serving environment needs
    medimg installed (`--env-manager local`, or the package on the image).
    """
    if _SERVING_CLASS:
        return _SERVING_CLASS[0]
    import mlflow

    _SERVING_CLASS.append(_define_serving_class(mlflow.pyfunc.PythonModel))
    return _SERVING_CLASS[0]


def _define_serving_class(base: type) -> type:
    class MedimgClassifier(base):
        """Keras image classifier: base64 images or pixel arrays in, class + probability out."""

        # `predict` has no type hints on purpose: MLflow would turn them into an input schema
        # that rejects one of the two input kinds. This (MLflow's own switch for its built-in
        # models) stops it wrapping `predict` and warning about the missing hints every time
        # the class is created, i.e. on every load.
        _skip_type_hint_validation = True

        def load_context(self, context: Any) -> None:
            from medimg.evaluation import load_model

            self.model = load_model(context.artifacts["keras_model"])
            config = context.model_config or {}
            self.classes = list(config["classes"])
            self.size = int(config["image_size"])
            self.threshold = float(config.get("threshold", 0.5))

        def predict(self, context, model_input, params=None):
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

            from medimg.predict import serving_predict

            threshold = float((params or {}).get("threshold", self.threshold))
            try:
                return serving_predict(self.model, model_input, self.classes, self.size, threshold)
            except ValueError as err:  # ImageInputError: the request, not the model, is wrong
                raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None

    return MedimgClassifier


def resolve_model(spec: str, name: str, dest: Path) -> tuple[Path, dict[str, Any]]:
    """The `.keras` file behind `spec`, downloaded under `dest`, and what the registry says.

    `spec`: an alias of `name` (champion, challenger, previous, or any other), a version
    number, a `models:/` URI, `runs:/<run_id>/<model>` or a bare run id (that run's logged
    model, `classifier` preferred). Works for the pyfunc serving model (the `.keras` artifact)
    and for the Keras flavour (`data/model.keras`). The info has `model_uri`, `name`,
    `version`, `run_id`, `tags`, the version's `operating_threshold` when tagged, and the
    serving model's `classes`/`threshold` when it is one.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from medimg.errors import MedimgError

    uri, info = _model_source(spec, name)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except (MlflowException, OSError) as err:
        raise MedimgError(f"model {spec!r} ({uri}): cannot download: {_first_line(err)}") from None
    keras_files = sorted(local.rglob("*.keras")) if local.is_dir() else [local]
    keras_files = [p for p in keras_files if p.suffix == ".keras"]
    if not keras_files:
        raise MedimgError(f"model {spec!r} ({uri}) holds no .keras file")
    info |= _serving_config(local)
    threshold = info.get("tags", {}).get("operating_threshold")
    if threshold is not None:
        info["operating_threshold"] = float(threshold)
    return keras_files[0], {**info, "spec": spec, "model_uri": uri}


def _first_line(err: BaseException) -> str:
    text = str(getattr(err, "message", None) or err).strip()
    return text.splitlines()[0] if text else type(err).__name__


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

    from medimg.errors import MedimgError

    try:
        logged = _client().get_logged_model(model_id)
    except MlflowException as err:
        raise MedimgError(f"model {model_id}: {_first_line(err)}") from None
    return {"run_id": logged.source_run_id, "tags": {}}


def _version(name: str, version: str | None, alias: str | None) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    from medimg.errors import MedimgError

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
        raise MedimgError(f"{name}: no {what} ({_first_line(err)}){hint}") from None
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

    from medimg.errors import MedimgError

    client = _client()
    try:
        experiment = client.get_run(run_id).info.experiment_id
        models = list(
            client.search_logged_models(
                experiment_ids=[experiment], filter_string=f"source_run_id = '{run_id}'"
            )
        )
    except MlflowException as err:
        raise MedimgError(f"run {run_id}: {_first_line(err)}") from None
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
    return {k: config[k] for k in ("classes", "image_size", "threshold") if k in config}
