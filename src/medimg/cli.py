"""The `medimg` command and the shared entry point of the DVC stage scripts.

User-facing failures (`MedimgError`) become one line on stderr and the error's exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from medimg.config import Params, load_params
from medimg.errors import MedimgError


def fail(err: MedimgError) -> None:
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(err.exit_code)


def stage_main(run: Callable[..., Any], argv: Sequence[str] | None = None) -> None:
    """Run one DVC stage: `python stages/<name>.py [ARG] [--params FILE]`.

    ARG is the matrix item (an architecture) for train and evaluate.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("item", nargs="?")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        params: Params = load_params(args.params)
        run(params, args.item) if args.item else run(params)
    except MedimgError as err:
        fail(err)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="medimg", description=__doc__)
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("check-params", help="validate params.yaml and print the resolved config")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        if args.command == "check-params":
            print(params.model_dump_json(indent=2, by_alias=True))
    except MedimgError as err:
        fail(err)


if __name__ == "__main__":
    main()
