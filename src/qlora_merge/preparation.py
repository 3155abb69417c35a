"""Everything before a byte is written: resolve the inputs, read the base's headers and the adapters, plan."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapter import read_adapter
from .adapter.combine import WeightedAdapter, adapter_to_merge, scaled_config
from .adapter.config import LoraConfig
from .adapter.weights import AdapterTensor, AdapterWeights, dtype_of, read_chunks, read_tensor
from .describe import adapter_detail, base_roundtrip_detail, combined_detail, lora_summary
from .errors import CheckpointFormatError, MergeError
from .fourbit import DEFAULT_BLOCKSIZE
from .inputs.base_choice import check_not_swapped
from .inputs.config import read_base_config
from .inputs.format import TensorEntry
from .inputs.index import open_checkpoint
from .inputs.quantized import is_quantized, logical_index, quant_method
from .inputs.quantized import summary as quantization_summary
from .inputs.reader import TensorReader
from .inputs.remote import RemoteBase, is_repo_ref, remote_base
from .inputs.resolve import resolve_adapter, resolve_base
from .inputs.roundtrip import RoundTripSource, count_round_tripped
from .inputs.sources import Source, source_for
from .merging.combination import Combination
from .names import ADAPTER_CONFIG_NAME
from .options import MergeOptions
from .outputs.companions import adapter_tokenizer_files, companion_files
from .outputs.overlap import check_not_inside
from .outputs.staging import check_output_free
from .plan.coverage import CoverageRow, coverage
from .plan.keymap import resolve_loader
from .plan.matching import build_plan
from .plan.tasks import MergePlan
from .progress import ProgressCallback, human_bytes, stage

log = logging.getLogger(__name__)

# Tensors that may be tied copies of each other are compared this many bytes at a time.
COMPARE_CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class Inputs:
    """Resolved, validated inputs and the plan made from them; nothing has been written yet."""

    base_dir: Path
    adapter_dirs: tuple[Path, ...]
    base_config: dict[str, Any]
    architecture: str
    plan: MergePlan
    source: Source  # how the base's tensors are read
    companions: tuple[Path, ...]
    coverage: tuple[CoverageRow, ...]  # every adapter tensor and what it does to the output
    adapter_weights: tuple[float, ...] = ()
    loras: tuple[str, ...] = ()  # per adapter: r, alpha, scaling and variants, for the model card
    base_shards: tuple[str, ...] = ()
    adapter_files: tuple[tuple[str, ...], ...] = ()  # per adapter: its weights file and config
    combination: str | None = None  # with several adapters
    subtract: bool = False
    # --base-quant: how the base's weights were round-tripped before merging, in words ("" when they were not)
    base_roundtrip: str = ""

    @property
    def adapter_dir(self) -> Path:
        return self.adapter_dirs[0]


def prepare(
    base: str,
    adapters: list[tuple[str, float]],
    output: Path | None,
    options: MergeOptions,
    progress: ProgressCallback,
    timings: dict[str, float],
    *,
    headers_only: bool = False,
) -> Inputs:
    """Resolve the inputs (downloading what the hub has), read the base's headers and the adapters, and plan the
    merge, reporting each stage to `progress` and timing it in `timings`. With `output`, it is checked first (free,
    not an input). Every error a user can cause is raised here, before a byte is written."""
    hf_token, how, subtract = options.hf_token, Combination(options.combine), options.subtract
    _check_base_quant_options(options)
    with stage("resolve", progress, timings) as step:
        if output is not None:
            check_output_free(output, options.overwrite)
        remote = _remote_base(base, hf_token) if headers_only else None
        base_dir = remote.index.root if remote is not None else resolve_base(base, hf_token)
        adapter_dirs = [resolve_adapter(ref, hf_token, options.adapter_name) for ref, _ in adapters]
        check_not_swapped(base_dir, adapter_dirs, base, [ref for ref, _ in adapters])
        if output is not None:
            check_not_inside(output, [base_dir], may_hold=adapter_dirs)
        base_config = remote.config if remote is not None else read_base_config(base_dir)
        resolved_loader = resolve_loader(options.loader, base_config)
        step.detail = resolved_loader.architecture
    with stage("base", progress, timings) as step:
        _check_base_quant(base_dir, base_config, options)
        if remote is not None and is_quantized(base_config):
            raise CheckpointFormatError(
                f"{base}: a quantized base is planned from its quantization states, which header-only "
                "inspection does not read (give a local directory, or merge with --dry-run, which downloads it)"
            )
        index = remote.index if remote is not None else logical_index(open_checkpoint(base_dir), base_config)
        step.detail = f"{len(index.tensors)} tensors in {len(index.files)} file(s), {human_bytes(index.total_bytes)}"
        if index.quantization is not None:
            step.detail += f", {quantization_summary(base_config)}, dequantized"
        if remote is not None:
            step.detail += f", headers only: {human_bytes(remote.header_bytes)} read from the hub"
        trained = _trained_weights(index, base_config, options) if options.base_quant_type else None
        base_roundtrip = _roundtrip_detail(options, index.tensors.values(), trained)
        if base_roundtrip:
            step.detail += f", {base_roundtrip}"
    with stage("tokenizer", progress, timings) as step:
        from_adapter = _adapters_tokenizer(adapter_dirs)
        overridden = {p.name for p in from_adapter} | {"config.json"}
        on_disk = companion_files(base_dir, index.weight_file_names) if remote is None else []
        companions = [p for p in on_disk if p.name not in overridden]
        step.detail = f"{len(companions) + len(from_adapter)} files" + (
            f", tokenizer from the adapter ({len(from_adapter)} files)" if from_adapter else ""
        )
    with stage("adapter", progress, timings) as step:
        read = [
            WeightedAdapter(*read_adapter(directory), weight)
            for directory, (_, weight) in zip(adapter_dirs, adapters, strict=True)
        ]
        with TensorReader() as reader:

            def plan_for(config: LoraConfig, weights: AdapterWeights) -> MergePlan:
                return build_plan(
                    index,
                    base_config,
                    config,
                    weights,
                    resolved_loader,
                    options.dtype,
                    allow_unused=options.allow_unused,
                    same_values=lambda x, y, transpose: _same_values(x, y, transpose, reader),
                )

            if len(read) > 1:  # each against the base on its own first: its errors name its own files
                for adapter in read:
                    plan_for(scaled_config(adapter), adapter.weights)
            config, weights = adapter_to_merge(read, how, subtract)
            plan = plan_for(config, weights)
        rows = coverage(plan, weights)
        step.detail = adapter_detail(read[0], subtract) if len(read) == 1 else combined_detail(read, how, subtract)
    return Inputs(
        base_dir=base_dir,
        adapter_dirs=tuple(adapter_dirs),
        base_config=base_config,
        architecture=resolved_loader.architecture,
        plan=plan,
        source=_source(index, options, trained),
        companions=tuple(companions + from_adapter),
        coverage=tuple(rows),
        adapter_weights=tuple(weight for _, weight in adapters),
        loras=tuple(lora_summary(adapter.config, adapter.weights) for adapter in read),
        base_shards=tuple(sorted(index.weight_file_names)),
        adapter_files=tuple((adapter.weights.path.name, ADAPTER_CONFIG_NAME) for adapter in read),
        combination=how.value if len(read) > 1 else None,
        subtract=subtract,
        base_roundtrip=base_roundtrip,
    )


def _check_base_quant_options(options: MergeOptions) -> None:
    """--base-quant is for a merge: the base of a subtraction is a merged checkpoint, which a round trip would not
    turn back into the weights the adapter trained on. Checked first, before any download."""
    if options.base_quant_type is not None and options.subtract:
        raise MergeError(
            f"--base-quant {options.base_quant} with --subtract: the base of a subtraction is a merged checkpoint, "
            "not the weights an adapter trained on, and a round trip would not give them back; drop --base-quant"
        )


def _check_base_quant(base_dir: Path, base_config: dict[str, Any], options: MergeOptions) -> None:
    """--base-quant round-trips a full-precision base: a quantized base is refused (its dequantized weights are the
    base a QLoRA adapter trained on already), before anything is read or written."""
    if options.base_quant_type is None or not is_quantized(base_config):
        return
    what = quantization_summary(base_config) or f"quantized ({quant_method(base_config)})"
    raise CheckpointFormatError(
        f"{base_dir / 'config.json'}: --base-quant {options.base_quant} round-trips a full-precision base, but this "
        f"base is {what} already; merge into it without --base-quant (with --config: --base-quant none), or give "
        "the full-precision base"
    )


def _source(index: object, options: MergeOptions, trained: frozenset[str] | None) -> Source:
    """How the base's tensors are read: by the source its format calls for, round-tripped through 4-bit with
    --base-quant."""
    source = source_for(index)
    quant_type = options.base_quant_type
    if quant_type is None:
        return source
    return RoundTripSource(source, quant_type, only=trained)


def _trained_weights(index: object, base_config: dict[str, Any], options: MergeOptions) -> frozenset[str] | None:
    """The weights --base-quant round-trips: those transformers quantizes when it loads the base in 4-bit, which
    QLoRA trained against (embeddings and the output head stay 16-bit there); None with --base-quant-all (every
    tensor of two or more dimensions, as axolotl merge-lora does)."""
    if options.base_quant_all:
        return None
    from .outputs.requantize import quantized_weights

    return quantized_weights(base_config, list(index.tensors.values()), "--base-quant", True)  # type: ignore[attr-defined]


def _roundtrip_detail(options: MergeOptions, entries: Iterable[TensorEntry], trained: frozenset[str] | None) -> str:
    """Which base --base-quant merges into, in words ("" without it)."""
    quant_type = options.base_quant_type
    if quant_type is None:
        return ""
    detail = base_roundtrip_detail(quant_type, count_round_tripped(entries, trained), DEFAULT_BLOCKSIZE)
    return detail + (", embeddings and head included, as axolotl merge-lora does" if trained is None else "")


def _remote_base(base: str, hf_token: str | None) -> RemoteBase | None:
    """A hub base read from its headers, when `base` is a repo id and the hub may be asked; else None (a local
    directory, or HF_HUB_OFFLINE, where a complete cached snapshot still serves)."""
    from huggingface_hub import constants

    if constants.is_offline_mode() or not is_repo_ref(base):
        return None
    return remote_base(base, hf_token)


def _adapters_tokenizer(adapter_dirs: list[Path]) -> list[Path]:
    """The tokenizer files saved with the adapters, which replace the base's: the first adapter's that has any.
    Another adapter's different tokenizer is reported, since the merged model can only have one."""
    chosen: list[Path] = []
    for directory in adapter_dirs:
        files = adapter_tokenizer_files(directory)
        if not chosen:
            chosen = files
            continue
        mine = {p.name: p.read_bytes() for p in chosen}
        if files and any(mine.get(p.name) != p.read_bytes() for p in files):
            log.warning("%s: its tokenizer differs from %s's, which the merged model gets", directory, chosen[0].parent)
    return chosen


def _same_values(first: AdapterTensor, second: AdapterTensor, transpose: bool, reader: TensorReader) -> bool:
    """Whether two adapter tensors hold the same values (the second transposed): tied copies are checked, not
    assumed. Only LoRA factors are compared transposed, and they are small; whole tensors (a saved embedding or
    head: 2.5 GB for a 150k x 4096 float32 vocabulary) go a chunk at a time, never in memory whole."""
    if transpose:
        a, b = read_tensor(first, reader), read_tensor(second, reader).T
        return a.shape == b.shape and a.dtype == b.dtype and bool((a == b).all())
    if tuple(first.shape) != tuple(second.shape) or dtype_of(first) != dtype_of(second):
        return False
    pieces = (read_chunks(tensor, reader, COMPARE_CHUNK_BYTES) for tensor in (first, second))
    return all(bool((a == b).all()) for a, b in zip(*pieces, strict=True))
