"""Page-cache control for cold-input runs: evict files, count their resident pages, and check that it works.

Imported by the runner, so standard library only (no torch): ``evict`` fsyncs each file and drops its pages
with ``posix_fadvise(POSIX_FADV_DONTNEED)``; ``resident_bytes`` counts the file's pages in the page cache
with ``mincore`` on a mapping that is never touched (so counting reads nothing and adds no RSS);
``make_cold`` does both and falls back to ``echo 1 > /proc/sys/vm/drop_caches`` (whole machine, where
permitted) only if pages survive the fadvise.

Run as a child, ``verify FILE`` shows that eviction really makes reads cold: it times a warm buffered
read, an O_DIRECT read (which never uses the cache) and a buffered read right after eviction, and
prints them with the resident fraction after eviction as one JSON line. A cold buffered read should
take about as long as the direct read and much longer than the warm one. The file is left evicted.

Usage: python bench/pagecache.py verify FILE
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import time
from collections.abc import Iterable
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
# mincore is asked about this many pages at a time, so its result vector stays small (64 KiB).
WINDOW_PAGES = 1 << 16
# More than this fraction of the input still resident after fadvise triggers the drop_caches fallback.
RESIDENT_LIMIT = 0.01
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
READ_BUFFER_BYTES = 16 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` currently in the page cache (page granularity, capped at the file size)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
    finally:
        os.close(fd)
    try:
        pages = -(-size // PAGE)
        vector = (ctypes.c_ubyte * WINDOW_PAGES)()
        resident = 0
        for first in range(0, pages, WINDOW_PAGES):
            count = min(WINDOW_PAGES, pages - first)
            if _libc.mincore(address + first * PAGE, count * PAGE, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            # The low bit says resident; the other bits are reserved (zero).
            resident += count - ctypes.string_at(vector, count).count(0)
        return min(resident * PAGE, size)
    finally:
        _libc.munmap(address, size)


def evict(paths: Iterable[Path]) -> None:
    """Write back and drop every page of each file from the page cache (fsync, then FADV_DONTNEED)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_caches() -> bool:
    """Drop the whole machine's clean page cache; False where not permitted."""
    os.sync()
    try:
        DROP_CACHES.write_text("1\n")
    except OSError:
        return False
    return True


def make_cold(paths: list[Path]) -> dict[str, object]:
    """Evict ``paths`` and report how: method, total bytes, bytes still resident afterwards."""
    total = sum(path.stat().st_size for path in paths)
    evict(paths)
    method = "posix_fadvise(DONTNEED)"
    resident = sum(map(resident_bytes, paths))
    if total and resident / total > RESIDENT_LIMIT:
        if drop_caches():
            method += " + drop_caches"
            resident = sum(map(resident_bytes, paths))
        else:
            method += " (drop_caches not permitted)"
    return {"method": method, "bytes": total, "resident_bytes": resident}


def timed_read(path: Path, direct: bool) -> float:
    """Seconds to read all of ``path``, buffered or with O_DIRECT (page-aligned buffer)."""
    buffer = mmap.mmap(-1, READ_BUFFER_BYTES)
    view = memoryview(buffer)
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        offset = 0
        while count := os.preadv(fd, [view], offset):
            offset += count
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - started
    view.release()
    buffer.close()
    return elapsed


def verify(path: Path) -> dict[str, object]:
    """Timings that show whether eviction makes ``path`` cold; leaves it evicted."""
    size = path.stat().st_size
    timed_read(path, direct=False)  # make it warm
    warm_resident = resident_bytes(path)
    warm = timed_read(path, direct=False)
    direct = timed_read(path, direct=True)
    state = make_cold([path])
    cold = timed_read(path, direct=False)
    evict([path])
    return {
        "file": str(path),
        "bytes": size,
        "method": state["method"],
        "resident_fraction_warm": warm_resident / size,
        "resident_fraction_after_evict": state["resident_bytes"] / size,
        "warm_buffered_s": round(warm, 3),
        "direct_s": round(direct, 3),
        "cold_buffered_s": round(cold, 3),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    check = modes.add_parser("verify", help="time warm, direct and evicted reads of FILE")
    check.add_argument("file", type=Path)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    print(json.dumps(verify(args.file)))


if __name__ == "__main__":
    main()
