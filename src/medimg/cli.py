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


def _check_params(params: Params, args: argparse.Namespace) -> int:
    print(params.model_dump_json(indent=2, by_alias=True))
    return 0


def _gate(params: Params, args: argparse.Namespace) -> int:
    from medimg.registry import gate

    return gate(params)


def _rollback(params: Params, args: argparse.Namespace) -> int:
    from medimg.registry import rollback

    rollback(params)
    return 0


COMMANDS: dict[str, tuple[str, Callable[[Params, argparse.Namespace], int]]] = {
    "check-params": ("validate params.yaml and print the resolved config", _check_params),
    "gate": ("re-check the promotion gate (exit 0 pass, 1 fail); CI calls this", _gate),
    "rollback": ("move the champion alias back to the previous version", _rollback),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medimg", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, _) in COMMANDS.items():
        sub.add_parser(name, help=help_text)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params)
        code = COMMANDS[args.command][1](params, args)
    except MedimgError as err:
        fail(err)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
