"""Write a sharded safetensors checkpoint in two phases: plan every tensor and header first, then stream bytes.

Knowing every shard's header before any data is written lets tensors go straight to disk one at a time, so no
shard is ever collected in memory. The writer refuses calls out of the planned order, which is what keeps the
bytes and the headers in agreement.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .format import encode_header, tensor_nbytes

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
COPY_CHUNK = 64 << 20
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 and '5GiB' -> 5*2**30, the way transformers reads max_shard_size."""
    if isinstance(text, int):
        return text
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB)")
    number, unit = match.groups()
    size = int(float(number) * _UNITS[(unit or "B").upper()])
    if size <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return size


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
class ShardLayout:
    file_name: str
    tensors: tuple[OutputTensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[ShardLayout]:
    """Split tensors, kept in order, into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    groups: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    if len(groups) == 1:
        return [ShardLayout(SINGLE_NAME, tuple(groups[0]))]
    n = len(groups)
    return [ShardLayout(f"model-{i:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups, 1)]


def index_json(shards: list[ShardLayout]) -> dict[str, object] | None:
    """The model.safetensors.index.json for several shards; a single model.safetensors needs none."""
    if len(shards) == 1:
        return None
    weight_map = {t.name: shard.file_name for shard in shards for t in shard.tensors}
    return {"metadata": {"total_size": sum(s.nbytes for s in shards)}, "weight_map": weight_map}


class CheckpointWriter:
    """Streams tensors into planned shards: begin(name) in plan order, write()/copy_from() its bytes, end()."""

    def __init__(self, directory: Path, shards: list[ShardLayout], metadata: dict[str, str]) -> None:
        self._directory = directory
        self._shards = shards
        self._metadata = metadata
        self._order = [(i, t) for i, shard in enumerate(shards) for t in shard.tensors]
        self._position = -1
        self._fd: int | None = None
        self._open_shard = -1
        self._remaining = 0
        self.bytes_written = 0

    def begin(self, name: str) -> OutputTensor:
        if self._remaining:
            raise RuntimeError(f"tensor '{self._order[self._position][1].name}' is not complete")
        self._position += 1
        if self._position >= len(self._order):
            raise RuntimeError(f"tensor '{name}' is not in the output plan")
        shard_index, tensor = self._order[self._position]
        if tensor.name != name:
            raise RuntimeError(f"expected tensor '{tensor.name}' next, got '{name}'")
        if shard_index != self._open_shard:
            self._start_shard(shard_index)
        self._remaining = tensor.nbytes
        return tensor

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        if len(view) > self._remaining:
            raise RuntimeError("more bytes written than the tensor holds")
        while view:
            n = os.write(self._fd, view)  # type: ignore[arg-type]
            view = view[n:]
            self._remaining -= n
            self.bytes_written += n

    def copy_from(self, src_fd: int, offset: int, count: int) -> None:
        """Copy bytes of another file inside the kernel where it can (no trip through user memory)."""
        if count > self._remaining:
            raise RuntimeError("more bytes copied than the tensor holds")
        end = offset + count
        while offset < end:
            try:
                n = os.copy_file_range(src_fd, self._fd, min(end - offset, 1 << 30), offset)  # type: ignore[arg-type]
            except OSError:
                n = self._copy_via_buffer(src_fd, offset, end - offset)
            if n == 0:
                raise OSError(f"source ended early at byte {offset}")
            offset += n
            self._remaining -= n
            self.bytes_written += n

    def _copy_via_buffer(self, src_fd: int, offset: int, count: int) -> int:
        chunk = os.pread(src_fd, min(count, COPY_CHUNK), offset)
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._fd, view) :]  # type: ignore[arg-type]
        return len(chunk)

    def end(self) -> None:
        if self._remaining:
            raise RuntimeError(f"tensor '{self._order[self._position][1].name}' is missing {self._remaining} bytes")

    def close(self) -> None:
        """Finish the last shard and write the index; every planned tensor must have been written."""
        self.end()
        if self._position != len(self._order) - 1:
            missing = self._order[self._position + 1][1].name
            raise RuntimeError(f"output incomplete: tensor '{missing}' was never written")
        self._close_shard()
        index = index_json(self._shards)
        if index is not None:
            (self._directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _start_shard(self, shard_index: int) -> None:
        self._close_shard()
        shard = self._shards[shard_index]
        path = self._directory / shard.file_name
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._open_shard = shard_index
        header = encode_header([(t.name, t.dtype, t.shape) for t in shard.tensors], self._metadata)
        self.write_header(header)

    def write_header(self, header: bytes) -> None:
        view = memoryview(header)
        while view:
            view = view[os.write(self._fd, view) :]  # type: ignore[arg-type]

    def _close_shard(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
