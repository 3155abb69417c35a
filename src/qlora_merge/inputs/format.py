"""The safetensors file format: dtype table, header parsing with validation, header serialisation."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointFormatError
from .opened import open_input

# safetensors dtype name -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "U16": (torch.uint16, 2),
    "U32": (torch.uint32, 4),
    "U64": (torch.uint64, 8),
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
TORCH_TO_NAME = {torch_dtype: name for name, (torch_dtype, _) in DTYPES.items()}

# A header larger than this is an attack or a corrupt file, not a model (the Rust reader uses the same bound).
MAX_HEADER_BYTES = 100_000_000
HEADER_ALIGNMENT = 8


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file and the absolute byte range of its data there."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]


@dataclass(frozen=True)
class SafetensorsFile:
    path: Path
    tensors: tuple[TensorEntry, ...]  # in data-offset order
    metadata: dict[str, str]


def read_safetensors_header(path: Path) -> SafetensorsFile:
    """Parse and validate the header of one .safetensors file without reading its data. The file is opened once,
    here: its entries carry the descriptor (see opened.py), so its tensors are read from the file this header
    describes even if the path is replaced later."""
    try:
        carrier = open_input(path)
        opened = carrier.opened
        assert opened is not None
        header_len = header_length(path, _pread_exactly(opened.fd, 8, 0), opened.size)
        raw = _pread_exactly(opened.fd, header_len, 8)
    except OSError as exc:
        raise CheckpointFormatError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    return parse_safetensors_header(carrier, raw, opened.size)


def _pread_exactly(fd: int, count: int, offset: int) -> bytes:
    """`count` bytes from `offset`, or fewer only at the end of the file."""
    pieces = []
    while count > 0:
        piece = os.pread(fd, count, offset)
        if not piece:
            break
        pieces.append(piece)
        count -= len(piece)
        offset += len(piece)
    return b"".join(pieces)


def header_length(path: Path, prefix: bytes, size: int) -> int:
    """The header length that the first 8 bytes (`prefix`) of a safetensors file of `size` bytes give, checked to
    fit the file (and MAX_HEADER_BYTES) before that many bytes are read."""
    if len(prefix) < 8:
        raise CheckpointFormatError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    (header_len,) = struct.unpack_from("<Q", prefix)
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise CheckpointFormatError(f"{path}: safetensors header length {header_len} exceeds the file size {size}")
    return header_len


def parse_safetensors_header(path: Path, raw: bytes, size: int) -> SafetensorsFile:
    """A safetensors header (`raw`, the JSON after the 8-byte length) of a file of `size` bytes, validated: every
    entry well formed, tensors back to back from the start of the data to the end of the file."""
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # also bad UTF-8, nesting too deep, a 5000-digit number
        raise CheckpointFormatError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{path}: safetensors header is not a JSON object")
    data_start = 8 + len(raw)
    data_size = size - data_start
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointFormatError(f"{path}: __metadata__ is not an object of strings")
    entries = [_parse_entry(path, name, info, data_start, data_size) for name, info in header.items()]
    entries.sort(key=lambda e: (e.start, e.end))
    # As the safetensors library requires: tensors back to back from the start of the data to the end of the file.
    # A gap or trailing bytes mean a corrupt or tampered file, which no loader would read.
    cursor = data_start
    for entry in entries:
        if entry.start < cursor:
            raise CheckpointFormatError(f"{path}: tensor '{entry.name}' overlaps the tensor before it")
        if entry.start > cursor:
            raise CheckpointFormatError(f"{path}: {entry.start - cursor} unused bytes before tensor '{entry.name}'")
        cursor = entry.end
    if cursor != size:
        raise CheckpointFormatError(f"{path}: {size - cursor} bytes after the last tensor (corrupt or appended to)")
    return SafetensorsFile(path=path, tensors=tuple(entries), metadata=metadata)


def _parse_entry(path: Path, name: str, info: object, data_start: int, data_size: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise CheckpointFormatError(f"{path}: header entry for '{name}' is not an object")
    dtype = info.get("dtype")
    if dtype not in DTYPES:
        raise CheckpointFormatError(f"{path}: tensor '{name}' has unknown dtype {dtype!r}")
    shape = info.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointFormatError(f"{path}: tensor '{name}' has an invalid shape {shape!r}")
    offsets = info.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_size
    ):
        raise CheckpointFormatError(f"{path}: tensor '{name}' has data offsets {offsets!r} outside the file")
    expected = tensor_nbytes(dtype, tuple(shape))
    if offsets[1] - offsets[0] != expected:
        raise CheckpointFormatError(
            f"{path}: tensor '{name}' spans {offsets[1] - offsets[0]} bytes but {dtype}{shape} needs {expected}"
        )
    return TensorEntry(
        name=name,
        dtype=dtype,
        shape=tuple(shape),
        file=path,
        start=data_start + offsets[0],
        end=data_start + offsets[1],
    )


def encode_header(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """Serialise a header for tensors laid out back to back in the given order; padded to 8 bytes."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in tensors:
        nbytes = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(raw)) + raw


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPES[dtype][1]
