"""`medimg monitor`: is the served model still seeing what it was built on?

    medimg monitor [--log DIR] [--model champion] [--last N | --since T [--until T]] [--out DIR]
    medimg monitor export --out DIR [--log DIR] [--model ...] [--last N | --since T]

`check` (the default) reads a window of the request log (`MEDIMG_REQUEST_LOG` of the server,
or `--log`) for one model version, compares it with the reference stored with that version
(`medimg.monitoring.drift.check_window`: image properties, embedding components, served
probabilities, out-of-distribution share), writes `summary.json` and `report.html` under
`--out`, logs a monitoring run linked to the version (every time, drift or not), and exits 3
when the window drifted past `monitoring.drift` (naming what, by how much), 0 when not: a
scheduled CI job fails visibly. `export` writes the window's kept images (served with
`monitoring.keep_images`) into `<out>/<decided class>/served-<day>-<sha12>.png` with a
`predictions.csv`, a folder the `local` dataset source reads once a person has checked the
labels.
"""

from __future__ import annotations

import argparse
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from medimg.config import Params
from medimg.errors import MedimgError
from medimg.io import atomic_dir, write_json, write_text

DRIFT_EXIT = 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=("check", "export"), default="check")
    p.add_argument(
        "--log",
        default=None,
        help="request log folder or postgresql:// URL (default: $MEDIMG_REQUEST_LOG)",
    )
    p.add_argument(
        "--model",
        default="champion",
        help="NAME@ALIAS, NAME/VERSION, an alias or a version (default: %(default)s)",
    )
    p.add_argument("--last", type=int, default=None, help="the last N requests")
    p.add_argument("--since", default=None, help="requests at or after this ISO time (UTC)")
    p.add_argument("--until", default=None, help="requests before this ISO time (UTC)")
    p.add_argument("--out", default=None, help="output folder (check: reports/monitor/...)")
    p.add_argument(
        "--reference", default=None, help="a reference JSON instead of the version's own"
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not log a monitoring run")


def run(params: Params, args: argparse.Namespace) -> int:
    from medimg import tracking
    from medimg.commands.card import resolve
    from medimg.tracking import monitoring as tracked

    raw = args.log or os.environ.get("MEDIMG_REQUEST_LOG", "") or ""
    if not raw:
        raise MedimgError("no request log: pass --log DIR or set MEDIMG_REQUEST_LOG", 2)
    # a database URL stays a string: Path() would collapse its "//"
    folder: str | Path = raw if raw.startswith(("postgresql://", "postgres://")) else Path(raw)
    if args.last is not None and args.last < 1:
        raise MedimgError(f"--last must be >= 1, got {args.last}", 2)
    tracking.configure(params.mlflow, params.dataset.name)
    name, version = resolve(args.model, params.register_cfg.registered_name(params.dataset.name))
    model = tracked.version_model(name, version)
    alias = _alias(args.model)
    window = _read(folder, model["model_id"], args, params.monitoring.window)
    if args.action == "export":
        return export(window, folder, Path(args.out or "monitor-export"), name, version)
    reference = _reference(args.reference, name, version)
    columns = numeric_columns(window)
    summary = check(window, columns, reference, params, folder)
    summary["model"] = {"name": name, "version": version, "alias": alias, **model}
    summary["window"] |= {"selector": _selector(args, params.monitoring.window)}
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or Path(params.paths.reports) / "monitor" / f"{name}-v{version}-{stamp}")
    write_report(out, summary, reference, columns)
    verdict = "drift" if summary["drifted"] else "ok"
    if not args.no_mlflow:
        from medimg.monitoring.drift import drift_metrics

        health = {f"log_{k}": float(v) for k, v in summary["log"].items() if _number(v)}
        summary["mlflow_run_id"] = tracked.log_monitoring_run(
            params.mlflow,
            f"{params.mlflow.experiment_name(params.dataset.name)}-monitoring",
            name,
            version,
            alias=alias,
            metrics=drift_metrics(summary) | health,
            params={
                "window": summary["window"]["selector"],
                **tracking.flatten(summary["thresholds"]),
            },
            files=[out / "summary.json", out / "report.html"],
            verdict=verdict,
        )
        write_json(out / "summary.json", summary)
    _print(summary, out)
    return DRIFT_EXIT if summary["drifted"] else 0


def _alias(spec: str) -> str | None:
    """The alias a `--model` spec names (NAME@ALIAS or a bare alias), else None."""
    ref = spec.split("@", 1)[1] if "@" in spec else spec
    return None if "/" in ref or ref.isdigit() else ref


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _selector(args: argparse.Namespace, default: int) -> str:
    if args.since or args.until:
        last = f", last {args.last}" if args.last else ""
        return f"since {args.since or '-'} until {args.until or '-'}{last}"
    return f"last {args.last or default} requests"


def _read(folder: str | Path, model_id: str, args: argparse.Namespace, default: int) -> Any:
    from medimg.monitoring.log_store import LogError, read_window
    from medimg.monitoring.pg_log import redact

    last = args.last if (args.last or args.since or args.until) else default
    try:
        frame = read_window(
            folder, model_id=model_id, last=last, since=args.since, until=args.until
        )
    except LogError as err:
        raise MedimgError(str(err)) from None
    if frame.empty:
        where = redact(str(folder))
        raise MedimgError(f"{where}: no request of model {model_id} logged in the window")
    return frame


def _reference(path: str | None, name: str, version: str) -> dict[str, Any]:
    import json

    from medimg.tracking import monitoring as tracked

    if path:
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise MedimgError(f"{path}: not a readable reference JSON ({err})") from None
    found = tracked.version_reference(name, version)
    if found is None:
        raise MedimgError(
            f"{name} v{version} has no monitoring reference (logged before monitoring "
            "existed): re-run evaluate, or pass --reference FILE"
        )
    return found


def check(
    window: Any,
    columns: dict[str, np.ndarray],
    reference: dict[str, Any],
    params: Params,
    folder: str | Path,
) -> dict[str, Any]:
    """The window's verdict (`check_window` with params' thresholds) plus its time span and
    the request log's health counters."""
    from medimg.monitoring.drift import check_window
    from medimg.monitoring.log_store import log_health

    cfg = params.monitoring.drift
    summary = check_window(
        reference,
        columns,
        alpha=cfg.alpha,
        min_statistic={
            "properties": cfg.min_statistic,
            "embedding": cfg.embedding_min_statistic,
            "predictions": cfg.prediction_min_statistic,
        },
        tolerance=cfg.ood_tolerance,
        max_ood_share=cfg.max_ood_share,
        min_requests=cfg.min_requests,
        decisions=window["decision"].to_numpy() if "decision" in window else None,
        ids=window["sha256"].to_numpy() if "sha256" in window else None,
    )
    times = window["time"]
    summary["window"] = {"n": len(window), "start": str(times.min()), "end": str(times.max())}
    summary["log"] = log_health(folder)
    return summary


def numeric_columns(window: Any) -> dict[str, np.ndarray]:
    """The window's numeric columns as float arrays: what the test and the plots read."""
    import pandas as pd

    types = pd.api.types
    return {
        c: window[c].to_numpy(dtype=np.float64)
        for c in window
        if types.is_numeric_dtype(window[c]) and not types.is_bool_dtype(window[c])
    }


def write_report(
    out: Path, summary: dict[str, Any], reference: dict[str, Any], columns: dict[str, np.ndarray]
) -> None:
    """summary.json and report.html into `out`, written together (atomic folder)."""
    from medimg.monitoring.report import render_html

    with atomic_dir(out) as tmp:
        write_json(tmp / "summary.json", summary)
        write_text(tmp / "report.html", render_html(summary, reference, columns))


def _print(summary: dict[str, Any], out: Path) -> None:
    model, n = summary["model"], summary["window"]["n"]
    head = f"{model['name']} v{model['version']}: {n} requests"
    log = summary["log"]
    lost = {k: log[k] for k in ("dropped", "lost", "errors") if log.get(k)}
    if lost:
        print(f"{head}: request log lost records {lost} (last error: {log.get('last_error')})")
    if summary["drifted"]:
        print(f"{head}: DRIFT")
        for reason in summary["reasons"]:
            print(f"  {reason}")
    else:
        worst = [
            (r["statistic"], f"{g}/{c}")
            for g, rows in summary["groups"].items()
            for c, r in rows.items()
        ]
        top = max(worst) if worst else (0.0, "-")
        ood = summary["ood"]["share"]
        print(f"{head}: no drift (largest KS {top[0]:.3f}: {top[1]}; OOD {ood:.1%})")
    print(f"report: {out / 'report.html'}")


def export(window: Any, folder: str | Path, out: Path, name: str, version: str) -> int:
    """The window's kept images, filed by decided class for relabeling, + predictions.csv."""
    from medimg.monitoring.pg_log import redact

    if "image_file" not in window or window["image_file"].isna().all():
        raise MedimgError(
            f"{redact(str(folder))}: no kept images in the window (serve with "
            "monitoring.keep_images: true or MEDIMG_REQUEST_LOG_KEEP_IMAGES=1)"
        )
    rows, missing = [], 0
    with atomic_dir(out) as tmp:
        for rec in window.to_dict("records"):
            src = Path(folder) / str(rec.get("image_file") or "")  # a database log's: absolute
            if not rec.get("image_file") or not src.is_file():
                missing += 1
                continue
            day = rec["time"].strftime("%Y%m%d")
            rel = Path(str(rec["decision"])) / f"served-{day}-{rec['sha256'][:12]}.png"
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                shutil.copyfile(src, dest)
                probs = {k: v for k, v in rec.items() if str(k).startswith("p_")}
                rows.append({"file": str(rel), "time": str(rec["time"]), "sha256": rec["sha256"],
                             "decision": rec["decision"], **probs})  # fmt: skip
        import pandas as pd

        write_text(tmp / "predictions.csv", pd.DataFrame(rows).to_csv(index=False))
    print(
        f"{name} v{version}: {len(rows)} images exported to {out} by decided class "
        f"({missing} without a kept image); check the labels, then "
        f"`dvc exp run -S dataset.source=local -S dataset.path=...` (README, Monitoring)"
    )
    return 0
