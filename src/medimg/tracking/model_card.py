"""A registered version's model card in the store: what it is built from, where it is kept.

`card_sources` reads what the version's run recorded (params, metrics, tags, the evaluate
stage's JSON artifacts). `publish_card` attaches the card to that run (`card/model_card.md`,
`card/model_card.json`), puts its summary into the version's description (the registry page
renders it as markdown) and its digest into the version tag `model_card_sha256`: the run's
artifacts are writable by any member (EDIT on experiments), the version's description and
tags only by `ci` and admins, so `load_card` can tell a card changed after registration.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medimg.errors import MedimgError, error_line

CARD_DIR = "card"
DIGEST_TAG = "model_card_sha256"
MAX_DESCRIPTION = 4900  # model_versions.description is VARCHAR(5000)
# Artifact basenames (under the run's eval/ folder) that feed the card, by role.
SOURCES = {
    "details": ("details.json",),
    "summary": ("summary.json",),
    "slices": ("slices.json",),
    "patient_level": ("patient_level.json", "patients.json", "patient.json"),
}


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def digest(card_json: str) -> str:
    return hashlib.sha256(card_json.encode()).hexdigest()


def _artifact_names(client: Any, run_id: str, folder: str) -> list[str]:
    from mlflow.exceptions import MlflowException

    try:
        return [Path(f.path).name for f in client.list_artifacts(run_id, folder)]
    except (MlflowException, OSError):
        return []


def _read_artifact(run_id: str, path: str, dest: Path) -> Any:
    from medimg.tracking.registry import download_run_artifact

    local = download_run_artifact(run_id, path, dest)
    if local is None:
        return None
    try:
        return json.loads(local.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def version_info(name: str, version: str) -> dict[str, Any]:
    """{'run_id', 'tags', 'created', 'description', 'aliases'} of a version, or a one-line
    error naming it."""
    from mlflow.exceptions import MlflowException

    try:
        mv = _client().get_model_version(name, version)
    except MlflowException as err:
        raise MedimgError(f"{name} v{version}: {error_line(err)}") from None
    created = datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, UTC)
    return {
        "run_id": mv.run_id,
        "tags": dict(mv.tags),
        "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "description": mv.description or "",
        "aliases": list(mv.aliases),
    }


def card_sources(run_id: str) -> dict[str, Any]:
    """What `run_id` recorded for its card: params, metrics, tags, the eval JSON artifacts
    present (by role, see SOURCES) and every eval artifact's name (Grad-CAM images)."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        raise MedimgError(f"run {run_id}: {error_line(err)}") from None
    names = _artifact_names(client, run_id, "eval")
    artifacts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="medimg-card-") as tmp:
        for role, candidates in SOURCES.items():
            found = next((n for n in candidates if n in names), None)
            if found is not None:
                artifacts[role] = _read_artifact(run_id, f"eval/{found}", Path(tmp))
    return {
        "params": dict(run.data.params),
        "metrics": dict(run.data.metrics),
        "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
        "artifacts": {k: v for k, v in artifacts.items() if v is not None},
        "artifact_names": tuple(names),
    }


def publish_card(
    name: str, version: str, run_id: str, card: dict[str, Any], markdown: str, summary: str
) -> str:
    """Attach the card to the version's run, its summary to the version's description and
    its digest to the version's tags; returns the digest."""
    client = _client()
    text = json.dumps(card, indent=2, sort_keys=True, default=str)
    client.log_text(run_id, markdown, f"{CARD_DIR}/model_card.md")
    client.log_text(run_id, text, f"{CARD_DIR}/model_card.json")
    sha = digest(text)
    client.set_model_version_tag(name, version, DIGEST_TAG, sha)
    client.update_model_version(name, version, description=summary[:MAX_DESCRIPTION])
    return sha


def load_card(name: str, version: str) -> tuple[dict[str, Any], bool] | None:
    """The card attached to a version and whether it still matches the digest registered
    with it (False: the run's artifact was changed since); None when it has none."""
    info = version_info(name, version)
    with tempfile.TemporaryDirectory(prefix="medimg-card-") as tmp:
        from medimg.tracking.registry import download_run_artifact

        local = download_run_artifact(info["run_id"], f"{CARD_DIR}/model_card.json", tmp)
        if local is None:
            return None
        text = local.read_text()
    return json.loads(text), info["tags"].get(DIGEST_TAG) == digest(text)


def run_tags(run_id: str | None) -> dict[str, str]:
    """A run's own tags ({} when there is no such run): its git commit and data hash."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return {}
    try:
        return dict(_client().get_run(run_id).data.tags)
    except MlflowException:
        return {}
