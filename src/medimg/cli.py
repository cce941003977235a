"""The `medimg` command and the shared entry point of the DVC stage scripts.

User-facing failures (`MedimgError`) become one line on stderr and the error's exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
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


Handler = Callable[[Params, argparse.Namespace], int]
AddArguments = Callable[[argparse.ArgumentParser], None]


def _lazy(module: str, function: str = "run") -> Handler:
    """A handler that imports its command module only when that command runs: `medimg
    check-params` should not pay for importing TensorFlow."""

    def handler(params: Params, args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(f"medimg.commands.{module}"), function)(
            params, args
        )

    return handler


def _arguments(module: str) -> AddArguments:
    def add(parser: argparse.ArgumentParser) -> None:
        importlib.import_module(f"medimg.commands.{module}").add_arguments(parser)

    return add


# name: (help, handler) or (help, handler, add_arguments) for a command with its own options.
COMMANDS: dict[str, tuple[str, Handler] | tuple[str, Handler, AddArguments]] = {
    "check-params": ("validate params.yaml and print the resolved config", _check_params),
    "gate": (
        "re-check the promotion gate (exit 0 pass, 1 fail); CI calls this",
        _lazy("gate", "run_gate"),
    ),
    "rollback": (
        "move the champion alias back to the previous version",
        _lazy("gate", "run_rollback"),
    ),
    "predict": (
        "classify image files with a registered model (exit 1 if any file failed)",
        _lazy("predict"),
        _arguments("predict"),
    ),
    "explain": (
        "write a Grad-CAM overlay of one image, predicted class in the title",
        _lazy("explain"),
        _arguments("explain"),
    ),
    "export": (
        "export a model to TFLite after a test-split parity check (>= 99 percent agreement)",
        _lazy("export"),
        _arguments("export"),
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medimg", description=__doc__)
    parser.add_argument(
        "--params", default="params.yaml", help="params file (default: %(default)s)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, *rest) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        for add_arguments in rest[1:]:
            add_arguments(command)
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
