"""The output around its weights: companion files, config.json, the model card; then a last look at the inputs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..dtypes import OUTPUT_DTYPES, TORCH_DTYPE_NAMES
from ..inputs.opened import check_unchanged, opened_files
from ..inputs.quantized import summary as quantization_summary
from .card import AdapterSource, Provenance, input_files, shard_checksums, snapshot_commit, write_card
from .companions import copy_companions, write_config

if TYPE_CHECKING:
    from ..preparation import Inputs


def finish_output(
    inputs: Inputs,
    staging: Path,
    weight_files: Sequence[str],
    dtype: str,
    base: str,
    adapters: list[str],
    checksum: bool,
    requantized: str = "",
) -> tuple[dict[str, str], dict[str, str]]:
    """Everything beside the weights (which the sink has written and checked): companion files, config.json and
    the model card (README.md) with the hash of each input and, with `checksum`, the SHA-256 of each of
    `weight_files`; `requantized` says how --requantize quantized the output (for the card). Last, the inputs are
    checked unchanged. Returns the checksums and the input hashes."""
    from .. import __version__

    copy_companions(inputs.companions, staging)
    if inputs.base_config:
        write_config(inputs.base_config, TORCH_DTYPE_NAMES[OUTPUT_DTYPES[dtype]], staging, inputs.plan.config_changes)
    several = len(inputs.adapter_dirs) > 1
    sources = [
        (f"adapter {number}" if several else "adapter", directory, names)
        for number, (directory, names) in enumerate(
            zip(inputs.adapter_dirs, inputs.adapter_files, strict=True), start=1
        )
    ]
    read = opened_files(inputs.plan)
    files = input_files(inputs.base_dir, inputs.base_shards, sources, read)
    checksums = shard_checksums(staging, list(weight_files)) if checksum else {}
    provenance = Provenance(
        base=base,
        adapters=tuple(
            AdapterSource(ref, lora, weight, snapshot_commit(directory))
            for ref, lora, weight, directory in zip(
                adapters, inputs.loras, inputs.adapter_weights, inputs.adapter_dirs, strict=True
            )
        ),
        dtype=dtype,
        version=__version__,
        base_commit=snapshot_commit(inputs.base_dir),
        inputs=tuple(files),
        checksums=checksums,
        combination=inputs.combination or "",
        subtract=inputs.subtract,
        base_quantization=quantization_summary(inputs.base_config),
        base_roundtrip=inputs.base_roundtrip,
        requantized=requantized,
    )
    write_card(staging, provenance)
    # Last, once every read is done: a weight file written to in place while it was read may have given bytes
    # of both versions.
    check_unchanged(read)
    return checksums, {f"{f.source}/{f.name}": f.sha256 for f in files if f.sha256}
