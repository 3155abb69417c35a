"""Ctrl-C and SIGTERM: both end a merge the same way (its staging directory removed, one line, exit 128 + signal),
and neither can cut the final swap or the cleanup in half.

This module imports nothing heavy: `run_console` installs the handlers before torch and the rest are imported,
so a Ctrl-C during start-up is one line, not a traceback from inside an import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A merge stopped by a signal. A KeyboardInterrupt, so that no `except Exception` on the way mistakes it for
    an error to report and carry on from. `output` is set when it came after the output was already complete."""

    def __init__(self, signum: int = signal.SIGINT, output: Path | None = None) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.output = output


def exit_code(exc: BaseException) -> int:
    """128 + the signal's number, as shells report a process a signal ended: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def interrupted_line(exc: BaseException) -> str:
    output = getattr(exc, "output", None)
    if output is not None:
        return f"qlora-merge: interrupted; the merged model was already complete at {output}"
    return "qlora-merge: interrupted; no output was written"


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT and SIGTERM arriving inside are held and delivered, through whatever handler was there before, as
    soon as the block ends: for steps that must not stop half way (the swap of old and new output, cleanup).

    Python runs signal handlers in the main thread only, so elsewhere (and for a handler not set from Python)
    there is nothing to hold and the block runs as it is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {}
    for signum in SIGNALS:
        handler = signal.getsignal(signum)
        if handler is None:  # set outside Python: cannot be put back
            continue
        previous[signum] = handler
        signal.signal(signum, lambda number, frame: held.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(held):
            signal.raise_signal(signum)  # runs the restored handler: raises, or for SIG_DFL ends the process


class _Handler:
    """The CLI's handler for both signals: the first raises `Interrupted`, so that the merge unwinds and removes
    what it wrote; a second is ignored while that cleanup runs (two quick Ctrl-C's must not leave a half-removed
    staging directory); a third ends the process at once, for a cleanup that hangs."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.count == 1:
            raise Interrupted(signum)
        if self.count >= 3:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)


def _startup_handler(signum: int, frame: FrameType | None) -> None:
    """Before the CLI is imported nothing has been written: stop at once, rather than raise inside an import."""
    print(interrupted_line(Interrupted(signum)), file=sys.stderr, flush=True)
    os._exit(128 + signum)


def install(handler: signal.Handlers | _Handler | object) -> None:
    for signum in SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup and friends asked for the signal to be ignored
            signal.signal(signum, handler)  # type: ignore[arg-type]


def run_console() -> int:
    """The `qlora-merge` command (and `python -m qlora_merge`): handlers first, then the CLI; the process ends
    here, with the CLI's exit code."""
    install(_startup_handler)
    from .cli import main  # torch and the rest: the slow part of start-up

    install(_Handler())
    try:
        code = main()
    except KeyboardInterrupt as exc:  # one outside the library calls, which report their own
        print(interrupted_line(exc), file=sys.stderr, flush=True)
        code = exit_code(exc)
    # The exit code is settled, the outcome printed and every output file closed (a merge's are fsynced). Python's
    # own shutdown would then tear down torch module by module, about 0.5 s of a 10 s merge, during which a second
    # Ctrl-C (SIG_DFL by then) would end the process with -SIGINT instead of that code: it is skipped.
    install(signal.SIG_IGN)
    _exit_now(code)
    return code  # not reached


def _exit_now(code: int) -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
