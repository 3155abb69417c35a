"""How a command runs a library call: a MergeError is one line and exit 2, a bug one line (a traceback with
--debug) and exit 1, a Ctrl-C one line and 128 + the signal."""

from __future__ import annotations

import logging
import signal
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TextIO, TypeVar

from ..errors import MergeError

T = TypeVar("T")

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
EXIT_NOT_VERIFIED = 3  # the inputs were fine; the merged checkpoint is not base + adapter
# An error line stays readable whatever the input put into it (a huge key, a hostile config); --debug shows it all.
MAX_ERROR_CHARS = 1000


def one_line(text: str, debug: bool) -> str:
    """`text` on one line, at most about MAX_ERROR_CHARS unless --debug: the middle goes (usually a long path or
    key), the start (the file) and the end (the problem and the fix) stay."""
    text = " ".join(text.splitlines())
    if debug or len(text) <= MAX_ERROR_CHARS:
        return text
    head, tail = MAX_ERROR_CHARS * 2 // 5, MAX_ERROR_CHARS * 3 // 5
    cut = len(text) - head - tail
    return f"{text[:head]} …({cut} characters cut; --debug shows them)… {text[-tail:]}"


def guarded(call: Callable[[], T], debug: bool, err: TextIO, completed: Path | None = None) -> tuple[int, T | None]:
    """Run the library call; a MergeError is one line and exit 2, anything else an internal error (exit 1). A Ctrl-C
    is one line and 128 + the signal; `completed` is the output already written (--verify and --push-to-hub run
    after the merge), which that line names instead of saying nothing was written."""
    try:
        return 0, call()
    except MergeError as exc:
        print(f"qlora-merge: error: {one_line(str(exc), debug)}", file=err)
        return EXIT_BAD_INPUT, None
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM under run_console: the call has cleaned up after itself
        from ..interrupts import Interrupted, exit_code, interrupted_line

        if completed is not None and getattr(exc, "output", None) is None:
            exc = Interrupted(int(getattr(exc, "signum", signal.SIGINT)), output=completed)
        print(interrupted_line(exc), file=err)
        return exit_code(exc), None
    except Exception as exc:
        if debug:
            traceback.print_exc(file=err)
        print(
            f"qlora-merge: internal error: {type(exc).__name__}: {one_line(str(exc), debug)} (re-run with --debug)",
            file=err,
        )
        return EXIT_INTERNAL, None


def configure_logging(debug: bool, err: TextIO) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="qlora-merge: %(levelname)s: %(message)s",
        stream=err,
    )
