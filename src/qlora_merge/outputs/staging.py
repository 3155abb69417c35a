"""The output directory: locked against other merges into it, filled completely in a hidden sibling, then moved
into place in one step that signals cannot cut; what killed merges left beside it; companion files."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import MergeError, OutputError
from ..interrupts import Interrupted, deferred_signals
from ..names import ADAPTER_CONFIG_NAME, PICKLE_INDEX_NAME, WEIGHTS_INDEX_NAME
from ..progress import human_bytes

log = logging.getLogger(__name__)

# Files of other weight formats are not companions: copying them would ship stale, unmerged weights.
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".onnx_data",
    ".gguf",
    ".ot",
    ".tflite",
    ".npz",
    ".pkl",
)
WEIGHT_INDEXES = (WEIGHTS_INDEX_NAME, PICKLE_INDEX_NAME)
NOT_COPIED = ("README.md", ".gitattributes", ADAPTER_CONFIG_NAME)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)


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


# ------------------------------------------------------------------------------------------ one merge per output


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
    target = output.resolve()
    path = target.parent / f".{sibling_stem(target.name)}.lock"
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
                _remove_empty(created)


def _take(path: Path, output: Path, shared: bool, error: type[MergeError], created: list[Path]) -> int | None:
    how = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
    for _ in range(100):
        if not shared:
            created += _make_parents(path.parent)
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


def _make_parents(parent: Path) -> list[Path]:
    missing = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(missing)
        raise OutputError(f"{parent}: cannot create the output there ({exc.strerror or exc})") from exc
    return missing


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


# ------------------------------------------------------------------------------------------------ refused inputs


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
    folders = {ident: source for source in inputs if (ident := _identity(source)) is not None}
    equal_only = {ident: source for source in may_hold if (ident := _identity(source)) is not None}
    for ancestor in (target, *target.parents):
        ident = _identity(ancestor)
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


def _identity(path: Path, follow: bool = True) -> tuple[int, int] | None:
    try:
        info = os.stat(path, follow_symlinks=follow)
    except (OSError, ValueError):
        return None
    return info.st_dev, info.st_ino


def _files_read(directory: Path) -> Iterator[tuple[Path, tuple[int, int]]]:
    """The input directory and what a merge may read of it: each top-level entry as the file it resolves to, and
    the directory a link resolves into (an HF cache's blobs/)."""
    if (ident := _identity(directory)) is not None:
        yield directory, ident
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        path = Path(entry.path)
        if (ident := _identity(path)) is not None:
            yield path, ident
        if entry.is_symlink() and (ident := _identity(path.resolve().parent)) is not None:
            yield path.resolve().parent, ident


def _tree(root: Path) -> Iterator[tuple[Path, tuple[int, int]]]:
    """Everything that removing `root` would remove, as rmtree does: links themselves, never what they point to."""
    if (ident := _identity(root)) is None:
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


def make_staging_dir(output: Path) -> tuple[Path, list[Path]]:
    """A hidden sibling of the output on the same filesystem, so the final rename is atomic. Its name carries
    this process's id, so a later merge can tell it from a live one's when this process is killed.

    Missing parent directories are created; they are returned, deepest first, so that a failed merge can remove
    them again and leave the disk as it found it.
    """
    target = output.resolve()
    parent = target.parent
    created = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{sibling_stem(target.name)}.partial-{os.getpid()}-"
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    except OSError as exc:
        _remove_empty(created)
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
        if not overwrite and replaceable is not None and _identity(target, follow=False) == replaceable:
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
        _remove_empty(created_parents)


def _remove_empty(directories: Iterable[Path]) -> None:
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:  # not empty (someone else wrote there) or already gone: leave it
            return


# ---------------------------------------------------------------------------------------------- companion files


def _input_file(path: Path, directory: Path) -> bool:
    """Whether `path` may be copied into the output: a regular file of the input directory, or a link to one
    inside it or, in the hub cache, in its repo's blobs/. Any other link is left out with a warning: followed, a
    link to /proc/self/environ or /etc/passwd would put that file into the merged model (and onto the hub)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if stat.S_ISREG(info.st_mode):
        return True
    if not stat.S_ISLNK(info.st_mode):
        return False
    root = directory.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<commit>/file -> ../../blobs/<hash>
        allowed.append(root.parent.parent / "blobs")
    target = path.resolve()
    if target.is_file() and any(target.is_relative_to(place) for place in allowed):
        return True
    log.warning("%s: a link to %s, which is not a file of this input directory: not copied", path, target)
    return False


def companion_files(base_dir: Path, weight_files: Iterable[str]) -> list[Path]:
    """Every top-level file of the base that is not weights: configs, tokenizer, chat template, code (regular files
    only, or links that stay inside the input: see `_input_file`)."""
    skip = set(weight_files) | set(WEIGHT_INDEXES) | set(NOT_COPIED)
    return sorted(
        p
        for p in base_dir.iterdir()
        if p.name not in skip
        and not p.name.endswith(WEIGHT_SUFFIXES)
        and not p.name.startswith(".")
        and _input_file(p, base_dir)
    )


def adapter_tokenizer_files(adapter_dir: Path) -> list[Path]:
    """Tokenizer files a trainer saved beside the adapter; they win over the base's (they may be resized)."""
    return [adapter_dir / name for name in TOKENIZER_FILES if _input_file(adapter_dir / name, adapter_dir)]


def copy_companions(files: Iterable[Path], destination: Path) -> None:
    for path in files:
        shutil.copyfile(path, destination / path.name)


def write_config(
    base_config: dict[str, Any], dtype_name: str, destination: Path, changes: dict[str, Any] | None = None
) -> None:
    """config.json with every dtype field (top level and nested sub-configs) set to the output dtype, and the
    plan's changes (`vocab_size` after a resize, `tie_word_embeddings` when untied) applied."""
    config = _with_changes(_with_dtype(base_config, dtype_name), changes or {})
    (destination / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _with_changes(config: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Set each changed field at the top level and in a nested `text_config` (multimodal models keep the language
    model's vocab_size and tying there); a field a config lacks is added at the top level only."""
    updated = dict(config)
    text = dict(updated["text_config"]) if isinstance(updated.get("text_config"), dict) else None
    for key, value in changes.items():
        updated[key] = value
        if text is not None and key in text:
            text[key] = value
    if text is not None:
        updated["text_config"] = text
    return updated


def _with_dtype(config: dict[str, Any], dtype_name: str) -> dict[str, Any]:
    updated = {}
    for key, value in config.items():
        if key in ("torch_dtype", "dtype") and (value is None or isinstance(value, str)):
            updated[key] = dtype_name
        elif isinstance(value, dict):
            updated[key] = _with_dtype(value, dtype_name)
        else:
            updated[key] = value
    if "torch_dtype" not in updated and "dtype" not in updated and "model_type" in updated:
        updated["torch_dtype"] = dtype_name
    return updated


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
