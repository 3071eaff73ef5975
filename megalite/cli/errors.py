"""One line instead of a traceback: how every `megalite` command (and tools/ wrapper) reports a failure.

    megalite: <what failed, the value, the fix>

on stderr, and the exit code says whose fault it was: 2 for bad input (a config, a checkpoint, a
data file, a flag, a path that does not exist: ValueError, CheckpointError, FileNotFoundError), 1
for a failure at run time (the disk, the network, a diverged loss: other OSErrors and megalite's
other error types). Anything else (TypeError, KeyError, ...) is a bug and keeps its traceback. A
ValueError raised outside megalite's code (inside a library) says so and how to see where.
`megalite --debug ...` or MEGALITE_DEBUG=1 shows the traceback of every failure.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

DEBUG_ENV = "MEGALITE_DEBUG"
BAD_INPUT, RUNTIME_FAILURE = 2, 1


def add_debug_argument(p) -> None:
    """--debug on a standalone command's parser (the tools/ wrappers); `megalite --debug` is global."""
    p.add_argument("--debug", action="store_true", help=f"show the traceback of a failure (also {DEBUG_ENV}=1)")


def _ours(error: BaseException) -> bool:
    """Whether the error's type (or a base of it) is one of megalite's own."""
    return any(cls.__module__.startswith("megalite.") for cls in type(error).__mro__)


def _is_checkpoint_error(error: BaseException) -> bool:
    # only look for the class when its module was imported: --help and the data commands never import torch
    io = sys.modules.get("megalite.checkpoint.io")
    return io is not None and isinstance(error, io.CheckpointError)


def exit_code(error: BaseException) -> int | None:
    """2 for bad input, 1 for a run-time failure, None for an error that is a bug (keep its traceback)."""
    if isinstance(error, OSError):
        return BAD_INPUT if isinstance(error, FileNotFoundError) else RUNTIME_FAILURE
    if isinstance(error, ValueError) or _is_checkpoint_error(error):
        return BAD_INPUT
    return RUNTIME_FAILURE if _ours(error) else None


def _raised_by_megalite(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}megalite{os.sep}" in tb.tb_frame.f_code.co_filename


def one_line(error: BaseException) -> str:
    """The message as `megalite: ...`; an OSError names its file (Python puts it only in str(e))."""
    text = str(error).strip() or type(error).__name__
    if isinstance(error, OSError) and not _ours(error) and error.strerror:
        where = f" {error.filename}" if error.filename else ""
        text = f"{error.strerror}:{where}"
    elif not _raised_by_megalite(error):
        text = f"{type(error).__name__}: {text} (megalite --debug, or {DEBUG_ENV}=1, shows where)"
    return f"megalite: {text}"


def report_failures(handler: Callable[[], int], debug: bool = False) -> int:
    """Run `handler`; a failure of megalite's own types or of the OS becomes one line and an exit code."""
    debug = debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return handler()
    except KeyboardInterrupt:
        print("megalite: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - classified below; a bug re-raises with its traceback
        code = exit_code(e)
        if code is None or debug:
            raise
        print(one_line(e), file=sys.stderr)
        return code
