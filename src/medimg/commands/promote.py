"""`medimg promote`: CI's step on main. Register the best candidate and move `champion` when
it passes the gate against the current champion; exit 1 and change nothing when it does not.

It reads what `dvc repro` left (reports/eval, the split's fingerprint) and acts on the shared
server named by MLFLOW_TRACKING_URI with the `ci` account (MLFLOW_TRACKING_USERNAME/PASSWORD):
the server, not this command, decides who may register versions and move aliases.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medimg import tracking
from medimg.config import Params
from medimg.io import write_json
from medimg.promotion import gate_decision, load_reports, promote, rank, reason_paragraph


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default=None, help="write the decision record (JSON) here")
    p.add_argument(
        "--summary",
        default=None,
        help="append the verdict as Markdown to this file (e.g. $GITHUB_STEP_SUMMARY)",
    )


def run(params: Params, args: argparse.Namespace) -> int:
    tracking.configure(params.mlflow, params.dataset.name)  # the server and account, first
    reports = load_reports(params)
    order = rank(reports, params.register_cfg.metric)
    record = promote(params, gate_decision(params, reports, order), reports)
    text = reason_paragraph(record)
    if args.output:
        write_json(args.output, record)
    if args.summary:
        with Path(args.summary).open("a") as fh:
            fh.write(f"### medimg promote\n\n{text}\n")
    print(text)
    return 0 if record["promoted"] else 1
