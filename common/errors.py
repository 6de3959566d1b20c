"""Errors a user can fix, and the entry-point wrapper that prints them as one line.

Every entry point (scripts/*.py, tools/*.py) runs its main through `entry_point`: a known error (a RunError,
a missing file, a full disk) prints `error: <what>` and `hint: <what to do>`, then exits with status 2; `--debug` anywhere
on the command line shows the traceback instead. Unexpected errors keep their traceback.
"""
from __future__ import annotations

import errno
import logging
import sys
from typing import Callable


class RunError(Exception):
    """A problem with the user's input or environment, reported as one line (+ a hint)."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class UsageError(RunError, ValueError):
    """A flag out of its range, or flags that contradict each other or a checkpoint."""


class ConfigError(RunError, ValueError):
    """A model or task config that is missing or malformed."""


class CheckpointError(RunError, ValueError):
    """A checkpoint that is missing, unreadable, of another model, or not finite."""


class NonFiniteError(RunError, ValueError):
    """NaN or inf where a finite number is needed (weights, quantizer ranges, samples)."""


class AdapterError(RunError, ValueError):
    """An architecture adapter that names modules the network does not have, or units it cannot train."""


class LogdirLocked(RunError):
    """Another run is writing the same log directory."""


class DiskFull(RunError, OSError):
    """A write failed for lack of space."""


def as_run_error(exc: BaseException) -> RunError | None:
    """The one-line form of a known error, or None for an unexpected one."""
    if isinstance(exc, RunError):
        return exc
    if isinstance(exc, FileNotFoundError):
        return RunError(f"no such file: {exc.filename}" if exc.filename else str(exc), "check the path")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DiskFull(f"disk full: writing {exc.filename or 'a file'} failed", "free some space and rerun; "
                        "finished stages are kept")
    return None


def entry_point(main: Callable[[list[str]], object], argv: list[str] | None = None) -> None:
    """Run main(argv) with one-line errors (see module doc); `--debug` is taken out of argv."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not logging.getLogger().handlers:                      # the library's log lines (quant.*), as plain lines
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        main(argv)
    except Exception as exc:                                   # noqa: BLE001 (sorted into known / unexpected)
        known = as_run_error(exc)
        if known is None or debug:
            raise
        print(f"error: {known}", file=sys.stderr)
        print(f"hint: {known.hint + '; ' if known.hint else ''}--debug shows the traceback", file=sys.stderr)
        sys.exit(2)
