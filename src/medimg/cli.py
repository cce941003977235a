"""The `medimg` command and the shared entry point of the DVC stage scripts.

User-facing failures (`MedimgError`) become one line on stderr and the error's exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from medimg.config import Params, load_params
from medimg.errors import MedimgError


def fail(err: MedimgError) -> None:
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(err.exit_code)


@contextlib.contextmanager
def native_stderr_muted() -> Iterator[None]:
    """Silence file descriptor 2 while TensorFlow's native libraries load.

    TF 2.2x logs its oneDNN and CPU-feature notices through absl before absl is initialised,
    so TF_CPP_MIN_LOG_LEVEL does not reach them: every stage log would start with them.
    Python exceptions are unaffected (they are raised, not printed, inside the block).
    """
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_quietly(module: str) -> Any:
    """`importlib.import_module` with TensorFlow's start-up notices muted."""
    with native_stderr_muted():
        import keras  # noqa: F401  loads TensorFlow's native libraries, the noisy part

        return importlib.import_module(module)


def stage_main(stage: str, argv: Sequence[str] | None = None) -> None:
    """Run one DVC stage, `medimg.<stage>.run`: `python stages/<stage>.py [ARG] [--params F]`.

    ARG is the matrix item (an architecture) for train and evaluate.
    """
    parser = argparse.ArgumentParser(prog=f"stages/{stage}.py")
    parser.add_argument("item", nargs="?")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    try:
        params: Params = load_params(args.params)
        run = import_quietly(f"medimg.{stage}").run
        run(params, args.item) if args.item else run(params)
    except MedimgError as err:
        fail(err)


def _check_params(params: Params, args: argparse.Namespace) -> int:
    print(params.model_dump_json(indent=2, by_alias=True))
    return 0


Handler = Callable[[Params, argparse.Namespace], int]
AddArguments = Callable[[argparse.ArgumentParser], None]


def _lazy(module: str, function: str = "run", keras: bool = True) -> Handler:
    """A handler that imports its command module only when that command runs: `medimg
    check-params` should not pay for importing TensorFlow. `keras=False`: a command that
    never loads a model (`monitor`: 5 s and ~430 MB less) imports it plainly."""

    def handler(params: Params, args: argparse.Namespace) -> int:
        name = f"medimg.commands.{module}"
        loaded = import_quietly(name) if keras else importlib.import_module(name)
        return getattr(loaded, function)(params, args)

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
    "history": (
        "the audit trail of the registered model: who moved what, when, why (newest first)",
        _lazy("history"),
        _arguments("history"),
    ),
    "card": (
        "print or write a registered version's model card (markdown, or --json)",
        _lazy("card"),
        _arguments("card"),
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
    "promote": (
        "register the best candidate and move champion if it passes the gate (exit 1: refused)",
        _lazy("promote"),
        _arguments("promote"),
    ),
    "monitor": (
        "check the served model's request log against its reference (exit 3: drift); "
        "`monitor export`: its kept images for relabeling",
        _lazy("monitor", keras=False),
        _arguments("monitor"),
    ),
    "server": (
        "team mode: run the MLflow tracking server on PostgreSQL, add accounts",
        _lazy("server"),
        _arguments("server"),
    ),
}
# Commands that run without a params file (a server host has no checkout).
NO_PARAMS = frozenset({"server"})


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
        params = None if args.command in NO_PARAMS else load_params(args.params)
        code = COMMANDS[args.command][1](params, args)
    except MedimgError as err:
        fail(err)
    raise SystemExit(code)


if __name__ == "__main__":
    main()
