"""compressed-tensors FP8 bases (config.json `quantization_config.quant_method == "compressed-tensors"` with
`format: "float-quantized"`), as llm-compressor writes them (the *-FP8, *-FP8-dynamic and *-FP8-block releases).

Each quantized Linear weight `X.weight` is float8 (F8_E4M3) beside `X.weight_scale`, in the scale dtype the model
was calibrated in (BF16, F16 or F32): one value for the whole tensor (strategy "tensor", shape [1]), one per output
row ("channel", [out, 1]), one per `group_size` columns of a row ("group", [out, in / group_size]) or one per
`block_structure` = [bo, bi] block ("block", [ceil(out / bo), ceil(in / bi)], edge blocks partial). With static
activations a module also has `X.input_scale`, which only matters to FP8 matmuls. Symmetric FP8 has no zero point.

compressed-tensors dequantizes as `weight.to(scale.dtype) * scale` (its `_dequantize`), in the scale's dtype, and
transformers casts that to the model's dtype. Every strategy is a block grid (channel: blocks of 1 x in; group:
1 x group_size), so the weights become the same logical entries as the fp8 format's (fp8.Fp8Entry), read by
fp8.Fp8Source, which rounds the product to the scale's dtype first as compressed-tensors does.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import CheckpointFormatError
from .format import TensorEntry
from .fp8 import Fp8Entry, fp8_index, output_dtype
from .index import CheckpointIndex

COMPRESSED_TENSORS = "compressed-tensors"
FLOAT_QUANTIZED = "float-quantized"
SCALE_SUFFIX = "_scale"  # X.weight -> X.weight_scale
INPUT_SCALE = ".input_scale"
SCALE_DTYPES = frozenset({"F32", "BF16", "F16"})
STRATEGIES = ("tensor", "channel", "group", "block")


def matches(config: dict[str, Any]) -> bool:
    quantization = config.get("quantization_config")
    return isinstance(quantization, dict) and str(quantization.get("quant_method", "")).lower() == COMPRESSED_TENSORS


def summary(config: dict[str, Any]) -> str:
    """How a compressed-tensors base is quantized, in a few words; "" for any other base."""
    if not matches(config):
        return ""
    quantization = config["quantization_config"]
    kinds = []
    for weights in _weight_args(quantization):
        strategy = weights.get("strategy")
        if strategy == "block" and isinstance(weights.get("block_structure"), list):
            kinds.append("{}x{} block".format(*weights["block_structure"]))
        elif strategy == "group":
            kinds.append(f"group {weights.get('group_size')}")
        else:
            kinds.append(str(strategy))
    scales = f", {', '.join(dict.fromkeys(kinds))} scales" if kinds else ""
    return f"compressed-tensors {quantization.get('format', '?')} FP8{scales}"


def _weight_args(quantization: dict[str, Any]) -> list[dict[str, Any]]:
    groups = quantization.get("config_groups")
    if not isinstance(groups, dict):
        return []
    found = [g.get("weights") for g in groups.values() if isinstance(g, dict)]
    return [w for w in found if isinstance(w, dict)]


def logical_index(index: CheckpointIndex, config: dict[str, Any]) -> CheckpointIndex:
    """`index` as the plan sees it: every FP8 weight one entry in the dtype it dequantizes to, its scales left out.
    Only symmetric 8-bit float weights (format float-quantized) are read; anything else compressed-tensors writes
    is refused by name, before anything is planned."""
    if not matches(config):
        return index
    config_path = index.root / "config.json"
    grids = _allowed_grids(config_path, config["quantization_config"])
    dtype = output_dtype(config)
    return fp8_index(
        index,
        lambda entry: _fp8_entry(entry, index.tensors, grids, dtype),
        INPUT_SCALE,
        ("weight_scale", "weight_zero_point", INPUT_SCALE),
        _stray,
    )


def _allowed_grids(config_path: object, quantization: dict[str, Any]) -> list[tuple[str, int, int]]:
    """The weight scale layouts the config's groups name: (strategy, block rows, block columns), 0 meaning the
    whole dimension; every group checked to be symmetric 8-bit float weights of a strategy read here."""
    where = f"{config_path}: compressed-tensors"
    fmt = quantization.get("format")
    if fmt != FLOAT_QUANTIZED:
        raise CheckpointFormatError(
            f"{where} format {fmt!r} is not read (only {FLOAT_QUANTIZED!r}, FP8 weights); give --base the "
            "full-precision model it was quantized from"
        )
    for key in ("sparsity_config", "transform_config", "kv_cache_scheme"):
        value = quantization.get(key)
        if value and not (key == "sparsity_config" and isinstance(value, dict) and value.get("format") == "dense"):
            raise CheckpointFormatError(f"{where} {key} is not read; give --base the full-precision model")
    grids: list[tuple[str, int, int]] = []
    for weights in _weight_args(quantization):
        grids.append(_grid(where, weights))
    if not grids:
        raise CheckpointFormatError(f"{where} quantization_config has no config_groups with weights")
    return grids


def _grid(where: str, weights: dict[str, Any]) -> tuple[str, int, int]:
    kind, bits, strategy = weights.get("type"), weights.get("num_bits"), weights.get("strategy")
    if kind != "float" or bits != 8:
        raise CheckpointFormatError(f"{where} weights of type {kind!r} with {bits!r} bits are not read (8-bit float)")
    if weights.get("symmetric", True) is not True:
        raise CheckpointFormatError(f"{where} asymmetric weights (a zero point) are not read")
    if weights.get("dynamic") not in (None, False):
        raise CheckpointFormatError(f"{where} dynamic weight scales are not read")
    if strategy in ("tensor", "channel"):
        return (strategy, 0, 0)
    if strategy == "group":
        size = weights.get("group_size")
        if not _positive(size):
            raise CheckpointFormatError(f"{where} group_size {size!r} is not a positive integer")
        return (strategy, 1, size)
    if strategy == "block":
        block = weights.get("block_structure")
        if not isinstance(block, list) or len(block) != 2 or not all(_positive(b) for b in block):
            raise CheckpointFormatError(f"{where} block_structure {block!r} is not two positive integers")
        return (strategy, block[0], block[1])
    raise CheckpointFormatError(f"{where} weight strategy {strategy!r} is not read (one of {', '.join(STRATEGIES)})")


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _fp8_entry(
    weight: TensorEntry, tensors: dict[str, TensorEntry], grids: list[tuple[str, int, int]], dtype: str
) -> Fp8Entry:
    scale_name = weight.name + SCALE_SUFFIX
    scale = tensors.get(scale_name)
    if scale is None:
        raise CheckpointFormatError(
            f"{weight.file}: FP8 weight '{weight.name}' has no '{scale_name}' (an incomplete compressed-tensors "
            "checkpoint)"
        )
    zero_point = f"{weight.name}_zero_point"
    if zero_point in tensors:
        raise CheckpointFormatError(f"{weight.file}: '{zero_point}': asymmetric FP8 weights are not read")
    if scale.dtype not in SCALE_DTYPES:
        raise CheckpointFormatError(f"{scale.file}: '{scale_name}' is {scale.dtype}; FP8 scales are F32, BF16 or F16")
    block = _block_for(weight, scale, grids)
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


def _block_for(weight: TensorEntry, scale: TensorEntry, grids: list[tuple[str, int, int]]) -> tuple[int, int] | None:
    """The block a weight's scale grid stands for, among the layouts the config names (None: one per tensor)."""
    expected = []
    for strategy, rows, cols in grids:
        if strategy == "tensor":
            if math.prod(scale.shape) == 1:
                return None
            expected.append("[1]")
            continue
        if len(weight.shape) != 2:
            continue
        out, inner = weight.shape
        if strategy == "channel":
            rows, cols = 1, max(inner, 1)
        if strategy == "group" and inner % cols:
            continue
        grid = (-(-out // rows), -(-inner // cols))
        if scale.shape == grid:
            return (rows, cols)
        expected.append(str(list(grid)))
    needs = " or ".join(dict.fromkeys(expected)) or "a layout the config names"
    raise CheckpointFormatError(
        f"{scale.file}: '{scale.name}' is {scale.dtype}{list(scale.shape)}; the FP8 weight '{weight.name}' "
        f"{list(weight.shape)} needs {needs}"
    )


def _stray(entry: TensorEntry, tensors: dict[str, TensorEntry]) -> None:
    """Refuse a scale (or zero point) left over after every FP8 weight took its own."""
    owner = entry.name.removesuffix(INPUT_SCALE) + ".weight" if entry.name.endswith(INPUT_SCALE) else None
    owner = owner or entry.name.removesuffix("_zero_point").removesuffix(SCALE_SUFFIX)
    found = tensors.get(owner)
    why = f"'{owner}' is {found.dtype}, not FP8" if found is not None else f"there is no '{owner}'"
    raise CheckpointFormatError(f"{entry.file}: '{entry.name}' is a compressed-tensors scale of no FP8 weight ({why})")
