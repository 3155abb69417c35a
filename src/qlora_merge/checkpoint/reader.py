"""Read single tensors from safetensors files by byte offset, without mapping or loading whole files."""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

import torch

from ..errors import CheckpointFormatError
from .format import TensorEntry


class TensorReader:
    """Keeps one descriptor per file open and reads tensors with pread, so memory holds only what is asked for."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            self._fds[path] = fd
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
