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

import sys
from typing import Any

from medimg.config import Params
from medimg.data.expectations import (
    corrupt_note,
    evaluated_count,
    failed_checks,
    failure_text,
    init_context,
    mark_rejected,
    summarize,
)
from medimg.data.manifest import build_manifest, checked_frame, write_manifest
from medimg.errors import DataError
from medimg.io import write_json


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
