"""GGUF as the last step of a merge (`--gguf TYPES`): what api.merge calls, around its staging directory.

1. `preflight_merge(inputs, dtype, types)` after planning, before any weight is merged: the converter in vocab-only
   mode on the config.json and tokenizer files the merge is about to write (seconds).
2. The merge writes its safetensors into the hidden staging directory as usual (flat memory).
3. `export_staged(staging, name, types)` after `finish_output` and before `publish`: llama.cpp's converter reads the
   staged safetensors lazily (mmap, a tensor at a time) and writes `<name>-<type>.gguf` into the staging directory;
   with `keep_safetensors=False` the safetensors shards and their index are removed from it. `publish` then makes
   the whole output appear at once, GGUF files included.

The HF merge is staged rather than streamed into the converter: feeding our stream to it would mean replacing its
tensor index (`ModelBase.index_tensors`) from outside, an upstream internal that changes between releases. Staging
costs the merge's size in disk while the conversion runs, and no memory: the converter's lazy tensors are read
from the memory-mapped shards.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import MergeError
from ..progress import ProgressEvent
from .export import GGUFFile, convert, preflight, stored_float_type
from .tools import Converter
from .types import parse_types

if TYPE_CHECKING:
    from ..options import MergeOptions
    from ..preparation import Inputs
    from ..progress import ProgressCallback

# Bits per weight of each type, rounded up (K-quant mixes keep some tensors at higher types): for the free-space
# check before a merge. The float intermediate of a quantization is counted as its own type.
BITS_PER_WEIGHT = {
    "f32": 32.0, "f16": 16.0, "bf16": 16.0, "q8_0": 8.5, "q6_k": 6.6, "q5_k_m": 5.9, "q5_k_s": 5.6, "q5_0": 5.5,
    "q5_1": 6.0, "q4_k_m": 5.0, "q4_k_s": 4.7, "q4_0": 4.5, "q4_1": 5.0, "q3_k_l": 4.4, "q3_k_m": 4.0,
    "q3_k_s": 3.6, "q2_k": 3.4, "iq4_nl": 4.5, "iq4_xs": 4.3, "iq3_s": 3.5, "iq3_m": 3.7, "iq3_xs": 3.3,
}  # fmt: skip
_STORED_BITS = {"f32": 32.0, "f16": 16.0, "bf16": 16.0}


def preflight_merge(
    inputs: Inputs, dtype: str, types: str | Sequence[str], converter: str | Path | Converter | None = None
) -> Converter:
    """The converter's vocab-only check on the config.json and companion (tokenizer) files the merge of `inputs`
    at `dtype` will write, before it writes any. Returns the converter to use for `export_staged`."""
    from ..dtypes import OUTPUT_DTYPES, TORCH_DTYPE_NAMES
    from ..outputs.companions import copy_companions, write_config

    with tempfile.TemporaryDirectory(prefix="qlora-merge-gguf-inputs-") as scratch:
        stub = Path(scratch) / "model"
        stub.mkdir()
        copy_companions(inputs.companions, stub)
        if inputs.base_config:
            write_config(inputs.base_config, TORCH_DTYPE_NAMES[OUTPUT_DTYPES[dtype]], stub, inputs.plan.config_changes)
        try:
            return preflight(stub, types, converter=converter)
        except MergeError as exc:  # name what the user gave, not the scratch copy the check ran on
            where = f"{inputs.base_dir} (merged: its config and tokenizer)"
            raise type(exc)(str(exc).replace(str(stub), where)) from None


def gguf_bytes(weight_bytes: int, dtype: str, types: str | Sequence[str]) -> int:
    """An upper estimate of the disk the GGUF files of a merge of `weight_bytes` in `dtype` need, the float
    intermediate of a quantization included."""
    wanted = parse_types(types) if isinstance(types, str) else parse_types(list(types))
    stored = _STORED_BITS.get(dtype, 32.0)
    total = sum(BITS_PER_WEIGHT.get(t, 8.5) for t in wanted)
    if any(t not in _STORED_BITS and t != "q8_0" for t in wanted) and dtype not in wanted:
        total += stored
    return int(weight_bytes * total / stored) + (1 << 20) * len(wanted)


def export_staged(
    staging: Path,
    name: str,
    types: str | Sequence[str],
    *,
    converter: str | Path | Converter | None = None,
    keep_safetensors: bool = True,
    allow_f16_overflow: bool = False,
    threads: int | None = None,
) -> list[GGUFFile]:
    """Convert the finished merge in `staging` to `<name>-<type>.gguf` files beside it (the preflight has run, so
    it is not repeated); then, unless `keep_safetensors`, remove its safetensors shards and their index."""
    stored_float_type(staging)  # the weights are there and readable before anything runs
    files = convert(
        staging,
        types,
        staging,
        name=name,
        converter=converter,
        allow_f16_overflow=allow_f16_overflow,
        threads=threads,
        check=False,
    )
    if not keep_safetensors:
        for path in [*staging.glob("*.safetensors"), staging / "model.safetensors.index.json"]:
            path.unlink(missing_ok=True)
    return files


def export_merge(
    staging: Path,
    name: str,
    options: MergeOptions,
    converter: Converter | None,
    progress: ProgressCallback,
    timings: dict[str, float],
) -> list[str]:
    """`merge(..., gguf=...)`'s step: the staged merge converted to `<name>-<type>.gguf` beside it, before it is
    published, with its progress events and timing; returns the file names."""
    started = time.perf_counter()
    progress(ProgressEvent("gguf", "start", ", ".join(options.gguf)))
    files = export_staged(
        staging,
        name,
        options.gguf,
        converter=converter,
        keep_safetensors=options.keep_safetensors,
        allow_f16_overflow=options.allow_nonfinite,
    )
    timings["gguf"] = time.perf_counter() - started
    names = [f.path.name for f in files]
    progress(ProgressEvent("gguf", "done", ", ".join(names), elapsed=timings["gguf"]))
    return names
