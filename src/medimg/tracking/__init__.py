"""Everything MLflow: runs (`runs`), the model registry (`registry`), the team server (`server`).

Callers use `from medimg import tracking` and the names below. Importing this package imports
no mlflow: each function imports it when called, so nothing happens at import.
"""

from medimg.tracking.registry import (
    SERVING_ALIASES,
    SERVING_MODEL_NAME,
    download_run_artifact,
    read_run_json,
    register_version,
    resolve_model,
    set_alias,
    version_by_alias,
)
from medimg.tracking.runs import (
    configure,
    flatten,
    git_commit,
    is_local_store,
    log_artifact,
    log_code_model,
    log_dataset,
    log_metrics,
    log_params,
    log_text,
    run,
    set_tags,
    split_dataset,
    tracking_uri,
)

__all__ = [
    "SERVING_ALIASES",
    "SERVING_MODEL_NAME",
    "configure",
    "download_run_artifact",
    "flatten",
    "git_commit",
    "is_local_store",
    "log_artifact",
    "log_code_model",
    "log_dataset",
    "log_metrics",
    "log_params",
    "log_text",
    "read_run_json",
    "register_version",
    "resolve_model",
    "run",
    "set_alias",
    "set_tags",
    "split_dataset",
    "tracking_uri",
    "version_by_alias",
]
