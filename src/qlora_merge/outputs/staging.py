"""The output directory: its path checked, filled completely in a hidden sibling, then moved into place in one
step that signals cannot cut; what killed merges left beside it. Its lock is in `lock`, the files copied beside the
weights in `companions`, the refusal of an output overlapping an input in `overlap`."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import OutputError
from ..interrupts import Interrupted, deferred_signals
from ..progress import human_bytes

log = logging.getLogger(__name__)

# Linux limits: bytes in one file name, and in a whole path with its terminating NUL.
NAME_MAX = 255
PATH_MAX = 4096
# Hidden siblings are named ".NAME.partial-PID-XXXXXXXX" (staging), ".NAME.old-PID-XXXXXXXX" (a replaced output)
# and ".NAME.lock". Beyond this many bytes NAME is shortened in them to a prefix and a hash, so that any valid output
# name still has valid sibling names.
SIBLING_STEM_BYTES = 220
# What a sibling name adds to its stem at most: ".", ".partial-", a pid (pid_max is at most 2**22), "-" and
# mkdtemp's 8 random characters.
SIBLING_EXTRA_BYTES = 1 + len(".partial-") + 7 + 1 + 8
# The longest file name a merge writes inside the output (shards, their index, tokenizer files), with room to spare.
LONGEST_FILE_BYTES = 64


def check_output_path(output: str | os.PathLike[str]) -> Path:
    """Refuse an output path that names no directory of its own, or that the filesystem cannot hold.

    An empty or blank path is an unset variable in a script: as a Path it is the current directory, which
    --overwrite would replace. "." and ".." (and "/") name a directory in use rather than one to create.
    """
    text = os.fspath(output)
    if not text.strip():
        raise OutputError(
            f"output {text!r} is empty: name the directory to write the merged model to (an unset variable?)"
        )
    path = Path(text)
    if path.name in ("", ".", ".."):
        raise OutputError(
            f"{text}: names no directory of its own (it would replace the one in use): name one, e.g. {path / 'merged'}"
        )
    absolute = Path(os.path.abspath(path))
    for part in absolute.parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise OutputError(f"{text}: a name in this path has {size} bytes; a file name may have at most {NAME_MAX}")
    stem = min(len(os.fsencode(absolute.name)), SIBLING_STEM_BYTES)
    longest = len(os.fsencode(str(absolute.parent))) + 1 + stem + SIBLING_EXTRA_BYTES + 1
    longest += max(len(os.fsencode(absolute.name)), LONGEST_FILE_BYTES)
    if longest > PATH_MAX - 1:
        raise OutputError(
            f"{text}: path too long: the files a merge writes in and beside it would have paths of up to {longest} "
            f"bytes, and a path may have at most {PATH_MAX - 1}"
        )
    return path


def sibling_stem(name: str) -> str:
    """`name` as it appears in the output's hidden siblings: itself, or when long a prefix of it and a hash."""
    raw = os.fsencode(name)
    if len(raw) <= SIBLING_STEM_BYTES:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    keep = raw[: SIBLING_STEM_BYTES - len(digest) - 1].decode("utf-8", "ignore")
    return f"{keep}~{digest}"


def check_output_free(output: Path, overwrite: bool) -> None:
    """Refuse an output that exists and holds something, unless overwriting: checked before any download."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputError(f"{output}: exists and is not empty (pass --overwrite to replace it)")


def empty_directory(output: Path) -> tuple[int, int] | None:
    """The identity (device, inode) of `output` while it is an empty directory, else None: without --overwrite, a
    merge may put its result in place of that directory, and of no other."""
    target = output.resolve()
    try:
        info = os.lstat(target)
        if not stat.S_ISDIR(info.st_mode):
            return None
        with os.scandir(target) as entries:
            if next(entries, None) is not None:
                return None
    except OSError:
        return None
    return info.st_dev, info.st_ino


def identity(path: Path, follow: bool = True) -> tuple[int, int] | None:
    try:
        info = os.stat(path, follow_symlinks=follow)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


# Free space kept beyond the planned bytes: headers, companion files, and a disk never filled to the last byte.
SPACE_HEADROOM_BYTES = 64 << 20


def check_free_space(output: Path, needed: int) -> None:
    """Refuse to start a merge whose output cannot fit: better now than after writing most of it.

    The space is measured on the nearest existing ancestor of the output (the directories may not exist yet).
    An old output being replaced still takes its space until the end, so it is not counted as free.
    """
    place = output.resolve()
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        free = shutil.disk_usage(place).free
    except OSError:  # cannot tell (an unusual filesystem): writing will report a full disk by itself
        return
    wanted = needed + SPACE_HEADROOM_BYTES
    if free < wanted:
        raise OutputError(
            f"{place}: not enough free space for the output: needs {human_bytes(wanted)} ({wanted} bytes, "
            f"{SPACE_HEADROOM_BYTES >> 20} MiB of it headroom), {human_bytes(free)} ({free} bytes) available"
        )


# ------------------------------------------------------------------------------------- staging, publish, leftovers


def remove_stale(output: Path) -> list[Path]:
    """Clear what merges into `output` that were killed (SIGKILL, power loss) left beside it; returns it.

    A merge writes into `.NAME.partial-PID-*` and, where the filesystem cannot exchange two directories in one
    rename, parks a replaced output in `.NAME.old-PID-*`; a killed process cannot remove them. Only directories of
    exactly these names whose process is no longer alive on this machine are touched. An old output parked by a
    merge killed between its two renames is the only copy left: it is put back in place rather than deleted.
    """
    target = output.resolve()
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        kind = _stale_kind(entry, target.name)
        if kind is None:
            continue
        path = Path(entry.path)
        parked = path / target.name
        if kind == "old" and parked.is_dir() and not os.path.lexists(target):
            parked.rename(target)
            log.warning("%s: put back the previous output, which a killed merge had moved to %s", output, path)
        _remove_tree(path, "left by a merge that was killed")
        removed.append(path)
    return removed


def _stale_kind(entry: os.DirEntry[str], name: str) -> str | None:
    for kind in ("partial", "old"):
        prefix = f".{sibling_stem(name)}.{kind}-"
        if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
            pid = entry.name[len(prefix) :].split("-", 1)[0]
            return kind if pid.isdigit() and not _alive(int(pid)) else None
    return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def make_parents(parent: Path) -> list[Path]:
    missing = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        remove_empty(missing)
        raise OutputError(f"{parent}: cannot create the output there ({exc.strerror or exc})") from exc
    return missing


def make_staging_dir(output: Path) -> tuple[Path, list[Path]]:
    """A hidden sibling of the output on the same filesystem, so the final rename is atomic. Its name carries
    this process's id, so a later merge can tell it from a live one's when this process is killed.

    Missing parent directories are created; they are returned, deepest first, so that a failed merge can remove
    them again and leave the disk as it found it.
    """
    target = output.resolve()
    parent = target.parent
    created = make_parents(parent)
    try:
        prefix = f".{sibling_stem(target.name)}.partial-{os.getpid()}-"
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as exc:
        remove_empty(created)
        raise OutputError(f"{parent}: cannot create the output there ({exc.strerror or exc})") from exc
    # mkdtemp makes the directory private (0700); the published model should get the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging, created


def publish(staging: Path, output: Path, *, overwrite: bool = True, replaceable: tuple[int, int] | None = None) -> None:
    """Move the finished staging dir into place.

    Without `overwrite` nothing is replaced, whatever appeared at the output since the merge started (another
    process's files, even an empty directory): the rename itself refuses an existing target (renameat2's
    RENAME_NOREPLACE), except the empty directory `replaceable` seen when the merge started (`empty_directory`).
    With `overwrite`, an existing output is swapped with the new one in one rename (RENAME_EXCHANGE; where the
    filesystem has none, two renames whose failure is undone) and only then removed.

    SIGINT and SIGTERM are held until the swap and the removal of the old output are over (see `deferred_signals`);
    one that came meanwhile is raised afterwards as `Interrupted` with `output` set: the output is complete.
    """
    _fsync_dir(staging)
    target = output.resolve()
    swapped = False
    try:
        with deferred_signals():
            old = _move_into_place(staging, target, output, overwrite, replaceable)
            swapped = True
            _fsync_dir(target.parent)
            if old is not None:
                _remove_tree(old, "the output replaced just now")
    except KeyboardInterrupt as exc:
        if swapped:
            raise Interrupted(int(getattr(exc, "signum", signal.SIGINT)), output=output) from None
        raise


def _move_into_place(
    staging: Path, target: Path, output: Path, overwrite: bool, replaceable: tuple[int, int] | None
) -> Path | None:
    """Returns where the replaced output went (to be removed), or None when nothing was replaced."""
    appeared = (
        f"{output}: appeared while merging and was left alone; nothing was written (pass --overwrite to replace it)"
    )
    try:
        if not overwrite and replaceable is not None and identity(target, follow=False) == replaceable:
            try:
                os.rmdir(target)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                raise OutputError(appeared) from exc
        try:
            _rename_noreplace(staging, target)
            return None
        except FileExistsError as exc:
            if not overwrite:
                raise OutputError(appeared) from exc
        return _swap(staging, target)
    except OSError as exc:
        where = "it is a mount point" if exc.errno == errno.EBUSY else exc.strerror or str(exc)
        raise OutputError(
            f"{output}: cannot be replaced ({where}); it was left as it was and nothing was written"
        ) from exc


# renameat2(2) flags, and the errors meaning this kernel, libc or filesystem does not offer them.
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_UNSUPPORTED = (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP)


def _renameat2() -> Any:
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2  # glibc 2.28, musl 1.2.4
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _renameat2()


def _rename(source: Path, target: Path, flags: int) -> None:
    if _RENAMEAT2 is None:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(source), None, str(target))


def _rename_noreplace(source: Path, target: Path) -> None:
    try:
        _rename(source, target, RENAME_NOREPLACE)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        # Checked, then renamed: only a process that ignores the output's lock can come in between.
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.rename(source, target)


def _swap(staging: Path, target: Path) -> Path:
    """Put the staging dir at `target` and return where the previous output now is."""
    try:
        _rename(staging, target, RENAME_EXCHANGE)
        return staging
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
    retired = Path(tempfile.mkdtemp(prefix=f".{sibling_stem(target.name)}.old-{os.getpid()}-", dir=target.parent))
    try:
        os.rename(target, retired / target.name)
    except BaseException:
        os.rmdir(retired)
        raise
    try:
        os.rename(staging, target)
    except BaseException:  # put the old output back: a failed merge must leave it as it was
        os.rename(retired / target.name, target)
        os.rmdir(retired)
        raise
    return retired


def _remove_tree(path: Path, what: str) -> None:
    """Remove a directory we made; what cannot be removed is named in a warning rather than left silently."""
    failures: list[str] = []

    def failed(function: object, name: str, exc_info: tuple[type[BaseException], BaseException, object]) -> None:
        if not isinstance(exc_info[1], FileNotFoundError):
            failures.append(f"{name}: {getattr(exc_info[1], 'strerror', None) or exc_info[1]}")

    shutil.rmtree(path, onerror=failed)
    if failures and os.path.lexists(path):
        log.warning("%s (%s) could not be removed completely (%s); remove it by hand", path, what, failures[0])


def discard(staging: Path, created_parents: Iterable[Path] = ()) -> None:
    """Remove a staging dir and the parent directories made for it (if still empty). Signals are held meanwhile:
    a second Ctrl-C must not leave half a staging directory behind."""
    with deferred_signals():
        shutil.rmtree(staging, ignore_errors=True)
        remove_empty(created_parents)


def remove_empty(directories: Iterable[Path]) -> None:
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:  # not empty (someone else wrote there) or already gone: leave it
            return


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
