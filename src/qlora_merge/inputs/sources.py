"""Sources: how the merge reads the values of a base tensor, whatever the file format stores.

The merge never opens a weight file itself. For each planned input tensor (a `TensorEntry`: name, logical dtype
and shape, where it lives) it asks the base's source which byte ranges hold a run of its elements, has a
read-ahead thread fetch them in order, and asks the source to decode them. A safetensors tensor decodes for free
(its bytes are its values) and can be handed to the sink as raw bytes, without decoding at all; a quantized
format (4-bit blocks and their scales) would read packed bytes and return the dequantized rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from .format import DTYPES, TensorEntry
from .reader import ByteRange, TensorReader


class Source(Protocol):
    """The values of a checkpoint's tensors, a run of elements at a time.

    Elements are counted in the tensor's row-major order, as if it were flat; the merge asks for whole rows of a
    weight, or chunks of a tensor it converts.
    """

    def raw(self, entry: TensorEntry) -> ByteRange | None:
        """The tensor's bytes, when they are its values in `entry.dtype`, row-major: a sink may copy them as they
        are. None when the values must be decoded."""
        ...

    def reads(self, entry: TensorEntry, start: int, stop: int) -> Sequence[ByteRange]:
        """The byte ranges that hold elements [start, stop), in the order `decode` takes them."""
        ...

    def decode(self, entry: TensorEntry, start: int, stop: int, data: Sequence[torch.Tensor]) -> torch.Tensor:
        """Elements [start, stop) as a 1-D tensor of `entry.torch_dtype`, from the bytes of `reads` (uint8
        tensors, valid until the next read). The result may share their memory."""
        ...

    def read(self, entry: TensorEntry, reader: TensorReader) -> torch.Tensor:
        """The whole tensor, shaped, in freshly allocated memory."""
        ...

    def read_elements(
        self, entry: TensorEntry, start: int, stop: int, reader: TensorReader, buffer: torch.Tensor
    ) -> torch.Tensor:
        """Elements [start, stop) read now (not through the read-ahead), 1-D; `buffer` is a reusable uint8 tensor
        of (stop - start) * the dtype's size bytes that the result may live in."""
        ...


class SafetensorsSource:
    """safetensors files (and the safetensors copies of a pickled base): every tensor is its values, row-major,
    little-endian, at a known offset. Decoding is a view; copying is the fast path."""

    def raw(self, entry: TensorEntry) -> ByteRange | None:
        return ByteRange(entry.file, entry.start, entry.nbytes, fetch=False)

    def reads(self, entry: TensorEntry, start: int, stop: int) -> Sequence[ByteRange]:
        size = DTYPES[entry.dtype][1]
        return (ByteRange(entry.file, entry.start + start * size, (stop - start) * size),)

    def decode(self, entry: TensorEntry, start: int, stop: int, data: Sequence[torch.Tensor]) -> torch.Tensor:
        (raw,) = data
        return raw.view(entry.torch_dtype)

    def read(self, entry: TensorEntry, reader: TensorReader) -> torch.Tensor:
        return reader.read(entry)

    def read_elements(
        self, entry: TensorEntry, start: int, stop: int, reader: TensorReader, buffer: torch.Tensor
    ) -> torch.Tensor:
        reader.read_bytes_into(entry.file, entry.start + start * DTYPES[entry.dtype][1], buffer)
        return buffer.view(entry.torch_dtype)


def read_now(source: Source, entry: TensorEntry, start: int, stop: int, reader: TensorReader) -> torch.Tensor:
    """Elements [start, stop) of `entry` read at once (not through the read-ahead): the source's ranges, then its
    decoding, in fresh buffers."""
    data = []
    for byte_range in source.reads(entry, start, stop):
        raw = torch.empty(byte_range.nbytes, dtype=torch.uint8)
        reader.read_bytes_into(byte_range.path, byte_range.offset, raw)
        data.append(raw)
    return source.decode(entry, start, stop, data)


def into_buffer(values: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """`values` copied into the front of the uint8 `buffer` (read_elements' contract), as their own dtype."""
    out = buffer[: values.numel() * values.element_size()].view(values.dtype)
    return out.copy_(values)


def source_for(index: object) -> Source:
    """The source that reads a checkpoint's tensors, from its logical index's `quantization` (inputs/quantized.py):
    bitsandbytes weights are dequantized by BnbSource, FP8 by Fp8Source; every other base is safetensors, or a
    pickled base converted to safetensors files first (inputs/pickled.py)."""
    quantization = getattr(index, "quantization", None)
    if quantization == "bitsandbytes":
        from .bnb import BnbSource

        return BnbSource()
    if quantization == "fp8":
        from .fp8 import Fp8Source

        return Fp8Source()
    return SafetensorsSource()
