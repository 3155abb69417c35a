"""FP8 bases with block scales (config.json `quantization_config.quant_method == "fp8"`).

The official FP8 releases (DeepSeek-V3 and its descendants, Qwen3-*-FP8, ...) store each quantized Linear weight
`X.weight` as float8 (safetensors F8_E4M3) beside `X.weight_scale_inv`: float32, one value per block of
`weight_block_size` = [bo, bi] elements, shape [ceil(out / bo), ceil(in / bi)] (blocks at the right and bottom
edges may be partial). Without `weight_block_size` the scale is one value for the whole tensor. A weight with more
than two dimensions (fused experts) has one such grid per leading index. With `activation_scheme: "static"` a
module also has `X.activation_scale`, which only matters to FP8 matmuls.

The value of element (r, c) is `float32(weight[r, c]) * scale_inv[r // bo, c // bi]`, in float32, rounded once to
the output dtype: DeepSeek's `weight_dequant` kernel and vLLM index the scale so. (transformers' loader with
`FineGrainedFP8Config(dequantize=True)` multiplies and rounds the same way but derives the block size from the
grid, `rows // scale_rows`, which is only right when the blocks tile the weight exactly.)

Here such a checkpoint's index becomes a logical one: one entry per FP8 weight, in the dtype it dequantizes to (the
config's `dtype`/`torch_dtype` when bf16, f16 or f32, else bf16), the scales gone. `Fp8Source` reads the FP8 bytes
of a run of elements and the scale rows covering them, and dequantizes them in torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointFormatError
from .format import DTYPES, TensorEntry
from .index import CheckpointIndex
from .reader import ByteRange, TensorReader
from .sources import SafetensorsSource, into_buffer, read_now

FP8 = "fp8"
# safetensors dtypes of FP8 codes (e4m3 is what releases use; e5m2 decodes the same way)
CODE_DTYPES = frozenset({"F8_E4M3", "F8_E5M2"})
SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv, as transformers names it
ACTIVATION_SCALE = ".activation_scale"
# config dtype names -> the safetensors name a dequantized weight takes
OUTPUT_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
DEFAULT_OUTPUT_DTYPE = "BF16"


@dataclass(frozen=True)
class Fp8Entry(TensorEntry):
    """An FP8 weight as the plan sees it (dtype: the dequantized one; shape as stored); file/start/end are the FP8
    codes' (one byte an element, row-major)."""

    code_dtype: str  # F8_E4M3 or F8_E5M2
    # [*leading, ceil(rows / bo), ceil(cols / bi)], or one value with `block` None; F32 (compressed-tensors: also
    # BF16 or F16, which its arithmetic rounds to, see decode)
    scale: TensorEntry
    block: tuple[int, int] | None  # (bo, bi); None: one scale for the whole tensor

    def scale_row(self, row: int) -> int:
        """The scale grid row (counted over all leading indices) of the weight's flat row `row`."""
        assert self.block is not None
        rows = self.shape[-2]
        grid_rows = self.scale.shape[-2]
        return (row // rows) * grid_rows + (row % rows) // self.block[0]


def matches(config: dict[str, Any]) -> bool:
    quantization = config.get("quantization_config")
    return isinstance(quantization, dict) and str(quantization.get("quant_method", "")).lower() == FP8


def summary(config: dict[str, Any]) -> str:
    """How an FP8 base is quantized, in a few words (for progress and the model card); "" for any other base."""
    if not matches(config):
        return ""
    quantization = config["quantization_config"]
    fmt = quantization.get("fmt") or "e4m3"
    block = quantization.get("weight_block_size")
    if _is_block(block):
        return f"FP8 {fmt}, {block[0]}x{block[1]} block scales"
    return f"FP8 {fmt}, per-tensor scales"


def _is_block(value: object) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    )


def output_dtype(config: dict[str, Any]) -> str:
    """The safetensors dtype FP8 weights dequantize to: the config's, when it is a float the merge writes."""
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if isinstance(value, str) and value.removeprefix("torch.") in OUTPUT_DTYPES:
            return OUTPUT_DTYPES[value.removeprefix("torch.")]
    return DEFAULT_OUTPUT_DTYPE


def logical_index(index: CheckpointIndex, config: dict[str, Any]) -> CheckpointIndex:
    """`index` as the plan sees it: for an FP8 checkpoint, every FP8 weight one entry in the dtype it dequantizes
    to, its scales left out; any other checkpoint as it is. Headers only: every malformed weight or scale is an
    error here, before anything is written."""
    if not matches(config):
        return index
    block = _block_size(index, config["quantization_config"])
    dtype = output_dtype(config)
    return fp8_index(
        index,
        lambda entry: _fp8_entry(entry, index.tensors, block, dtype),
        ACTIVATION_SCALE,
        (SCALE_SUFFIX, ACTIVATION_SCALE),
        _stray,
    )


def fp8_index(
    index: CheckpointIndex,
    make_entry: Callable[[TensorEntry], Fp8Entry],
    activation_suffix: str,
    auxiliary: tuple[str, ...],
    stray: Callable[[TensorEntry, dict[str, TensorEntry]], None],
) -> CheckpointIndex:
    """The logical index of an FP8 checkpoint (here and compressed-tensors'): each FP8 weight the entry
    `make_entry` gives, its scale and activation scale (`<module><activation_suffix>`) left out; a tensor named
    like one of `auxiliary` that no weight took is refused by `stray`."""
    tensors = index.tensors
    logical: dict[str, TensorEntry] = {}
    used: set[str] = set()
    for name, entry in tensors.items():
        if entry.dtype in CODE_DTYPES:
            fp8_entry = make_entry(entry)
            logical[name] = fp8_entry
            used.update((fp8_entry.scale.name, f"{name.removesuffix('.weight')}{activation_suffix}"))
        else:
            logical[name] = entry
    for name in used:
        logical.pop(name, None)
    for name, entry in logical.items():
        if name.endswith(auxiliary) and not isinstance(entry, Fp8Entry):
            stray(entry, tensors)
    return CheckpointIndex(root=index.root, files=index.files, tensors=logical, quantization=FP8)


def _block_size(index: CheckpointIndex, quantization: dict[str, Any]) -> tuple[int, int] | None:
    value = quantization.get("weight_block_size")
    if value is None:
        return None
    if not _is_block(value):
        raise CheckpointFormatError(
            f"{index.root / 'config.json'}: quantization_config.weight_block_size is {value!r}; expected two "
            "positive integers, as [128, 128]"
        )
    return (value[0], value[1])


def _fp8_entry(
    weight: TensorEntry, tensors: dict[str, TensorEntry], block: tuple[int, int] | None, dtype: str
) -> Fp8Entry:
    scale_name = weight.name + SCALE_SUFFIX
    scale = tensors.get(scale_name)
    if scale is None:
        raise CheckpointFormatError(
            f"{weight.file}: FP8 weight '{weight.name}' has no '{scale_name}' (an incomplete FP8 checkpoint)"
        )
    if scale.dtype != "F32":
        raise CheckpointFormatError(f"{scale.file}: '{scale_name}' is {scale.dtype}; FP8 scales are read as F32 only")
    if block is None:
        if math.prod(scale.shape) != 1:
            raise CheckpointFormatError(
                f"{scale.file}: '{scale_name}' is F32{list(scale.shape)}; without weight_block_size the FP8 weight "
                f"'{weight.name}' needs one per-tensor scale"
            )
    else:
        if len(weight.shape) < 2:
            raise CheckpointFormatError(
                f"{weight.file}: FP8 weight '{weight.name}' is {list(weight.shape)}; block scales need 2 dimensions"
            )
        *leading, rows, cols = weight.shape
        grid = (*leading, -(-rows // block[0]), -(-cols // block[1]))
        if scale.shape != grid:
            raise CheckpointFormatError(
                f"{scale.file}: '{scale_name}' is F32{list(scale.shape)}; the FP8 weight '{weight.name}' "
                f"{list(weight.shape)} in {block[0]}x{block[1]} blocks needs F32{list(grid)}"
            )
    return Fp8Entry(
        name=weight.name,
        dtype=dtype,
        shape=weight.shape,
        file=weight.file,
        start=weight.start,
        end=weight.end,
        code_dtype=weight.dtype,
        scale=scale,
        block=block,
    )


def _stray(entry: TensorEntry, tensors: dict[str, TensorEntry]) -> None:
    """Refuse a scale left over after every FP8 weight took its own: it belongs to no FP8 weight."""
    if entry.name.endswith(SCALE_SUFFIX):
        owner = entry.name.removesuffix(SCALE_SUFFIX)
    else:
        owner = entry.name.removesuffix(ACTIVATION_SCALE) + ".weight"
    found = tensors.get(owner)
    why = f"'{owner}' is {found.dtype}, not FP8" if found is not None else f"there is no '{owner}'"
    raise CheckpointFormatError(f"{entry.file}: '{entry.name}' is an FP8 scale of no FP8 weight ({why})")


class Fp8Source:
    """An FP8 checkpoint's tensors: FP8 weights dequantized a run of elements at a time, every other tensor read
    as safetensors."""

    def __init__(self) -> None:
        self._plain = SafetensorsSource()

    def raw(self, entry: TensorEntry) -> ByteRange | None:
        if isinstance(entry, Fp8Entry):
            return None
        return self._plain.raw(entry)

    def reads(self, entry: TensorEntry, start: int, stop: int) -> Sequence[ByteRange]:
        if not isinstance(entry, Fp8Entry):
            return self._plain.reads(entry, start, stop)
        codes = ByteRange(entry.file, entry.start + start, stop - start)
        scale = entry.scale
        size = DTYPES[scale.dtype][1]
        if entry.block is None:
            return (codes, ByteRange(scale.file, scale.start, size))
        first, last = _scale_rows(entry, start, stop)
        row_bytes = scale.shape[-1] * size
        return (codes, ByteRange(scale.file, scale.start + first * row_bytes, (last - first) * row_bytes))

    def decode(self, entry: TensorEntry, start: int, stop: int, data: Sequence[torch.Tensor]) -> torch.Tensor:
        if not isinstance(entry, Fp8Entry):
            return self._plain.decode(entry, start, stop, data)
        codes, scale_bytes = data
        values = codes.view(DTYPES[entry.code_dtype][0]).to(torch.float32)
        scales = scale_bytes.view(entry.scale.torch_dtype).to(torch.float32)
        if entry.block is not None:
            scales = _element_scales(entry, start, stop, scales)
        # as transformers' Fp8Dequantize: the float32 product, rounded once to the output dtype
        product = values * scales
        if entry.scale.dtype != "F32":
            # compressed-tensors multiplies in the scale's dtype (codes.to(scale.dtype) * scale) and casts after; an
            # FP8 code times a 16-bit float is exact in float32, so this rounds as that product does
            product = product.to(entry.scale.torch_dtype)
        return product.to(entry.torch_dtype)

    def read(self, entry: TensorEntry, reader: TensorReader) -> torch.Tensor:
        if not isinstance(entry, Fp8Entry):
            return self._plain.read(entry, reader)
        return self._read_now(entry, 0, math.prod(entry.shape), reader).reshape(entry.shape)

    def read_elements(
        self, entry: TensorEntry, start: int, stop: int, reader: TensorReader, buffer: torch.Tensor
    ) -> torch.Tensor:
        if not isinstance(entry, Fp8Entry):
            return self._plain.read_elements(entry, start, stop, reader, buffer)
        return into_buffer(self._read_now(entry, start, stop, reader), buffer)

    def _read_now(self, entry: Fp8Entry, start: int, stop: int, reader: TensorReader) -> torch.Tensor:
        return read_now(self, entry, start, stop, reader)


def _scale_rows(entry: Fp8Entry, start: int, stop: int) -> tuple[int, int]:
    """The scale grid rows [first, last) that elements [start, stop) of a block-scaled weight use (flat rows map to
    grid rows in order, so they are one contiguous run)."""
    cols = entry.shape[-1]
    return entry.scale_row(start // cols), entry.scale_row((stop - 1) // cols) + 1


def _element_scales(entry: Fp8Entry, start: int, stop: int, scales: torch.Tensor) -> torch.Tensor:
    """The float32 scale of each element in [start, stop), from the grid rows `_scale_rows` names."""
    assert entry.block is not None
    rows, cols = entry.shape[-2], entry.shape[-1]
    grid_rows, grid_cols = entry.scale.shape[-2], entry.scale.shape[-1]
    first_row, last_row = start // cols, (stop - 1) // cols
    flat_rows = torch.arange(first_row, last_row + 1)
    # a flat row's grid row, counted from the first one read (as Fp8Entry.scale_row, for every row at once)
    grid_row = (flat_rows // rows) * grid_rows + (flat_rows % rows) // entry.block[0] - entry.scale_row(first_row)
    per_row = scales.view(-1, grid_cols)[grid_row]
    per_element = per_row.repeat_interleave(entry.block[1], dim=1)[:, :cols].reshape(-1)
    lead = start - first_row * cols
    return per_element[lead : lead + stop - start]
