"""Outputs refused for the inputs they would overlap: an output inside an input, or holding one (by path, or as the
same files under another path), would delete what a merge reads when it is replaced."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import OutputError
from .staging import identity


def check_not_inside(output: Path, inputs: Iterable[Path], may_hold: Iterable[Path] = ()) -> None:
    """Refuse an output equal to or inside an input, or holding one: replacing it would delete what is read.

    An input in `may_hold` (the adapter) may hold the output in a subdirectory, as axolotl lays it out
    ({output_dir}/merged beside the adapter files): only its top-level files are read, and a merge never
    replaces anything but the output directory itself.

    Paths are compared first, then the files themselves (device and inode), which is what a merge reads and an
    --overwrite deletes: an HF cache snapshot's files are links into the repo's blobs/, a bind mount or a
    symlinked directory shows the same files under another path.
    """
    inputs, may_hold = list(inputs), list(may_hold)
    resolved = output.resolve()
    nested_ok = [source.resolve() for source in may_hold]
    for source in [*inputs, *may_hold]:
        inside = resolved.is_relative_to(source.resolve()) and source.resolve() not in nested_ok
        if resolved == source.resolve() or inside:
            raise OutputError(f"{output}: output must not be inside an input ({source})")
        if source.resolve().is_relative_to(resolved):
            raise OutputError(f"{output}: output must not contain an input ({source}): replacing it would delete it")
    _check_files_read(output, inputs, may_hold)


def _check_files_read(output: Path, inputs: list[Path], may_hold: list[Path]) -> None:
    target = output.resolve()
    folders = {ident: source for source in inputs if (ident := identity(source)) is not None}
    equal_only = {ident: source for source in may_hold if (ident := identity(source)) is not None}
    for ancestor in (target, *target.parents):
        ident = identity(ancestor)
        source = folders.get(ident) or (equal_only.get(ident) if ancestor == target else None)
        if ident is not None and source is not None:
            raise OutputError(
                f"{output}: output must not be inside an input ({source}, the same directory as {ancestor})"
            )
    read: dict[tuple[int, int], Path] = {}
    for source in [*inputs, *may_hold]:
        read.update((ident, path) for path, ident in _files_read(source) if ident not in read)
    entries = list(_tree(target))
    for path, ident in entries[1:] + entries[:1]:  # a file read, rather than the directory it is in, when both are
        if ident in read:
            raise OutputError(
                f"{output}: output must not contain an input ({read[ident]}, which is {path}): replacing it would "
                "delete it"
            )


def _files_read(directory: Path) -> Iterator[tuple[Path, tuple[int, int]]]:
    """The input directory and what a merge may read of it: each top-level entry as the file it resolves to, and
    the directory a link resolves into (an HF cache's blobs/)."""
    if (ident := identity(directory)) is not None:
        yield directory, ident
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        path = Path(entry.path)
        if (ident := identity(path)) is not None:
            yield path, ident
        if entry.is_symlink() and (ident := identity(path.resolve().parent)) is not None:
            yield path.resolve().parent, ident


def _tree(root: Path) -> Iterator[tuple[Path, tuple[int, int]]]:
    """Everything that removing `root` would remove, as rmtree does: links themselves, never what they point to."""
    if (ident := identity(root)) is None:
        return
    yield root, ident
    pending = [root]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            yield Path(entry.path), (info.st_dev, info.st_ino)
            if stat.S_ISDIR(info.st_mode):
                pending.append(Path(entry.path))
