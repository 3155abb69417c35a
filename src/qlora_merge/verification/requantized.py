"""verify() of a --requantize output: the plan runs into the same 4-bit quantizer the merge wrote through, and its
tensors are compared byte for byte with the merged files (the quant states too: ours are padded to a fixed width,
so only a checkpoint this tool wrote verifies)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dtypes import OUTPUT_DTYPES, TORCH_DTYPE_NAMES, canonical_dtype
from ..errors import CheckpointFormatError
from ..inputs.index import CheckpointIndex, open_checkpoint
from ..inputs.opened import check_unchanged, opened_files
from ..inputs.reader import TensorReader
from ..merging.stream import run_plan
from ..names import CONFIG_NAME
from ..options import REQUANTIZE_TYPES
from ..outputs.requantize import RequantizeSink, output_layout, quantization_config, weights_to_quantize
from ..plan.tasks import OutputTensor
from .tensors import LORA_MARKERS, ComparingSink, VerifyReport, check_directory, expected_config

if TYPE_CHECKING:
    from ..options import MergeOptions
    from ..preparation import Inputs


def bitsandbytes_config(directory: Path) -> dict[str, Any] | None:
    """The `quantization_config` of `directory`'s config.json if it is a bitsandbytes one, else None."""
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(quantization, dict) and quantization.get("quant_method") == "bitsandbytes":
        return quantization
    return None


def requantized_options(merged: Path, quantization: dict[str, Any], options: MergeOptions) -> MergeOptions:
    """The options the merge that wrote `merged` ran with, from its quantization_config, which must be the one
    --requantize writes (type and dtype are the checkpoint's own)."""
    quant_type = quantization.get("bnb_4bit_quant_type")
    dtype_name = quantization.get("bnb_4bit_compute_dtype")
    if quant_type not in REQUANTIZE_TYPES or dtype_name not in TORCH_DTYPE_NAMES.values():
        raise CheckpointFormatError(f"{merged}: a bitsandbytes checkpoint that --requantize does not write")
    if quantization != quantization_config(quant_type, dtype_name):
        raise CheckpointFormatError(
            f"{merged}: its bitsandbytes quantization_config is not the one --requantize writes (4-bit, double "
            "quantization, uint8 storage); only a --requantize output can be verified against base + adapter"
        )
    return options.replace(dtype=canonical_dtype(dtype_name), requantize=quant_type)


def verify_requantized(inputs: Inputs, merged: Path, options: MergeOptions) -> VerifyReport:
    """The verdict on `merged`, a --requantize output, against the merge planned in `inputs` with `options` (from
    requantized_options)."""
    assert options.requantize is not None
    dtype_name = TORCH_DTYPE_NAMES[OUTPUT_DTYPES[options.dtype]]
    quantized = weights_to_quantize(inputs, options)
    layout = output_layout(inputs, options, quantized)
    merged_index = open_checkpoint(merged)
    comparing = ComparingSink(merged_index)
    sink = RequantizeSink(comparing, quantized, options.requantize)
    with TensorReader() as reader:
        try:
            run_plan(inputs.plan, inputs.source, reader, sink, lambda task, written: None)
            sink.finish()
        finally:
            sink.abort()
    check_unchanged(opened_files(inputs.plan, merged_index))
    report = _layout_report(inputs, layout, merged_index, comparing)
    config = expected_config(inputs.base_config, dtype_name, inputs.plan.config_changes)
    if config is not None:
        config["quantization_config"] = quantization_config(options.requantize, dtype_name)
    return check_directory(report, merged_index, config)


def _layout_report(
    inputs: Inputs, layout: list[OutputTensor], merged: CheckpointIndex, sink: ComparingSink
) -> VerifyReport:
    """The verdict on every tensor of `layout` (as verification.tensors.check_against_plan gives it for a plan's):
    compared by `sink`, each with the dtype and shape planned, and nothing else in the files."""
    mismatched, details = list(sink.mismatched), dict(sink.details)
    for tensor in layout:
        entry = merged.tensors.get(tensor.name)
        if entry is not None and (entry.dtype, entry.shape) != (tensor.dtype, tensor.shape):
            details[tensor.name] = (
                f"{entry.dtype}{list(entry.shape)} in the merged file, {tensor.dtype}{list(tensor.shape)} expected"
            )
            if tensor.name not in mismatched:
                mismatched.append(tensor.name)
    extra = sorted(set(merged.tensors) - {tensor.name for tensor in layout})
    lora_keys = tuple(name for name in extra if any(marker in name for marker in LORA_MARKERS))
    return VerifyReport(
        merged=merged.root,
        tensors_checked=len(layout),
        tensors_merged=sum(1 for task in inputs.plan.tasks if task.update is not None),
        mismatched=tuple(mismatched),
        missing=tuple(sink.missing),
        unexpected=tuple(name for name in extra if name not in lora_keys),
        lora_keys=lora_keys,
        details=details,
    )
