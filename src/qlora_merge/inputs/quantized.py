"""Quantized bases: which reader a base's `quantization_config` calls for, and a clear refusal for the ones we do
not read.

Each quantization format we read is one module here (bnb.py: bitsandbytes 4-bit and 8-bit; fp8.py: block-scaled
FP8; compressed.py: compressed-tensors FP8) with three things: `matches(config)`, `logical_index(index, config)` (the
checkpoint as the plan sees it: one entry per weight in the dtype and shape it dequantizes to, the scales gone) and
`summary(config)` (a few words for progress and the model card). `sources.source_for` picks the Source from the
logical index's `quantization`.
"""

from __future__ import annotations

from typing import Any

from ..errors import CheckpointFormatError
from . import bnb
from .index import CheckpointIndex

# quant_method values of formats we do not read, by the name users know them by
UNREAD = {
    "gptq": "GPTQ",
    "awq": "AWQ",
    "aqlm": "AQLM",
    "quanto": "Quanto",
    "eetq": "EETQ",
    "hqq": "HQQ",
    "exl2": "EXL2",
    "torchao": "torchao",
    "bitnet": "BitNet",
    "vptq": "VPTQ",
    "spqr": "SpQR",
    "higgs": "HIGGS",
    "mxfp4": "MXFP4",
    "fbgemm_fp8": "FBGEMM FP8",
    "quark": "Quark",
    "auto-round": "AutoRound",
}


def quant_method(config: dict[str, Any]) -> str | None:
    """The base's `quantization_config.quant_method`, lower case; None for a full-precision base."""
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict):
        return None
    method = quantization.get("quant_method")
    return str(method).lower() if method is not None else "unknown"


def is_quantized(config: dict[str, Any]) -> bool:
    return quant_method(config) is not None


def summary(config: dict[str, Any]) -> str:
    """How the base is quantized, in a few words ("" for a full-precision base)."""
    if bnb.is_bnb(config):
        return bnb.quantization_summary(config)
    from . import fp8

    if fp8.matches(config):
        return fp8.summary(config)
    from . import compressed

    if compressed.matches(config):
        return compressed.summary(config)
    return ""


def logical_index(index: CheckpointIndex, config: dict[str, Any]) -> CheckpointIndex:
    """`index` as the plan sees it: a quantized base's weights as the values they dequantize to; a full-precision
    base as it is. A quantization we do not read is refused by name, before anything is planned."""
    method = quant_method(config)
    if method is None:
        return index
    if bnb.is_bnb(config):
        return bnb.logical_index(index, config)
    from . import fp8

    if fp8.matches(config):
        return fp8.logical_index(index, config)
    from . import compressed

    if compressed.matches(config):
        return compressed.logical_index(index, config)
    name = UNREAD.get(method, f"quantized ({method!r})")
    raise CheckpointFormatError(
        f"{index.root / 'config.json'}: the base is {name}, which qlora-merge does not read (it reads full precision, "
        "bitsandbytes 4-bit/8-bit, FP8 with block scales and compressed-tensors FP8); give --base the full-precision "
        "model it was quantized from"
    )
