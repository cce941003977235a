"""`--model`: resolving the reference a command is given (alias, version, run, URI or .keras
file) to a model, and loading it as a `Classifier`."""

from __future__ import annotations

import tempfile
from pathlib import Path

from medimg.config import Params
from medimg.errors import MedimgError
from medimg.scoring import Classifier, check_classes, model_size, pick_threshold


def _check_store(params: Params, spec: str) -> None:
    from medimg.tracking import tracking_uri

    uri = tracking_uri(params.mlflow)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise MedimgError(
            f"{uri.removeprefix('sqlite:///')}: no MLflow store to resolve model {spec!r} in; "
            "run `dvc repro` first or pass --model path/to/model.keras"
        )


def load_classifier(
    params: Params, spec: str, threshold: float | None = None, tta: bool | None = None
) -> Classifier:
    """Resolve `--model` (alias, version, run, models:/ URI or .keras file) and load it.

    The registry's copy is downloaded to a temporary folder that is gone once the model is in
    memory. Threshold: `threshold`, else the version's `operating_threshold` tag, else the
    serving model's own, else 0.5. TTA and temperature: the served model's (as evaluated);
    `tta` overrides TTA. A bare `.keras` file has neither (raw probabilities).
    """
    from medimg.models.loading import load_model  # Keras and TF: only when a model is loaded

    if spec.endswith(".keras"):
        path = Path(spec)
        if not path.is_file():
            raise MedimgError(f"{path}: model file not found")
        model, info = load_model(path), {"keras_path": str(path), "spec": spec}
    else:
        from medimg import tracking

        _check_store(params, spec)
        tracking.configure(params.mlflow, params.dataset.name)
        name = params.register_cfg.registered_name(params.dataset.name)
        with tempfile.TemporaryDirectory(prefix="medimg-model-") as tmp:
            path, info = tracking.resolve_model(spec, name, Path(tmp))
            model = load_model(path)
    classes = check_classes(model, info.get("classes") or params.validate_cfg.classes)
    chosen = pick_threshold(threshold, info)
    use_tta = bool(info.get("tta", False)) if tta is None else tta
    temperature = float(info.get("temperature", 1.0))
    return Classifier(model, classes, model_size(model), chosen, info, use_tta, temperature)


MODEL_HELP = (
    "alias of the registered model (champion, challenger, previous), a version number, a run "
    "id, runs:/ or models:/ URI, or a .keras file (default: %(default)s)"
)
