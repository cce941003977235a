"""`medimg predict`: classify image files, folders and globs with a registered model."""

from __future__ import annotations

import argparse
import glob
import json
import math
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medimg.commands.by_patient import by_patient, pick_patient_threshold
from medimg.commands.model_ref import MODEL_HELP, load_classifier
from medimg.config import Params
from medimg.data.images import IMAGE_SUFFIXES, ImageInputError, decode_image, resize_batch
from medimg.errors import MedimgError
from medimg.io import progress as progress_bar
from medimg.scoring import Classifier, result_frame

# A progress bar helps on a folder of thousands of cells; for a handful it is noise, and in a
# non-interactive log only a long job is worth the extra lines.
PROGRESS_TTY_MIN = 256
PROGRESS_LOG_MIN = 5000
FORMATS = ("table", "csv", "json")

# ------------------------------------------------------------------------------------ paths


def _walk(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively; other files and hidden entries are skipped."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _expand(spec: str) -> list[Path] | None:
    """The files one PATHS argument stands for, or None when it names nothing.

    A named file is used whatever its suffix (the user asked for it, so a non-image is an
    error, not silently skipped); folders and glob matches that are folders are walked.
    """
    path = Path(spec)
    if path.is_file():
        return [path]
    if path.is_dir():
        return _walk(path)
    if glob.has_magic(spec):
        matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
        files: list[Path] = []
        for m in matches:
            files += _walk(m) if m.is_dir() else [m] if m.is_file() else []
        return files if matches else None
    return None


def collect_paths(specs: Sequence[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files to predict (in argument order, de-duplicated) and (spec, reason) problems.

    Globs are expanded here too, so quoted patterns (`"data/**/*.png"`) work the same as ones
    the shell expanded.
    """
    files: list[Path] = []
    seen: set[Path] = set()
    problems: list[tuple[str, str]] = []
    for spec in specs:
        found = _expand(spec)
        if found is None:
            problems.append((spec, "no such file or directory"))
            continue
        for path in found:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files, problems


def _batches(items: Sequence[Path], n: int) -> Iterator[Sequence[Path]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _read(path: Path) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageInputError(f"{path}: unreadable ({err.strerror or err})") from None
    return decode_image(data, str(path))


def predict_files(
    clf: Classifier,
    files: Sequence[Path],
    batch_size: int = 64,
    on_error: Callable[[Path, str], None] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per readable file (path first); `on_error(path, message)` for the others.

    Files are decoded and scored `batch_size` at a time, so memory stays flat on any folder.
    """
    frames = []
    with progress_bar(total=len(files), unit="img", enabled=progress) as bar:
        for chunk in _batches(files, batch_size):
            ok, images = [], []
            for path in chunk:
                try:
                    images.append(_read(path))
                    ok.append(path)
                except ImageInputError as err:
                    if on_error is not None:
                        on_error(path, str(err))
            if ok:
                probs = clf.probabilities(resize_batch(images, clf.size))
                frame = result_frame(probs, clf.classes, clf.threshold)
                frame.insert(0, "path", [str(p) for p in ok])
                frames.append(frame)
            bar.update(len(chunk))
    return pd.concat(frames, ignore_index=True) if frames else _empty(clf.classes)


def _empty(classes: Sequence[str]) -> pd.DataFrame:
    cols = ["path", "class", "probability"]
    cols += [f"p_{classes[1]}"] if len(classes) == 2 else [f"p_{c}" for c in classes]
    return pd.DataFrame(columns=[*cols, "threshold"])


def show_progress(n_files: int, batch_size: int, is_tty: bool) -> bool:
    return n_files > batch_size and (
        (is_tty and n_files >= PROGRESS_TTY_MIN) or n_files >= PROGRESS_LOG_MIN
    )


# ---------------------------------------------------------------------------------- output


def format_rows(frame: pd.DataFrame, fmt: str) -> str:
    """The result table as `table` (aligned text), `csv` or `json` (a list of objects)."""
    if fmt == "csv":
        return frame.to_csv(index=False, float_format="%.6g")
    if fmt == "json":
        records = json.loads(frame.to_json(orient="records", double_precision=6))
        return json.dumps(records, indent=2) + "\n"
    if fmt == "table":
        return _table(frame)
    raise MedimgError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}", exit_code=2)


def _table(frame: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.4f}"
        return str(value)

    rows = [[str(c) for c in frame.columns]]
    rows += [[cell(v) for v in row] for row in frame.itertuples(index=False)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    numeric = [frame[c].dtype.kind == "f" for c in frame.columns]
    lines = [
        "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(r, widths, numeric, strict=True)
        )
        for r in rows
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


# ---------------------------------------------------------------------------------- commands


def _report(path: Path | str, message: str) -> None:
    """`error: <path>: <reason>` on stderr, without breaking a running progress bar."""
    from tqdm import tqdm

    text = message if message.startswith(str(path)) else f"{path}: {message}"
    tqdm.write(f"error: {text}", file=sys.stderr)


def predict_command(
    params: Params,
    paths: Sequence[str],
    model: str = "champion",
    fmt: str = "table",
    batch_size: int = 64,
    threshold: float | None = None,
    output: str | Path | None = None,
    tta: bool | None = None,
    patients: bool = False,
    patient_threshold: float | None = None,
) -> int:
    """`medimg predict`: 0 when every file was predicted, 1 when any failed, 2 for none.

    `patients` (`--by-patient`): one row per patient instead of per cell (`by_patient`)."""
    from medimg.io import write_text

    if not paths:
        raise MedimgError("predict: no image paths given (files, folders or globs)", exit_code=2)
    if batch_size < 1:
        raise MedimgError(f"--batch-size must be >= 1, got {batch_size}", exit_code=2)
    files, problems = collect_paths(paths)
    for spec, reason in problems:
        _report(spec, reason)
    if not files:
        raise MedimgError(f"predict: no image files found in {', '.join(paths)}", exit_code=2)
    clf = load_classifier(params, model, threshold, tta)
    failed: list[Path] = []

    def on_error(path: Path, message: str) -> None:
        failed.append(path)
        _report(path, message)

    progress = show_progress(len(files), batch_size, sys.stderr.isatty())
    frame = predict_files(clf, files, batch_size, on_error, progress)
    if patients:
        pattern = re.compile(params.validate_cfg.patient_pattern(params.dataset.name))
        chosen = pick_patient_threshold(patient_threshold, clf.info)
        frame = by_patient(frame, clf.classes, clf.threshold, pattern, chosen)
    text = format_rows(frame, fmt)
    if output is None:
        sys.stdout.write(text)
    else:
        write_text(output, text)
    return 1 if failed or problems else 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATHS",
        help="image files, folders (searched recursively) and globs",
    )
    p.add_argument("--model", default="champion", help=MODEL_HELP)
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="table")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="decision threshold on P(positive) (default: the version's "
        "operating_threshold tag, else 0.5)",
    )
    p.add_argument("-o", "--output", default=None, help="write the results here, not stdout")
    p.add_argument(
        "--by-patient",
        dest="by_patient",
        action="store_true",
        help="one row per patient (from NIH file names, C33P1thinF_... -> C33, else one folder "
        "= one patient): cells, cells called parasitized, parasitemia (their share) and the "
        "call at the patient threshold",
    )
    p.add_argument(
        "--patient-threshold",
        type=float,
        default=None,
        help="with --by-patient: infected when parasitemia >= this (default: the version's "
        "patient_threshold tag, else the served model's, else any parasitized cell)",
    )
    p.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average over flips and 90-degree rotations (default: as the model was evaluated, "
        "evaluate.tta)",
    )


def run(params: Params, args: argparse.Namespace) -> int:
    return predict_command(
        params,
        args.paths,
        args.model,
        args.fmt,
        args.batch_size,
        args.threshold,
        args.output,
        args.tta,
        args.by_patient,
        args.patient_threshold,
    )
