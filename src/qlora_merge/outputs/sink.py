"""Sinks: where the merged tensors go. The merge hands each planned tensor, in plan order, to one sink.

A sink is told the whole layout first (every output tensor's name, dtype and shape, in order), so that a format
that writes its header first (safetensors, GGUF) can; it decides its own files, shards and byte sizes. Then, per
tensor: `begin(name)`, its values in row-major order as raw bytes of its dtype (`write`), or, where the
source's bytes already are those values, a byte range of an input file to copy as it is (`copy_from`); `end()`.
A sink may also offer `claim(nbytes)`, writable space in its own buffer for the current tensor's next bytes
(or None), and `commit(nbytes)` once they are filled: the merge then computes straight into it instead of handing
its bytes to `write`. `finish()` completes the output and checks what was written; `abort()` stops after a
failure (the caller removes the staging directory). The safetensors writer is one sink; verify's comparing sink
is another.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ..plan.tasks import OutputTensor


class Sink(Protocol):
    bytes_written: int

    def start(self, tensors: Sequence[OutputTensor]) -> None:
        """The output's tensors, in the order they will come."""
        ...

    def begin(self, name: str) -> None:
        """The next tensor; it must be the next one of the layout."""
        ...

    def write(self, data: memoryview | bytes) -> None:
        """More of the current tensor's values: row-major, in its dtype, as raw bytes."""
        ...

    def copy_from(self, fd: int, offset: int, count: int, source: Path) -> None:
        """More of the current tensor, as `count` bytes of an input file at `offset` (`source` names it in
        messages): the source's bytes are the values in the output dtype."""
        ...

    def end(self) -> None:
        """The current tensor is complete."""
        ...

    def finish(self) -> None:
        """Every tensor was written: complete the output (indexes, trailing metadata) and check it."""
        ...

    def abort(self) -> None:
        """Stop after a failure and release what is held; leave the files to the caller."""
        ...
