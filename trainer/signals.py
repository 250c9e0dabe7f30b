"""SIGINT and SIGTERM in the trainer's and the evals' entry points: the exit status says which signal
stopped the job (130, 143: 128 + the signal, as a shell reports it), never 0, and what was finished
is kept (every writer's files are whole or absent). pipelines/signals.py is the preprocess job's
twin: the packages share only files."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable


class Terminated(BaseException):
    """SIGTERM raised where the job is, as KeyboardInterrupt is for SIGINT, so that cleanup runs (a
    BaseException: no `except Exception` swallows it)."""


def _terminate(signum, frame):
    raise Terminated


def exit_status(main: Callable[[], int]) -> int:
    """Runs `main` and returns its exit status, or 130 / 143 when SIGINT / SIGTERM stops it."""
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return main()
    except BaseException as error:
        signum = _signal_behind(error)
        if signum is None:
            raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"stopped by {signum.name}: what was finished is kept", file=sys.stderr)
    return 128 + signum


def _signal_behind(error: BaseException | None) -> signal.Signals | None:
    """The signal that raised `error` or an error it wraps (libraries re-raise what stops their
    callbacks as errors of their own)."""
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return signal.SIGINT
        if isinstance(error, Terminated):
            return signal.SIGTERM
        error = error.__cause__ or error.__context__
    return None
