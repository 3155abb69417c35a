"""Write a safetensors file one tensor at a time, so that at most one tensor is ever in memory.

The header (names, dtypes, shapes, offsets) is fully known from the shapes alone, so it is written
first; each tensor is then produced by a callback, written, and dropped. Independent of qlora_merge's own
writer on purpose: the benchmark's inputs must not share its bugs.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

DTYPE_CODES: dict[torch.dtype, str] = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
HEADER_ALIGNMENT = 8

TensorEntry = tuple[str, tuple[int, ...]]
TensorFactory = Callable[[str, tuple[int, ...]], torch.Tensor]


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count * dtype.itemsize


def build_header(entries: Sequence[TensorEntry], dtype: torch.dtype, metadata: dict[str, str]) -> bytes:
    """Serialized, space-padded JSON header for ``entries`` laid out back to back in order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, shape in entries:
        end = offset + _nbytes(shape, dtype)
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    padding = -(len(raw) + 8) % HEADER_ALIGNMENT
    return raw + b" " * padding


def _check_tensor(name: str, tensor: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if tuple(tensor.shape) != shape or tensor.dtype != dtype:
        got = f"{tuple(tensor.shape)} {tensor.dtype}"
        raise ValueError(f"{name}: factory gave {got}, expected {shape} {dtype}")


def write_streaming(
    path: Path,
    entries: Sequence[TensorEntry],
    dtype: torch.dtype,
    factory: TensorFactory,
    metadata: dict[str, str] | None = None,
) -> int:
    """Write ``entries`` to ``path``, asking ``factory`` for each tensor in turn; return the file size."""
    header = build_header(entries, dtype, metadata or {"format": "pt"})
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(header)))
        handle.write(header)
        for name, shape in entries:
            tensor = factory(name, shape).contiguous()
            _check_tensor(name, tensor, shape, dtype)
            handle.write(tensor.view(torch.uint8).numpy())
            del tensor
    return path.stat().st_size
