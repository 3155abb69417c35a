"""Input weight files opened once, when their header is read, and read through that descriptor ever after.

A merge plans from the headers and reads the tensors later, for minutes on a large model. Reading by path would
take whatever file is at the path by then: another process that replaces a shard meanwhile (a re-download, an
`os.replace`) would get its tensors merged under the plan made from the old header, and the merge would exit 0
with a mix of two checkpoints. Through the descriptor the header came from, the bytes read are those of the file
that was planned, whatever happens to its path. A file changed in place (same inode, new bytes) cannot be read
consistently at all; `changed_inputs` finds it from the descriptor's size and mtime, so the merge fails instead.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path, PosixPath

from ..errors import MergeError


class InputChanged(MergeError):
    """An input file was modified in place while the merge read it."""


class OpenedFile:
    """One input file's descriptor, opened read-only, and what fstat said of it then. Closed when the last path
    that carries it is gone."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            stat = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.source = path
        self.device, self.inode = stat.st_dev, stat.st_ino
        self.size, self.mtime_ns = stat.st_size, stat.st_mtime_ns
        weakref.finalize(self, os.close, fd)

    def reopen(self) -> int:
        """A new descriptor of this same file (not of whatever its path names now), with a file description of its
        own: each reader keeps its own kernel readahead state, as when it opened the path itself."""
        try:
            fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY)
        except OSError:  # no /proc: a duplicate shares the description, which only costs readahead tuning
            return os.dup(self.fd)
        stat = os.fstat(fd)
        if (stat.st_dev, stat.st_ino) != (self.device, self.inode):
            os.close(fd)
            return os.dup(self.fd)
        return fd

    def change(self) -> str:
        """How the file differs from when it was opened (size or mtime), or "" when it does not."""
        stat = os.fstat(self.fd)
        if stat.st_size != self.size:
            return f"its size went from {self.size} to {stat.st_size} bytes"
        if stat.st_mtime_ns != self.mtime_ns:
            return "it was written to"
        return ""

    def same_as(self, path: Path) -> bool:
        """Whether `path` still names this file (not a replacement written over it)."""
        try:
            stat = os.stat(path)
        except (OSError, ValueError):
            return False
        return (stat.st_dev, stat.st_ino) == (self.device, self.inode)


class InputPath(PosixPath):
    """The path of an input file that carries the file's OpenedFile: TensorEntry.file keeps this path, so every
    tensor entry reads the file its header came from. Paths derived from it (`.parent`) carry nothing."""

    opened: OpenedFile | None = None


def open_input(path: Path) -> InputPath:
    """`path` opened: the same path, carrying its descriptor. OSError as os.open raises it."""
    opened = OpenedFile(path)
    carrier = InputPath(path)
    carrier.opened = opened
    return carrier


def opened_file(path: Path) -> OpenedFile | None:
    return getattr(path, "opened", None)


def opened_files(*roots: object) -> list[OpenedFile]:
    """Every OpenedFile that the paths inside `roots` carry (dataclasses, tuples, lists, dicts and sets are
    searched; tensors and strings are not), each once, in the order found: the files a plan reads."""
    found: dict[int, OpenedFile] = {}
    for path in _paths(roots, set()):
        opened = opened_file(path)
        if opened is not None:
            found.setdefault(id(opened), opened)
    return list(found.values())


def _paths(value: object, seen: set[int]) -> Iterator[Path]:
    if isinstance(value, Path):
        yield value
        return
    if isinstance(value, str | bytes | int | float | bool) or value is None or id(value) in seen:
        return
    seen.add(id(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _paths(getattr(value, field.name), seen)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _paths(item, seen)
    elif isinstance(value, tuple | list | set | frozenset):
        for item in value:
            yield from _paths(item, seen)


def check_unchanged(files: Iterable[OpenedFile]) -> None:
    """Raise InputChanged, naming the first file that was modified in place since it was opened: what was read
    of it may mix its old and new bytes. (A file replaced at its path is not changed: it was read whole.)"""
    for opened in files:
        how = opened.change()
        if how:
            raise InputChanged(
                f"{opened.source}: changed while it was being read ({how}); run again once nothing writes to it"
            )
