"""The output's lock: at most one merge writes an output at a time, and an upload reads a finished output that no
merge replaces meanwhile."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import MergeError, OutputError
from ..interrupts import deferred_signals
from .staging import make_parents, remove_empty, sibling_stem

log = logging.getLogger(__name__)


def lock_path(output: Path) -> Path:
    target = output.resolve()
    return target.parent / f".{sibling_stem(target.name)}.lock"


@contextlib.contextmanager
def output_lock(output: Path, *, shared: bool = False, error: type[MergeError] = OutputError) -> Iterator[None]:
    """Hold the output's lock: `flock` on `.NAME.lock` beside it, which the kernel releases when the process ends,
    however it ends, so a killed merge never leaves a lock that blocks the next one.

    Exclusive for a merge (at most one writes an output at a time), shared for readers of a finished output (an
    upload) that must not see it replaced meanwhile. A lock held the other way is an `error` naming the holder's
    pid, raised at once: waiting would leave a second merge of hours queued behind the first for nothing.

    A merge creates the missing parent directories here (the lock file lives there) and removes them again when
    it leaves nothing in them. The lock file is removed on release, by an exclusive holder only: a taker checks,
    once it holds the lock, that the file it locked is still the one at that path, and takes the new one if not.
    A killed merge leaves its lock file behind: an empty hidden file, harmless, removed by the next merge.
    """
    path = lock_path(output)
    created: list[Path] = []
    fd = None
    try:
        with deferred_signals():  # a Ctrl-C between creating the file and holding its fd would leave the file
            fd = _take(path, output, shared, error, created)
        yield
    finally:
        with deferred_signals():
            try:
                if fd is not None:
                    _release(fd, path, shared)
            finally:
                remove_empty(created)


def _take(path: Path, output: Path, shared: bool, error: type[MergeError], created: list[Path]) -> int | None:
    how = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
    for _ in range(100):
        if not shared:
            created += make_parents(path.parent)
        fd = _open_lock_file(path, shared)
        if fd is None:
            if shared:  # nowhere to put a lock: no merge can be writing there either
                return None
            continue  # a merge that failed just removed the parent it had made: make it again
        try:
            fcntl.flock(fd, how)
        except BlockingIOError:
            holders = _holders(fd)
            os.close(fd)
            if holders == []:  # released between our try and the look: try again
                continue
            raise error(_busy(output, holders or [], shared)) from None
        except OSError as exc:  # a filesystem without locks (some network and FUSE mounts)
            os.close(fd)
            log.warning("%s: cannot lock (%s): other merges into this output are not kept out", path, exc.strerror)
            return None
        if _same_file(fd, path):
            return fd
        os.close(fd)  # its holder removed it on the way out after we opened it: take the file there now
    raise error(f"{output}: cannot take the lock {path}: it keeps being replaced")


def _open_lock_file(path: Path, shared: bool) -> int | None:
    """An fd of the lock file, created if missing; None if its directory is gone. O_NOFOLLOW: a symlink planted
    there must not make us create or truncate a file elsewhere."""
    flags = os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o666)
    except FileNotFoundError:
        return None
    except OSError as exc:
        try:  # a read-only place, or another user's lock file: locking needs no write access
            return os.open(path, os.O_RDONLY | flags)
        except OSError:
            if shared:  # an upload from a read-only place: no merge can be writing there either
                return None
            raise OutputError(f"{path.parent}: cannot create the output there ({exc.strerror or exc})") from exc


def _release(fd: int, path: Path, shared: bool) -> None:
    try:
        if shared:
            try:  # only once no one else holds it may the file go: see output_lock
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return
        if _same_file(fd, path):
            with contextlib.suppress(OSError):
                os.unlink(path)
    finally:
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    held = os.fstat(fd)
    try:
        there = os.lstat(path)
    except OSError:
        return False
    return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)


def _holders(fd: int) -> list[tuple[int, str]] | None:
    """(pid, "READ" or "WRITE") of each flock on the file, from /proc/locks (Linux); None where it cannot be read.

    A line reads `1: FLOCK  ADVISORY  WRITE 7432 fe:00:2147346 0 EOF` (device as hex major:minor, then the inode);
    a blocked request has `->` after the number. A holder in another pid namespace shows as pid 0 or -1.
    """
    held = os.fstat(fd)
    device = (os.major(held.st_dev), os.minor(held.st_dev))
    try:
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    exact, same_inode = [], []
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        try:
            major, minor, inode = fields[5].split(":")
            pid = int(fields[4])
            where = (int(major, 16), int(minor, 16))
            if int(inode) != held.st_ino:
                continue
        except ValueError:
            continue
        (exact if where == device else same_inode).append((pid, fields[3]))
    return exact or same_inode  # stacked filesystems may show another device number than stat does


def _busy(output: Path, holders: list[tuple[int, str]], shared: bool) -> str:
    writers = [pid for pid, kind in holders if kind == "WRITE"]
    readers = [pid for pid, kind in holders if kind == "READ"]
    if readers and not writers:
        who = f"another qlora-merge (pid {readers[0]})" if readers[0] > 0 else "another qlora-merge"
        return f"{output}: {who} is uploading it; let it finish, or choose another output"
    who = f"another merge (pid {writers[0]})" if writers and writers[0] > 0 else "another merge"
    what = "upload it once that merge has finished" if shared else "let it finish, or choose another output"
    return f"{output}: {who} is writing there; {what}"
