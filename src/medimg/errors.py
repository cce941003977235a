"""One error type the CLI turns into a one-line message and an exit code.

Stages raise `MedimgError` for anything a user can fix (bad params, bad data, a failed gate);
the CLI prints `error: <message>` and exits with `exit_code`, never a traceback. A message that
quotes a library's exception quotes it through `error_line`.
"""

from __future__ import annotations


class MedimgError(Exception):
    """A user-facing failure: `str(err)` is the whole message, `exit_code` the status."""

    exit_code: int = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(MedimgError):
    """params.yaml is wrong: unknown key, wrong type or value out of range."""

    exit_code = 2


class DataError(MedimgError):
    """The dataset (archive, image, manifest) breaks a rule; raw data is left untouched."""

    exit_code = 3


def error_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message as one line for a user-facing error: white space (tarfile's and
    TFLite's messages span lines) folded to single spaces, cut at `limit` characters, and the
    exception's type name when it has no message."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
