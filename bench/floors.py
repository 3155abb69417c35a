"""Direct-I/O floors, run as a child process by the runner.

``write DEST SIZE...`` writes one file per SIZE (bytes) into DEST with ``O_DIRECT`` from a
page-aligned ``mmap`` buffer and fsyncs it: the cost of putting that many bytes on the disk with no
page cache involved. ``read FILE...`` reads the files with ``O_DIRECT``: a cold-read floor, since
direct reads bypass the (warm) page cache. ``readwrite DEST FILE...`` does both at once, reading the files on one
thread while writing files of their sizes on another: the floor of a merge of cold input, which must read the base
from the disk and write the same bytes back. Prints a one-line JSON summary.

Usage: python bench/floors.py write OUTDIR 1999832976 200286872
       python bench/floors.py read SHARD...
       python bench/floors.py readwrite OUTDIR SHARD...
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import threading
import time
from pathlib import Path

BUFFER_BYTES = 64 << 20
BLOCK_BYTES = 4096
PATTERN_BYTES = 1 << 20


def aligned_buffer(fill: bool) -> mmap.mmap:
    """A page-aligned anonymous buffer; optionally filled with incompressible bytes."""
    buffer = mmap.mmap(-1, BUFFER_BYTES)
    if fill:
        pattern = os.urandom(PATTERN_BYTES)
        for offset in range(0, BUFFER_BYTES, PATTERN_BYTES):
            buffer[offset : offset + PATTERN_BYTES] = pattern
    return buffer


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return -(-value // multiple) * multiple


def write_direct(path: Path, size: int, buffer: mmap.mmap) -> None:
    """Write ``size`` bytes to ``path`` with O_DIRECT, padding the tail block and truncating after."""
    view = memoryview(buffer)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        remaining = size
        while remaining > 0:
            chunk = round_up(min(remaining, BUFFER_BYTES), BLOCK_BYTES)
            written = os.write(fd, view[:chunk])
            if written != chunk:
                raise OSError(f"short direct write to {path}: {written} of {chunk} bytes")
            remaining -= chunk
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_direct(path: Path, buffer: mmap.mmap) -> int:
    """Read all of ``path`` with O_DIRECT; return the byte count."""
    view = memoryview(buffer)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    total = 0
    try:
        while True:
            count = os.preadv(fd, [view], total)
            total += count
            if count < BUFFER_BYTES:
                return total
    finally:
        os.close(fd)


def run_write(dest: Path, sizes: list[int]) -> int:
    """Write one file per size into ``dest``; return the total byte count."""
    dest.mkdir(parents=True, exist_ok=True)
    buffer = aligned_buffer(fill=True)
    for index, size in enumerate(sizes):
        write_direct(dest / f"direct-{index:05d}.bin", size, buffer)
    return sum(sizes)


def run_read(files: list[Path]) -> int:
    """Read every file; return the total byte count."""
    buffer = aligned_buffer(fill=False)
    return sum(read_direct(path, buffer) for path in files)


def run_read_write(dest: Path, files: list[Path]) -> int:
    """Read `files` on a thread while writing files of their sizes into `dest`; return the bytes read + written."""
    read: list[int] = []
    reader = threading.Thread(target=lambda: read.append(run_read(files)))
    reader.start()
    written = run_write(dest, [path.stat().st_size for path in files])
    reader.join()
    if not read:
        raise RuntimeError("the read half failed")
    return read[0] + written


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    write = modes.add_parser("write", help="O_DIRECT write of files of the given sizes")
    write.add_argument("dest", type=Path)
    write.add_argument("sizes", type=int, nargs="+")
    read = modes.add_parser("read", help="O_DIRECT read of the given files")
    read.add_argument("files", type=Path, nargs="+")
    both = modes.add_parser("readwrite", help="O_DIRECT read of the files while writing files of their sizes")
    both.add_argument("dest", type=Path)
    both.add_argument("files", type=Path, nargs="+")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    if args.mode == "write":
        total = run_write(args.dest, args.sizes)
    elif args.mode == "read":
        total = run_read(args.files)
    else:
        total = run_read_write(args.dest, args.files)
    elapsed = time.perf_counter() - started
    print(json.dumps({"mode": args.mode, "bytes": total, "seconds": round(elapsed, 3)}))


if __name__ == "__main__":
    main()
