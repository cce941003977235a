"""One error type the CLI turns into a one-line message and an exit code.

Stages raise `MedimgError` for anything a user can fix (bad params, bad data, a failed gate);
the CLI prints `error: <message>` and exits with `exit_code`, never a traceback.
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
