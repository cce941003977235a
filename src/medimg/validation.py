"""DVC stage `validate`: a manifest of the raw archive, checked by a Great Expectations suite.

The archive comes from outside, so every member is looked at before anything downstream trusts
it: junk (`Thumbs.db`, non-images) is counted and dropped, undecodable images are corrupt, and
the rest must pass a suite whose every bound comes from `validate:` in params.yaml. Only a
passing archive gets a manifest; a failing one gets a human report and Data Docs, and an older
manifest is left exactly as it was, so the split stage never sees half-checked data.

Statuses in the manifest: `ok` (checked, usable), `junk` (not an image, never fatal), `corrupt`
(empty, undecodable, or over `dataset.limits.max_image_pixels`; excluded and listed while their
share stays within `validate.max_corrupt_fraction`), `rejected` (decodable but flagged by a
failed expectation; only ever seen in a failure report, since a failure writes no manifest).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import uuid
import zipfile
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from medimg.archive import iter_members
from medimg.config import ArchiveLimits, Params, SplitConfig, ValidateConfig
from medimg.errors import ConfigError, DataError
from medimg.io import atomic_path, write_json

if TYPE_CHECKING:
    from great_expectations.checkpoint.checkpoint import Checkpoint, CheckpointResult
    from great_expectations.core import ExpectationSuite
    from great_expectations.data_context import AbstractDataContext

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".ppm", ".pgm"}
)
STATUSES = ("ok", "junk", "corrupt", "rejected")

# The manifest contract the split stage reads: column -> pandas dtype, in this order.
MANIFEST_DTYPES: dict[str, str] = {
    "path": "str",
    "class": "str",
    "split_folder": "str",
    "patient": "str",
    "format": "str",
    "width": "Int64",
    "height": "Int64",
    "mode": "str",
    "channels": "Int64",
    "bytes": "int64",
    "sha256": "str",
    "decodable": "bool",
    "error": "str",
    "status": "str",
}
MANIFEST_COLUMNS = tuple(MANIFEST_DTYPES)

# GX object names inside the context; one suite per dataset so switching datasets never
# rewrites the other's committed suite.
DATASOURCE = "medimg"
ASSET = "manifest"
BATCH = "all_images"
SITE = "medimg_local_site"
RESULT_FORMAT: dict[str, Any] = {
    "result_format": "COMPLETE",
    "unexpected_index_column_names": ["path", "class"],
    "return_unexpected_index_query": False,
}
NOT_DECODED: Mapping[str, Any] = {
    "format": None,
    "width": None,
    "height": None,
    "mode": None,
    "channels": None,
    "decodable": False,
    "error": None,
}
CLASS_LEVEL_COLUMNS = ("class_images", "class_imbalance")
MAX_LISTED = 50
MAX_EXAMPLES = 3


# ---------------------------------------------------------------- manifest


def is_junk(path: str, junk_names: Collection[str]) -> bool:
    """Not an image at all: OS droppings and AppleDouble forks would otherwise count as corrupt."""
    pure = PurePosixPath(path)
    if pure.name in junk_names or pure.name.startswith("._") or "__MACOSX" in pure.parts:
        return True
    return pure.suffix.lower() not in IMAGE_EXTENSIONS


def inspect_image(data: bytes, max_pixels: int) -> dict[str, Any]:
    """Header first, then a full decode: a bomb is refused from its header, truncation is caught.

    Any decoder exception means the bytes are not a usable image, whatever its type, so all are
    caught and recorded rather than crashing the stage on hostile data.
    """
    info = dict(NOT_DECODED)
    if not data:
        return {**info, "error": "empty file (0 bytes)"}
    try:
        with Image.open(io.BytesIO(data)) as img:
            info.update(
                format=img.format,
                width=img.width,
                height=img.height,
                mode=img.mode,
                channels=len(img.getbands()),
            )
            pixels = img.width * img.height
            if pixels > max_pixels:
                return {
                    **info,
                    "error": f"{img.width}x{img.height} = {pixels} pixels is over "
                    f"dataset.limits.max_image_pixels ({max_pixels}); not decoded",
                }
            img.load()
    except UnidentifiedImageError:  # its message holds a memory address: keep reports stable
        return {**info, "error": "UnidentifiedImageError: not a recognised image format"}
    except Image.DecompressionBombError as err:
        return {**info, "error": f"{err} (dataset.limits.max_image_pixels); not decoded"}
    except Exception as err:
        return {**info, "error": f"{type(err).__name__}: {err}"}
    return {**info, "decodable": True}


def compile_patient_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ConfigError(f"validate.patient_regex: not a valid regex ({err})") from None


def patient_id(file_name: str, pattern: re.Pattern[str]) -> str | None:
    """Group 1 of the pattern, searched like GX's regex expectation does, so both agree."""
    match = pattern.search(file_name)
    if not match:
        return None
    return match.group(1) if pattern.groups else match.group(0)


def manifest_row(
    name: str,
    data: bytes,
    cfg: ValidateConfig,
    limits: ArchiveLimits,
    pattern: re.Pattern[str],
    split_folders: Collection[str],
) -> dict[str, Any]:
    """Everything the suite and the split stage need to know about one archive member."""
    parts = PurePosixPath(name).parts
    junk = is_junk(name, cfg.junk_names)
    image = NOT_DECODED if junk else inspect_image(data, limits.max_image_pixels)
    status = "junk" if junk else ("ok" if image["decodable"] else "corrupt")
    return {
        "path": name,
        "class": parts[-2] if len(parts) >= 2 else "",
        "split_folder": parts[-3] if len(parts) >= 3 and parts[-3] in split_folders else None,
        "patient": patient_id(parts[-1], pattern),
        **image,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "status": status,
    }


def _member_count(archive: Path) -> int | None:
    """A total for the progress bar where it costs nothing (a zip's central directory)."""
    if archive.suffix.lower() != ".zip":
        return None
    try:
        with zipfile.ZipFile(archive) as zf:
            return sum(not info.is_dir() for info in zf.infolist())
    except (zipfile.BadZipFile, OSError):
        return None


def _ordered_parallel(
    fn: Callable[[str, bytes], dict[str, Any]],
    items: Iterable[tuple[str, bytes]],
    workers: int,
) -> Iterator[dict[str, Any]]:
    """Map in a thread pool, in archive order, holding only a bounded window of bytes in memory.

    Threads are enough: PIL's decoders, zlib and hashlib release the GIL while they work.
    """
    window = max(8, workers * 4)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for name, data in items:
            pending.append(pool.submit(fn, name, data))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def manifest_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Fixed columns and dtypes, so an all-None column still has the contract's Parquet type."""
    frame = pd.DataFrame(list(rows), columns=list(MANIFEST_COLUMNS))
    return frame.astype(MANIFEST_DTYPES)


def build_manifest(
    archive: Path,
    cfg: ValidateConfig,
    limits: ArchiveLimits,
    dataset: str,
    split_folders: Collection[str] | None = None,
) -> pd.DataFrame:
    """One row per regular file of the archive (junk and corrupt included, with their status).

    `split_folders` are the folder names that mark a predefined split (default: the values of
    `split.predefined_folders`); `run` passes the ones from params.
    """
    archive = Path(archive)
    pattern = compile_patient_pattern(cfg.patient_pattern(dataset))
    folders = frozenset(
        SplitConfig().predefined_folders.values() if split_folders is None else split_folders
    )
    workers = cfg.workers or os.cpu_count() or 1

    def row(name: str, data: bytes) -> dict[str, Any]:
        return manifest_row(name, data, cfg, limits, pattern, folders)

    Image.init()  # load every format plugin now, not racing in the first worker threads
    members = ((m.name, data) for m, data in iter_members(archive, limits))
    bar = tqdm(
        _ordered_parallel(row, members, workers),
        total=_member_count(archive),
        desc=f"manifest {archive.name}",
        unit="file",
        disable=None,
        file=sys.stderr,
    )
    return manifest_frame(bar)


# ---------------------------------------------------------------- policy and checked frame


def corrupt_within_policy(manifest: pd.DataFrame, cfg: ValidateConfig) -> bool:
    """True when the corrupt share of images (junk aside) is small enough to just exclude."""
    images = int((manifest["status"] != "junk").sum())
    corrupt = int((manifest["status"] == "corrupt").sum())
    return images == 0 or corrupt / images <= cfg.max_corrupt_fraction


def checked_frame(manifest: pd.DataFrame, cfg: ValidateConfig) -> pd.DataFrame:
    """The rows the suite sees, plus helper columns that turn group checks into row checks.

    Corrupt rows stay in (and fail `decodable`) only when their share is over the policy.
    Class counts are computed over the expected classes only, so an unexpected folder fails
    the class-set check alone instead of also skewing the count and balance checks.
    """
    keep = manifest["status"] != "junk"
    if corrupt_within_policy(manifest, cfg):
        keep &= manifest["status"] != "corrupt"
    frame = manifest.loc[keep].reset_index(drop=True)
    expected = frame["class"].isin(cfg.classes)
    counts = frame.loc[expected, "class"].value_counts()
    class_images = frame["class"].map(counts).where(expected).astype("Int64")
    frame["known_class"] = frame["class"].where(expected)
    frame["class_images"] = class_images
    frame["class_imbalance"] = (counts.max() / class_images).astype("Float64")
    frame["file"] = frame["path"].map(lambda p: PurePosixPath(p).name).astype("str")
    decoded = frame.loc[frame["decodable"]]
    per_sha = decoded.groupby("sha256")["class"].nunique()
    frame["sha256_classes"] = frame["sha256"].map(per_sha).where(frame["decodable"]).astype("Int64")
    return frame


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


# ---------------------------------------------------------------- the stage


def write_manifest(manifest: pd.DataFrame, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        manifest.to_parquet(tmp, index=False)


def run(params: Params) -> dict[str, Any]:
    """Build the manifest, run the suite, and write outputs only as far as the data deserves."""
    cfg, paths, dataset = params.validate_cfg, params.paths, params.dataset.name
    manifest = build_manifest(
        paths.raw_archive,
        cfg,
        params.dataset.limits,
        dataset,
        split_folders=params.split.predefined_folders.values(),
    )
    frame = checked_frame(manifest, cfg)
    result = init_context(params).run(batch_parameters={"dataframe": frame})
    failures = failed_checks(result, frame, cfg.classes)
    manifest = mark_rejected(manifest, failures)
    docs_index = paths.data_docs / "index.html"
    report = summarize(manifest, failures, evaluated_count(result), dataset, docs_index)
    if failures:
        write_json(paths.validation_report, report)
        print(failure_text(report), file=sys.stderr)
        names = ", ".join(f["check"] for f in failures)
        raise DataError(
            f"validation failed: {len(failures)} of {report['expectations']} expectations "
            f"({names}); see {docs_index.as_posix()}"
        )
    if report["corrupt"]:
        print(corrupt_note(report), file=sys.stderr)
    write_manifest(manifest, paths.manifest)
    write_json(paths.validation_report, report)
    return report
