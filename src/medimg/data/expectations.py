"""The Great Expectations 1.x suite over the manifest: its expectations, the file context in
`gx/`, the checkpoint, and the failure report read back from its result.

Every bound of the suite comes from `validate:` in params.yaml; one suite per dataset, so
switching datasets never rewrites the other's committed suite.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from medimg.config import Params, ValidateConfig

if TYPE_CHECKING:
    from great_expectations.checkpoint.checkpoint import Checkpoint, CheckpointResult
    from great_expectations.core import ExpectationSuite
    from great_expectations.data_context import AbstractDataContext

# GX object names inside the context; one suite per dataset so switching datasets never
# rewrites the other's committed suite.
DATASOURCE = "medimg"
ASSET = "manifest"
BATCH = "all_images"
SITE = "medimg_local_site"
CLASS_LEVEL_COLUMNS = ("class_images", "class_imbalance")
MAX_LISTED = 50
MAX_EXAMPLES = 3
RESULT_FORMAT: dict[str, Any] = {
    "result_format": "COMPLETE",
    "unexpected_index_column_names": ["path", "class"],
    "return_unexpected_index_query": False,
}

# ---------------------------------------------------------------- the suite


def suite_name(dataset: str) -> str:
    return f"{dataset}_manifest"


@dataclass(frozen=True)
class Spec:
    """One check: its short label for humans, the GX expectation, and the params key it reads."""

    label: str
    expectation: str
    param: str
    kwargs: dict[str, Any]


def expectation_specs(cfg: ValidateConfig, dataset: str) -> list[Spec]:
    """Every check in report order; all bounds come from params.

    "Exactly the expected classes" is two checks, one naming extra folders' files, one counting
    the expected classes present (GX's distinct-values-equal-set result breaks its own Data Docs
    renderer when it fails).
    """
    (wlo, whi), (hlo, hhi) = cfg.width, cfg.height
    n_classes = len(set(cfg.classes))
    return [
        Spec("classes", "ExpectColumnValuesToBeInSet", "validate.classes",
             {"column": "class", "value_set": list(cfg.classes)}),
        Spec("all classes present", "ExpectColumnUniqueValueCountToBeBetween", "validate.classes",
             {"column": "known_class", "min_value": n_classes, "max_value": n_classes}),
        Spec("images per class", "ExpectColumnValuesToBeBetween", "validate.min_per_class",
             {"column": "class_images", "min_value": cfg.min_per_class}),
        Spec("class balance", "ExpectColumnValuesToBeBetween", "validate.max_class_imbalance",
             {"column": "class_imbalance", "max_value": cfg.max_class_imbalance}),
        Spec("width in range", "ExpectColumnValuesToBeBetween", "validate.width",
             {"column": "width", "min_value": wlo, "max_value": whi}),
        Spec("height in range", "ExpectColumnValuesToBeBetween", "validate.height",
             {"column": "height", "min_value": hlo, "max_value": hhi}),
        Spec("mode in set", "ExpectColumnValuesToBeInSet", "validate.modes",
             {"column": "mode", "value_set": list(cfg.modes)}),
        Spec("format in set", "ExpectColumnValuesToBeInSet", "validate.formats",
             {"column": "format", "value_set": list(cfg.formats)}),
        Spec("images decode", "ExpectColumnValuesToBeInSet", "validate.max_corrupt_fraction",
             {"column": "decodable", "value_set": [True]}),
        Spec("patient id", "ExpectColumnValuesToMatchRegex", "validate.patient_regex",
             {"column": "file", "regex": cfg.patient_pattern(dataset)}),
        Spec("no image in two classes", "ExpectColumnValuesToBeBetween", "validate.classes",
             {"column": "sha256_classes", "max_value": 1}),
    ]  # fmt: skip


def build_suite(cfg: ValidateConfig, dataset: str) -> ExpectationSuite:
    """The suite, rebuilt from params on every run; same params give the same suite file."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    name = suite_name(dataset)
    specs = expectation_specs(cfg, dataset)
    suite = gx.ExpectationSuite(
        name=name,
        expectations=[
            getattr(gxe, spec.expectation)(
                **spec.kwargs, meta={"check": spec.label, "param": spec.param}
            )
            for spec in specs
        ],
    )
    # Set after construction: GX refuses to build a suite from expectations that have ids.
    for expectation, spec in zip(suite.expectations, specs, strict=True):
        expectation.id = stable_id(name, spec.expectation, spec.kwargs)
    return suite


def stable_id(*parts: Any) -> str:
    """GX ids from content instead of uuid4: the committed suite changes only with params."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(parts, sort_keys=True)))


# ---------------------------------------------------------------- the GX context


def _site_config(gx_dir: Path, docs_dir: Path) -> dict[str, Any]:
    """A local Data Docs site; relative to the context so the committed config is portable."""
    rel = os.path.relpath(docs_dir.absolute(), gx_dir.absolute())
    return {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {
            "class_name": "TupleFilesystemStoreBackend",
            "base_directory": Path(rel).as_posix() + "/",
        },
        "site_index_builder": {
            "class_name": "DefaultSiteIndexBuilder",
            "validation_results_limit": 20,
        },
    }


def open_context(gx_dir: Path, docs_dir: Path) -> AbstractDataContext:
    """The file context at `gx_dir` (scaffolded if empty), quiet and pointing at our docs site.

    The config is saved only when it differs, so a run never churns the committed file.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", context_root_dir=gx_dir)
    variables = context.variables
    sites = {SITE: _site_config(gx_dir, docs_dir)}
    bars = variables.progress_bars
    quiet = bars is not None and not bars["globally"] and not bars["metric_calculations"]
    if variables.data_docs_sites == sites and quiet and variables.analytics_enabled is False:
        return context
    variables.data_docs_sites = sites
    variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    variables.analytics_enabled = False
    variables.save()
    return context


def _batch_definition(context: AbstractDataContext) -> Any:
    """Get-or-add, never add-or-update: a re-added data source would get fresh ids in the yml."""
    try:
        source = context.data_sources.get(DATASOURCE)
    except LookupError:
        source = context.data_sources.add_pandas(DATASOURCE)
    try:
        asset = source.get_asset(ASSET)
    except LookupError:
        asset = source.add_dataframe_asset(ASSET)
    try:
        return asset.get_batch_definition(BATCH)
    except LookupError:
        return asset.add_batch_definition_whole_dataframe(BATCH)


def save_suite(context: AbstractDataContext, suite: ExpectationSuite) -> ExpectationSuite:
    """Store the suite keeping our content-derived ids.

    GX gives every expectation of a newly added suite a random id, so a new suite is first
    added empty; the update that follows keeps the ids we set.
    """
    import great_expectations as gx
    from great_expectations.exceptions import DataContextError

    try:
        context.suites.get(suite.name)
    except DataContextError:
        context.suites.add(gx.ExpectationSuite(name=suite.name))
    return context.suites.add_or_update(suite)


def checkpoint_for(context: AbstractDataContext, cfg: ValidateConfig, dataset: str) -> Checkpoint:
    """Suite, validation definition and checkpoint, stored (idempotently) in the context."""
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    suite = save_suite(context, build_suite(cfg, dataset))
    definition = gx.ValidationDefinition(
        name=suite_name(dataset), data=_batch_definition(context), suite=suite
    )
    return context.checkpoints.add_or_update(
        gx.Checkpoint(
            name=f"{dataset}_validate",
            validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="update_data_docs", site_names=[SITE])],
            result_format=RESULT_FORMAT,
        )
    )


def init_context(params: Params) -> Checkpoint:
    """Create or refresh the GX context at `paths.gx` from params, without validating anything.

    This is how the committed `gx/` folder is made; `run` does the same before each check.
    """
    context = open_context(Path(params.paths.gx), params.paths.data_docs)
    return checkpoint_for(context, params.validate_cfg, params.dataset.name)


# ---------------------------------------------------------------- reading the result


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def failure_examples(
    column: str,
    result: Mapping[str, Any],
    frame: pd.DataFrame,
    classes: Collection[str],
    limit: int = MAX_EXAMPLES,
) -> list[str]:
    """Up to `limit` human examples: files for row checks, classes for class-level checks."""
    rows = result.get("unexpected_index_list") or []
    if column in CLASS_LEVEL_COLUMNS:
        seen = dict.fromkeys(f"class {r['class']}: {column} = {_short(r[column])}" for r in rows)
        return list(seen)[:limit]
    if column == "decodable":
        errors = dict(zip(frame["path"], frame["error"], strict=True))
        return [f"{r['path']}: {errors.get(r['path'])}" for r in rows[:limit]]
    if rows:
        return [f"{r['path']} ({column} = {_short(r.get(column))})" for r in rows[:limit]]
    if column == "known_class":  # the distinct-count check: name what is missing
        present = set(frame["class"])
        return [f"missing class {c!r}" for c in classes if c not in present][:limit]
    return []


def _failure(res: Any, frame: pd.DataFrame, classes: Collection[str]) -> dict[str, Any]:
    config = res.expectation_config
    column = config.kwargs.get("column", "")
    meta = config.meta or {}
    result = res.result or {}
    rows = result.get("unexpected_index_list") or []
    exception = (res.exception_info or {}).get("exception_message")
    observed = result.get("observed_value")
    unexpected = result.get("unexpected_count")
    examples = (
        [f"error: {exception}"] if exception else failure_examples(column, result, frame, classes)
    )
    return {
        "check": meta.get("check", config.type),
        "param": meta.get("param"),
        "expectation": config.type,
        "column": column,
        "unexpected": None if unexpected is None else int(unexpected),
        "observed": None if observed is None else _short(observed),
        "examples": examples,
        "flagged": sorted({r["path"] for r in rows}),
    }


def failed_checks(
    checkpoint_result: CheckpointResult, frame: pd.DataFrame, classes: Collection[str]
) -> list[dict]:
    """One plain dict per failed expectation, in suite order, ready for JSON and stderr."""
    return [
        _failure(res, frame, classes)
        for suite_result in checkpoint_result.run_results.values()
        for res in suite_result.results
        if not res.success
    ]


def evaluated_count(checkpoint_result: CheckpointResult) -> int:
    return sum(len(r.results) for r in checkpoint_result.run_results.values())


def mark_rejected(manifest: pd.DataFrame, failures: list[dict]) -> pd.DataFrame:
    """Usable rows that a failed check points at become `rejected`, for the failure report."""
    flagged = {path for f in failures for path in f["flagged"]}
    hit = (manifest["status"] == "ok") & manifest["path"].isin(flagged)
    return manifest.assign(status=manifest["status"].where(~hit, "rejected"))


def _listed(frame: pd.DataFrame, columns: list[str]) -> list[dict[str, Any]]:
    return frame[columns].head(MAX_LISTED).to_dict("records")


def summarize(
    manifest: pd.DataFrame,
    failures: list[dict],
    evaluated: int,
    dataset: str,
    docs_index: Path,
) -> dict[str, Any]:
    """The JSON report (a DVC metric): deterministic, no timestamps, so reruns don't churn it."""
    status = manifest["status"]
    valid = manifest[status == "ok"]
    return {
        "dataset": dataset,
        "success": not failures,
        "files": len(manifest),
        "images": int((status != "junk").sum()),
        "valid": len(valid),
        "junk": int((status == "junk").sum()),
        "corrupt": int((status == "corrupt").sum()),
        "rejected": int((status == "rejected").sum()),
        "patients": int(valid["patient"].nunique()),
        "per_class": {str(k): int(v) for k, v in sorted(valid["class"].value_counts().items())},
        "expectations": evaluated,
        "failed_expectations": [{k: v for k, v in f.items() if k != "flagged"} for f in failures],
        "corrupt_files": _listed(manifest[status == "corrupt"], ["path", "error"]),
        "junk_files": manifest.loc[status == "junk", "path"].head(MAX_LISTED).tolist(),
        "data_docs": docs_index.as_posix(),
    }


def failure_text(report: Mapping[str, Any]) -> str:
    """The stderr block a human reads first; the Data Docs page has the rest."""
    failed = report["failed_expectations"]
    lines = [f"validate: {len(failed)} of {report['expectations']} expectations failed"]
    for f in failed:
        count = f": {f['unexpected']} unexpected" if f["unexpected"] else ""
        if not count and f["observed"] is not None:
            count = f": observed {f['observed']}"
        lines.append(f"  - {f['check']} [{f['param']}]{count}")
        lines += [f"      {example}" for example in f["examples"]]
    lines.append(f"  data docs: {report['data_docs']}")
    return "\n".join(lines)


def corrupt_note(report: Mapping[str, Any]) -> str:
    files = [f"    {c['path']}: {c['error']}" for c in report["corrupt_files"][:MAX_EXAMPLES]]
    more = report["corrupt"] - len(files)
    tail = [f"    ... and {more} more in the validation report"] if more > 0 else []
    head = f"excluded {report['corrupt']} corrupt image(s) (within validate.max_corrupt_fraction):"
    return "\n".join([head, *files, *tail])
