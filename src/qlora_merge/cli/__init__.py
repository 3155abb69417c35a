"""Command line: parse flags, call the public API, print stages. The only package that prints or exits.

`parser` holds the flags (and turns them into MergeOptions settings), `display` what is printed, `commands` the
merge, `verify` and `inspect` commands, `guard` how a library call's errors become one line and an exit code.
"""

from __future__ import annotations

from .commands import main
from .guard import EXIT_BAD_INPUT, EXIT_INTERNAL, EXIT_NOT_VERIFIED
from .parser import adapter_refs, build_parser

__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERNAL", "EXIT_NOT_VERIFIED", "adapter_refs", "build_parser", "main"]
