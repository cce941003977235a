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


MODEL_HELP = (
    "alias of the registered model (champion, challenger, previous), a version number, a run "
    "id, runs:/ or models:/ URI, or a .keras file (default: %(default)s)"
)


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "paths",
        nargs="*",
        metavar="PATHS",
        help="image files, folders (searched recursively) and globs",
    )
    p.add_argument("--model", default="champion", help=MODEL_HELP)
    p.add_argument("--format", dest="fmt", choices=("table", "csv", "json"), default="table")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="decision threshold on P(positive) (default: the version's "
        "operating_threshold tag, else 0.5)",
    )
    p.add_argument("-o", "--output", default=None, help="write the results here, not stdout")


def _predict(params: Params, args: argparse.Namespace) -> int:
    from medimg.predict import predict_command

    return predict_command(
        params, args.paths, args.model, args.fmt, args.batch_size, args.threshold, args.output
    )


def _explain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("-o", "--output", required=True, help="overlay PNG to write")
    p.add_argument("--model", default="champion", help=MODEL_HELP)


def _explain(params: Params, args: argparse.Namespace) -> int:
    from medimg.predict import explain_command

    explain_command(params, args.image, args.output, args.model)
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", dest="fmt", choices=("tflite",), default="tflite")
    p.add_argument("--quantize", choices=("none", "float16", "int8"), default="none")
    p.add_argument("--model", default="champion", help=MODEL_HELP)
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="default: models/export/<name>-v<version>-<quantize>.tflite",
    )


def _export(params: Params, args: argparse.Namespace) -> int:
    from medimg.predict import export_command

    export_command(params, args.quantize, args.model, args.output, args.fmt)
    return 0


Handler = Callable[[Params, argparse.Namespace], int]
AddArguments = Callable[[argparse.ArgumentParser], None]

# name: (help, handler) or (help, handler, add_arguments) for a command with its own options.
COMMANDS: dict[str, tuple[str, Handler] | tuple[str, Handler, AddArguments]] = {
    "check-params": ("validate params.yaml and print the resolved config", _check_params),
    "gate": ("re-check the promotion gate (exit 0 pass, 1 fail); CI calls this", _gate),
    "rollback": ("move the champion alias back to the previous version", _rollback),
    "predict": (
        "classify image files with a registered model (exit 1 if any file failed)",
        _predict,
        _predict_args,
    ),
    "explain": (
        "write a Grad-CAM overlay of one image, predicted class in the title",
        _explain,
        _explain_args,
    ),
    "export": (
        "export a model to TFLite after a test-split parity check (>= 99 percent agreement)",
        _export,
        _export_args,
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
