"""bitsandbytes-quantized bases (config.json `quantization_config.quant_method == "bitsandbytes"`).

transformers saves a 4-bit Linear weight `X.weight` as its packed codes (two 4-bit codes a byte, the first element in
the high nibble) beside `X.weight.absmax` (one scale per `blocksize` elements), `X.weight.quant_map` (the 16 code
values), with double quantization `X.weight.nested_absmax` and `X.weight.nested_quant_map` (the absmax itself
8-bit block-quantized, plus an offset), and `X.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): a U8 tensor
holding JSON with the shape, dtype, blocksize, quant_type and nested parameters. An 8-bit (LLM.int8) weight is int8
`X.weight` with `X.SCB` (per row absmax) and `X.weight_format`; its value is CB * SCB / 127, row-wise.

Here such a checkpoint's index becomes a logical one: one entry per quantized weight, named `X.weight`, in the dtype
and shape the weight dequantizes to, the auxiliary tensors gone. `BnbSource` reads the packed bytes and scales of a
run of elements and dequantizes them in torch, value for value as bitsandbytes' `dequantize_4bit` and
`int8_vectorwise_dequant` do (float32 code times float32 absmax, rounded once to the dtype).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import CheckpointFormatError
from ..fourbit import CODES, QUANT_TYPES
from .format import DTYPES, FLOAT_DTYPES, TensorEntry
from .index import CheckpointIndex
from .reader import ByteRange, TensorReader
from .sources import SafetensorsSource, into_buffer, read_now

BITSANDBYTES = "bitsandbytes"
QUANT_STATE = ".quant_state.bitsandbytes__"
# torch dtype names in a quant state -> safetensors names
STATE_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
# 1 / 127 as bitsandbytes writes it (int8_vectorwise_dequant)
INT8_SCALE = 7.874015718698502e-3


@dataclass(frozen=True)
class Nested:
    """Double quantization: the absmax is U8 codes of `code` times `absmax` per `blocksize` of them, plus offset."""

    absmax: TensorEntry  # F32, one per `blocksize` absmax codes
    code: tuple[float, ...]  # 256 values
    blocksize: int
    offset: float


@dataclass(frozen=True)
class Bnb4bitEntry(TensorEntry):
    """A 4-bit weight as the plan sees it (dtype and shape dequantized); file/start/end are the packed codes'."""

    quant_type: str
    blocksize: int
    absmax: TensorEntry  # F32, or U8 with `nested`
    nested: Nested | None


@dataclass(frozen=True)
class Int8Entry(TensorEntry):
    """An LLM.int8 weight as the plan sees it; file/start/end are the int8 codes' (row-major, the logical shape)."""

    scb: TensorEntry  # F32, one per row


def is_bnb(config: dict[str, Any]) -> bool:
    quantization = config.get("quantization_config")
    return isinstance(quantization, dict) and quantization.get("quant_method") == BITSANDBYTES


def quantization_summary(config: dict[str, Any]) -> str:
    """How a bitsandbytes base is quantized, in a few words (for progress and the model card); "" for any other
    base."""
    if not is_bnb(config):
        return ""
    quantization = config["quantization_config"]
    if quantization.get("load_in_8bit") and not quantization.get("load_in_4bit"):
        return "bitsandbytes 8-bit (LLM.int8)"
    quant_type = quantization.get("bnb_4bit_quant_type", "fp4")
    double = ", double quantization" if quantization.get("bnb_4bit_use_double_quant") else ""
    return f"bitsandbytes 4-bit {quant_type}{double}"


def logical_index(index: CheckpointIndex, config: dict[str, Any]) -> CheckpointIndex:
    """`index` as the plan sees it: for a bitsandbytes checkpoint, every quantized weight one entry in the dtype
    and shape it dequantizes to, its auxiliary tensors left out; any other checkpoint as it is. Reads the quant
    states (small tensors) now: every malformed one is an error here, before anything is written."""
    if not is_bnb(config):
        return index
    tensors = index.tensors
    plain_dtypes = Counter(e.dtype for e in tensors.values() if e.dtype in FLOAT_DTYPES)
    int8_dtype = _config_dtype(config) or (plain_dtypes.most_common(1)[0][0] if plain_dtypes else "F16")
    logical: dict[str, TensorEntry] = {}
    auxiliary: set[str] = set()
    with TensorReader() as reader:
        for name, entry in tensors.items():
            states = [k for k in (f"{name}{QUANT_STATE}{q}" for q in QUANT_TYPES) if k in tensors]
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and states:
                logical[name], used = _four_bit(entry, tensors, states, reader)
                auxiliary.update(used)
            elif name.endswith(".weight") and f"{module}.SCB" in tensors and entry.dtype == "I8":
                logical[name], used = _int8(entry, tensors, module, int8_dtype, reader)
                auxiliary.update(used)
            else:
                logical[name] = entry
    for name in auxiliary:
        logical.pop(name, None)
    stray = [name for name in logical if _looks_auxiliary(name)]
    if stray:
        raise CheckpointFormatError(
            f"{tensors[stray[0]].file}: '{stray[0]}' is bitsandbytes quantization data of no quantized weight "
            "(its quant_state tensor is missing?)"
        )
    return CheckpointIndex(root=index.root, files=index.files, tensors=logical, quantization=BITSANDBYTES)


def _looks_auxiliary(name: str) -> bool:
    return (
        QUANT_STATE in name
        or name.endswith((".weight.absmax", ".weight.quant_map", ".weight.nested_absmax", ".weight.nested_quant_map"))
        or name.endswith((".SCB", ".weight_format"))
    )


def _config_dtype(config: dict[str, Any]) -> str | None:
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if isinstance(value, str) and value.removeprefix("torch.") in STATE_DTYPES:
            return STATE_DTYPES[value.removeprefix("torch.")]
    return None


def _need(tensors: dict[str, TensorEntry], name: str, weight: TensorEntry) -> TensorEntry:
    entry = tensors.get(name)
    if entry is None:
        raise CheckpointFormatError(
            f"{weight.file}: bitsandbytes weight '{weight.name}' has no '{name}' (an incomplete quantized checkpoint)"
        )
    return entry


def _floats(entry: TensorEntry, count: int, reader: TensorReader) -> tuple[float, ...]:
    if entry.dtype != "F32" or math.prod(entry.shape) != count:
        raise CheckpointFormatError(
            f"{entry.file}: '{entry.name}' is {entry.dtype}{list(entry.shape)}; expected F32 with {count} values"
        )
    return tuple(reader.read(entry).reshape(-1).tolist())


def _four_bit(
    weight: TensorEntry, tensors: dict[str, TensorEntry], states: list[str], reader: TensorReader
) -> tuple[Bnb4bitEntry, list[str]]:
    name = weight.name
    if len(states) != 1:
        raise CheckpointFormatError(f"{weight.file}: '{name}' has both an nf4 and an fp4 quant state")
    state_entry = tensors[states[0]]
    where = f"{state_entry.file}: '{state_entry.name}'"
    try:
        state = json.loads(reader.read(state_entry).numpy().tobytes())
    except (ValueError, RecursionError) as exc:
        raise CheckpointFormatError(f"{where} is not a bitsandbytes quant state ({exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{where} is not a bitsandbytes quant state (not a JSON object)")
    quant_type, blocksize, dtype, shape = (state.get(k) for k in ("quant_type", "blocksize", "dtype", "shape"))
    if quant_type not in QUANT_TYPES or quant_type != states[0].rpartition("__")[2]:
        raise CheckpointFormatError(f"{where}: unknown quant_type {quant_type!r} (expected nf4 or fp4)")
    if not isinstance(blocksize, int) or blocksize <= 0:
        raise CheckpointFormatError(f"{where}: invalid blocksize {blocksize!r}")
    if not isinstance(dtype, str) or dtype.removeprefix("torch.") not in STATE_DTYPES:
        raise CheckpointFormatError(f"{where}: dtype {dtype!r} is not bfloat16, float16 or float32")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape) or not shape:
        raise CheckpointFormatError(f"{where}: invalid shape {shape!r}")
    numel = math.prod(shape)
    if weight.nbytes < (numel + 1) // 2:
        raise CheckpointFormatError(
            f"{weight.file}: '{name}' holds {weight.nbytes} bytes; a 4-bit {shape} weight needs {(numel + 1) // 2}"
        )
    blocks = -(-numel // blocksize)
    used = [state_entry.name]
    quant_map = _need(tensors, f"{name}.quant_map", weight)
    used.append(quant_map.name)
    if any(abs(a - b) > 1e-6 for a, b in zip(_floats(quant_map, 16, reader), CODES[quant_type], strict=True)):
        raise CheckpointFormatError(f"{quant_map.file}: '{quant_map.name}' is not bitsandbytes' {quant_type} code")
    absmax = _need(tensors, f"{name}.absmax", weight)
    used.append(absmax.name)
    nested = None
    if "nested_blocksize" in state or f"{name}.nested_absmax" in tensors:
        nested_blocksize, offset = state.get("nested_blocksize"), state.get("nested_offset")
        if not isinstance(nested_blocksize, int) or nested_blocksize <= 0 or not isinstance(offset, int | float):
            raise CheckpointFormatError(f"{where}: invalid nested_blocksize or nested_offset")
        if state.get("nested_dtype", "float32") != "float32":
            raise CheckpointFormatError(f"{where}: nested_dtype {state.get('nested_dtype')!r} is not float32")
        nested_absmax = _need(tensors, f"{name}.nested_absmax", weight)
        nested_map = _need(tensors, f"{name}.nested_quant_map", weight)
        used += [nested_absmax.name, nested_map.name]
        nested_blocks = -(-blocks // nested_blocksize)
        if nested_absmax.dtype != "F32" or math.prod(nested_absmax.shape) != nested_blocks:
            raise CheckpointFormatError(
                f"{nested_absmax.file}: '{nested_absmax.name}' is {nested_absmax.dtype}{list(nested_absmax.shape)}; "
                f"expected F32 with {nested_blocks} values"
            )
        nested = Nested(nested_absmax, _floats(nested_map, 256, reader), nested_blocksize, float(offset))
    expected = "U8" if nested is not None else "F32"
    if absmax.dtype != expected or math.prod(absmax.shape) != blocks:
        raise CheckpointFormatError(
            f"{absmax.file}: '{absmax.name}' is {absmax.dtype}{list(absmax.shape)}; a {shape} weight in blocks of "
            f"{blocksize} needs {expected} with {blocks} values"
        )
    entry = Bnb4bitEntry(
        name=name,
        dtype=STATE_DTYPES[dtype.removeprefix("torch.")],
        shape=tuple(shape),
        file=weight.file,
        start=weight.start,
        end=weight.start + (numel + 1) // 2,
        quant_type=quant_type,
        blocksize=blocksize,
        absmax=absmax,
        nested=nested,
    )
    return entry, used


def _int8(
    weight: TensorEntry, tensors: dict[str, TensorEntry], module: str, dtype: str, reader: TensorReader
) -> tuple[Int8Entry, list[str]]:
    scb = tensors[f"{module}.SCB"]
    used = [scb.name]
    if len(weight.shape) != 2 or scb.dtype != "F32" or scb.shape != weight.shape[:1]:
        raise CheckpointFormatError(
            f"{scb.file}: '{scb.name}' is {scb.dtype}{list(scb.shape)}; the 8-bit weight '{weight.name}' "
            f"{list(weight.shape)} needs F32 [{weight.shape[0] if weight.shape else '?'}]"
        )
    layout = tensors.get(f"{module}.weight_format")
    if layout is not None:
        used.append(layout.name)
        value = reader.read(layout).reshape(-1).tolist()
        if value not in ([0], ["row"]):
            raise CheckpointFormatError(
                f"{layout.file}: '{layout.name}' is {value}; only the row-major int8 format (0) is read"
            )
    entry = Int8Entry(
        name=weight.name,
        dtype=dtype,
        shape=weight.shape,
        file=weight.file,
        start=weight.start,
        end=weight.end,
        scb=scb,
    )
    return entry, used


def _code_table(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


class BnbSource:
    """A bitsandbytes checkpoint's tensors: quantized weights dequantized a run of elements at a time, every other
    tensor read as safetensors."""

    def __init__(self) -> None:
        self._plain = SafetensorsSource()
        self._codes = {q: _code_table(values) for q, values in CODES.items()}
        self._nested_codes: dict[tuple[float, ...], torch.Tensor] = {}

    def raw(self, entry: TensorEntry) -> ByteRange | None:
        if isinstance(entry, Bnb4bitEntry | Int8Entry):
            return None
        return self._plain.raw(entry)

    def reads(self, entry: TensorEntry, start: int, stop: int) -> Sequence[ByteRange]:
        if isinstance(entry, Bnb4bitEntry):
            return self._reads_4bit(entry, start, stop)
        if isinstance(entry, Int8Entry):
            cols = entry.shape[1]
            first, last = start // cols, (stop - 1) // cols + 1
            return (
                ByteRange(entry.file, entry.start + start, stop - start),
                ByteRange(entry.scb.file, entry.scb.start + first * 4, (last - first) * 4),
            )
        return self._plain.reads(entry, start, stop)

    def _reads_4bit(self, entry: Bnb4bitEntry, start: int, stop: int) -> list[ByteRange]:
        first_byte, last_byte = start // 2, (stop + 1) // 2
        first_block, last_block = start // entry.blocksize, (stop - 1) // entry.blocksize + 1
        absmax = entry.absmax
        size = DTYPES[absmax.dtype][1]
        ranges = [
            ByteRange(entry.file, entry.start + first_byte, last_byte - first_byte),
            ByteRange(absmax.file, absmax.start + first_block * size, (last_block - first_block) * size),
        ]
        if entry.nested is not None:
            nested = entry.nested
            first, last = first_block // nested.blocksize, (last_block - 1) // nested.blocksize + 1
            ranges.append(ByteRange(nested.absmax.file, nested.absmax.start + first * 4, (last - first) * 4))
        return ranges

    def decode(self, entry: TensorEntry, start: int, stop: int, data: Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(entry, Bnb4bitEntry):
            return self._decode_4bit(entry, start, stop, data)
        if isinstance(entry, Int8Entry):
            codes, scb = data
            cols = entry.shape[1]
            lead = start - start // cols * cols
            scales = scb.view(torch.float32).repeat_interleave(cols)[lead : lead + stop - start]
            # as int8_vectorwise_dequant: A * stats.view(-1, 1) * 7.874015718698502e-3, in float32
            values = codes.view(torch.int8) * scales * INT8_SCALE
            return values.to(entry.torch_dtype)
        return self._plain.decode(entry, start, stop, data)

    def _decode_4bit(self, entry: Bnb4bitEntry, start: int, stop: int, data: Sequence[torch.Tensor]) -> torch.Tensor:
        packed, absmax_bytes = data[0], data[1]
        codes = torch.empty(packed.numel() * 2, dtype=torch.int64)
        codes[0::2] = packed >> 4
        codes[1::2] = packed & 0xF
        skip = start - 2 * (start // 2)
        values = self._codes[entry.quant_type][codes[skip : skip + stop - start]]
        first_block = start // entry.blocksize
        if entry.nested is None:
            absmax = absmax_bytes.view(torch.float32)
        else:
            nested = entry.nested
            code = self._nested_codes.get(nested.code)
            if code is None:
                code = self._nested_codes.setdefault(nested.code, _code_table(nested.code))
            lead = first_block - first_block // nested.blocksize * nested.blocksize
            count = absmax_bytes.numel()
            scales = data[2].view(torch.float32).repeat_interleave(nested.blocksize)[lead : lead + count]
            # as dequantize_blockwise then `absmax += offset`, both in float32
            absmax = code[absmax_bytes.to(torch.int64)] * scales
            absmax += torch.tensor(nested.offset, dtype=torch.float32)
        lead = start - first_block * entry.blocksize
        scales = absmax.repeat_interleave(entry.blocksize)[lead : lead + stop - start]
        return (values * scales).to(entry.torch_dtype)

    def read(self, entry: TensorEntry, reader: TensorReader) -> torch.Tensor:
        if not isinstance(entry, Bnb4bitEntry | Int8Entry):
            return self._plain.read(entry, reader)
        numel = math.prod(entry.shape)
        return self._read_now(entry, 0, numel, reader).reshape(entry.shape)

    def read_elements(
        self, entry: TensorEntry, start: int, stop: int, reader: TensorReader, buffer: torch.Tensor
    ) -> torch.Tensor:
        if not isinstance(entry, Bnb4bitEntry | Int8Entry):
            return self._plain.read_elements(entry, start, stop, reader, buffer)
        return into_buffer(self._read_now(entry, start, stop, reader), buffer)

    def _read_now(self, entry: TensorEntry, start: int, stop: int, reader: TensorReader) -> torch.Tensor:
        return read_now(self, entry, start, stop, reader)
