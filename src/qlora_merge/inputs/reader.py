"""Read tensors and byte ranges from safetensors files by offset with pread, in order or ahead of their use."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from ..errors import CheckpointFormatError
from .format import TensorEntry
from .opened import OpenedFile, opened_file


class TensorReader:
    """Keeps one descriptor per file open and reads tensors with pread, so memory holds only what is asked for.

    A path that carries the descriptor its header was read from (opened.InputPath) is read through that file,
    never reopened by name: the bytes read are those the plan was made from."""

    def __init__(self) -> None:
        self._fds: dict[Path | OpenedFile, int] = {}

    def fd(self, path: Path) -> int:
        opened = opened_file(path)
        key = opened or path
        fd = self._fds.get(key)
        if fd is None:
            fd = opened.reopen() if opened is not None else os.open(path, os.O_RDONLY)
            # The merge reads every file front to back: a sequential hint doubles the kernel's readahead window.
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            self._fds[key] = fd
        return fd

    def read(self, entry: TensorEntry) -> torch.Tensor:
        """The tensor as stored (its own dtype and shape), in freshly allocated memory."""
        raw = torch.empty(entry.nbytes, dtype=torch.uint8)
        self.read_bytes_into(entry.file, entry.start, raw)
        return raw.view(entry.torch_dtype).reshape(entry.shape)

    def read_bytes_into(self, path: Path, offset: int, out: torch.Tensor) -> None:
        """Fill the uint8 tensor `out` with the bytes of `path` starting at `offset`."""
        view = memoryview(out.numpy()).cast("B")
        fd = self.fd(path)
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise CheckpointFormatError(f"{path}: file ended early (truncated while reading)")
            done += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# How far ahead of the merge the read-ahead asks the kernel to fetch each input file.
HINT_BYTES = 256 << 20
# Buffers up to this size are kept for the next range; merge blocks and convert chunks stay well below it.
KEEP_BYTES = 16 << 20


@dataclass(frozen=True)
class ByteRange:
    """Bytes the merge will read; `fetch=False` for ranges another reader takes (file-to-file copies), which the
    read-ahead only announces to the kernel."""

    path: Path
    offset: int
    nbytes: int
    fetch: bool = True


class ReadAhead:
    """Reads a sequence of byte ranges, known in advance, in a background thread a few ranges ahead of their use.

    Reading warm input is a memcpy out of the page cache, about as costly as the merge arithmetic; here it runs on
    another core while the merge computes. Each take() names the range it expects, so a consumer that strays from
    the announced order fails at once instead of merging the wrong bytes.
    """

    def __init__(self, ranges: list[ByteRange], depth: int = 3) -> None:
        self._ranges = ranges
        self._reader = TensorReader()
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        self._buffers = depth + 1
        for _ in range(self._buffers):
            self._free.put(torch.empty(0, dtype=torch.uint8))
        self._ready: queue.Queue[tuple[ByteRange, torch.Tensor] | BaseException | None] = queue.Queue()
        self._held: list[torch.Tensor] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="qlora-merge-reader", daemon=True)
        self._thread.start()

    def take(self, byte_range: ByteRange) -> torch.Tensor:
        """The bytes of the next range, which must be `byte_range`; valid until the next take()."""
        (data,) = self.take_all((byte_range,))
        return data

    def take_all(self, byte_ranges: Sequence[ByteRange]) -> list[torch.Tensor]:
        """The bytes of the next ranges, which must be `byte_ranges`, all valid together until the next take: what
        a source that decodes one run of elements from several ranges (blocks and their scales) needs."""
        for held in self._held:
            # A whole-tensor read (a shape merged unblocked) would otherwise pin its size in memory for good.
            self._free.put(held if held.numel() <= KEEP_BYTES else torch.empty(0, dtype=torch.uint8))
        self._held = []
        while self._buffers <= len(byte_ranges):  # held together, plus one for the reader to fill meanwhile
            self._free.put(torch.empty(0, dtype=torch.uint8))
            self._buffers += 1
        return [self._next(byte_range) for byte_range in byte_ranges]

    def _next(self, byte_range: ByteRange) -> torch.Tensor:
        item = self._ready.get()
        if isinstance(item, BaseException):
            raise item
        if item is None:
            self._ready.put(None)
            raise RuntimeError(f"read-ahead out of order: no ranges left, asked for {byte_range}")
        expected, buffer = item
        if byte_range != expected:
            raise RuntimeError(f"read-ahead out of order: expected {expected}, asked for {byte_range}")
        self._held.append(buffer)
        return buffer[: byte_range.nbytes]

    def close(self) -> None:
        self._stopping = True
        self._free.put(torch.empty(0, dtype=torch.uint8))  # wakes the thread if it waits for a buffer
        self._thread.join()
        self._reader.close()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.close()

    def _run(self) -> None:
        hinted: dict[Path, int] = {}
        try:
            for byte_range in self._ranges:
                self._hint(byte_range, hinted)
                if not byte_range.fetch:
                    continue
                buffer = self._free.get()
                if self._stopping:
                    return
                if buffer.numel() < byte_range.nbytes:
                    buffer = torch.empty(byte_range.nbytes, dtype=torch.uint8)
                self._reader.read_bytes_into(byte_range.path, byte_range.offset, buffer[: byte_range.nbytes])
                self._ready.put((byte_range, buffer))
            self._ready.put(None)  # the end: a take() beyond it is a bug, reported rather than waited on forever
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            self._ready.put(exc)

    def _hint(self, byte_range: ByteRange, hinted: dict[Path, int]) -> None:
        """Have the kernel fetch the next HINT_BYTES of the file in the background: on cold input each read then
        finds its pages arriving instead of waiting for them one readahead window at a time."""
        start = max(hinted.get(byte_range.path, 0), byte_range.offset)
        end = byte_range.offset + HINT_BYTES
        if start < end:
            os.posix_fadvise(self._reader.fd(byte_range.path), start, end - start, os.POSIX_FADV_WILLNEED)
            hinted[byte_range.path] = end
