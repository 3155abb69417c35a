"""Start reading a local base from the disk while the CLI is still importing torch.

On cold input a merge is bound by the disk, and the second or so that importing torch takes would leave the disk
idle. Before that import the CLI names the base directory here; a daemon thread asks the kernel to read the first
PREFETCH_BYTES of its safetensors files, in shard order, into the page cache (posix_fadvise WILLNEED: a hint,
nothing is read into this process and nothing is opened for writing). The merge's own read-ahead
(inputs/reader.ReadAhead) then finds those pages waiting. Standard library only, so that it runs before torch loads.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from pathlib import Path

# About what a disk reads while torch imports (1.2 s at ~1.5 GB/s), and small beside any machine's page cache.
PREFETCH_BYTES = 2 << 30


def prefetch_base(base: str | None, budget: int = PREFETCH_BYTES) -> threading.Thread | None:
    """Hint the kernel to read the start of a local base directory's safetensors shards; returns the thread doing
    it, or None where there is nothing local to hint (a hub id, a missing path: the merge will say so)."""
    if base is None or not hasattr(os, "posix_fadvise"):
        return None
    directory = Path(base)
    if not directory.is_dir():
        return None
    thread = threading.Thread(target=_hint, args=(directory, budget), name="qlora-merge-prefetch", daemon=True)
    thread.start()
    return thread


def _hint(directory: Path, budget: int) -> None:
    for path in sorted(directory.glob("*.safetensors")):
        if budget <= 0:
            return
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO named *.safetensors must not block here
            try:
                info = os.fstat(fd)
                if not stat.S_ISREG(info.st_mode):
                    continue
                count = min(info.st_size, budget)
                os.posix_fadvise(fd, 0, count, os.POSIX_FADV_WILLNEED)
                budget -= count
            finally:
                os.close(fd)
