"""The public API: merge(), verify() and plan_merge(). The merge, end to end: resolve inputs -> read adapters ->
plan -> stream from the base's source through the LoRA math into a sink -> finish the output -> publish it."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .describe import reshaped
from .dtypes import OUTPUT_DTYPES, TORCH_DTYPE_NAMES
from .errors import MergeError
from .inputs.base_choice import default_base
from .inputs.index import open_merged
from .inputs.opened import check_unchanged, opened_files
from .inputs.reader import TensorReader
from .inputs.resolve import with_revision
from .interrupts import deferred_signals
from .merging.checks import ValueCheck
from .merging.stream import run_plan
from .options import COMBINATIONS, MergeOptions
from .outputs.companions import add_quantization_config
from .outputs.finish import finish_output
from .outputs.lock import output_lock
from .outputs.requantize import (
    output_layout,
    output_sink,
    quantization_config,
    requantized_summary,
    weights_to_quantize,
)
from .outputs.safetensors import plan_shards
from .outputs.sink import Sink
from .outputs.staging import (
    check_free_space,
    check_output_path,
    discard,
    empty_directory,
    make_staging_dir,
    publish,
    remove_stale,
)
from .plan.coverage import CoverageRow
from .plan.tasks import Action, TensorTask
from .preparation import Inputs, prepare
from .progress import ProgressCallback, ProgressEvent, ignore_progress
from .verification.requantized import bitsandbytes_config, requantized_options, verify_requantized
from .verification.tensors import VerifyReport, check_against_plan, check_directory, expected_config

log = logging.getLogger(__name__)

# One adapter: a directory or repo id, optionally with the weight its delta gets: ("org/style", 0.5).
AdapterRef = str | Path | tuple[str | Path, float]
__all__ = ["COMBINATIONS", "AdapterRef", "MergeOptions", "MergeResult", "merge", "plan_merge", "verify"]


@dataclass(frozen=True)
class MergeResult:
    """What a merge produced; `to_dict()` is what `--json` prints."""

    output: Path
    base: Path
    adapter: Path
    dtype: str
    architecture: str
    shards: tuple[str, ...]
    tensors_merged: int
    tensors_copied: int
    tensors_converted: int
    bytes_written: int
    tensors_replaced: int = 0
    adapters: tuple[Path, ...] = ()  # every adapter, in the order given (`adapter` is the first)
    adapter_weights: tuple[float, ...] = ()
    combination: str | None = None  # how several adapters were combined; None for one adapter
    subtract: bool = False
    dry_run: bool = False
    config_changes: dict[str, Any] = field(default_factory=dict)
    coverage: tuple[CoverageRow, ...] = ()
    unused: tuple[str, ...] = ()
    reshaped: tuple[str, ...] = ()  # output tensors whose name or shape differs from the base's, and why
    nonfinite: tuple[str, ...] = ()  # tensors written with NaN/inf values (only with allow_nonfinite)
    checksums: dict[str, str] = field(default_factory=dict)  # shard -> SHA-256 (only with checksum)
    gguf: tuple[str, ...] = ()  # the GGUF files written (only with gguf)
    inputs_sha256: dict[str, str] = field(default_factory=dict)  # "adapter/<file>" or "base/<file>" -> SHA-256
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("output", "base", "adapter"):
            data[key] = str(data[key])
        data["shards"] = list(self.shards)
        data["adapters"] = [str(path) for path in self.adapters]
        data["adapter_weights"] = list(self.adapter_weights)
        return data


def merge(
    base: str | Path | None,
    adapter: AdapterRef | Sequence[AdapterRef],
    output: str | Path,
    options: MergeOptions | None = None,
    *,
    progress: ProgressCallback = ignore_progress,
    **settings: Any,
) -> MergeResult:
    """Merge a LoRA adapter into its base model and write a standalone safetensors checkpoint to `output`.

    `base` and `adapter` are local directories or Hugging Face repo ids (`revision` and `adapter_revision` pin
    them to a branch, tag or commit); `base` None takes the base the adapters name (`base_choice.base_named_by`).
    Memory stays at a few tensors whatever the model size. The output appears only when complete; on any error
    nothing is left behind.
    `adapter` may be several adapters, each optionally with a weight (`[("a", 1.0), ("b", 0.5)]`): each is planned
    against the base on its own first, then their weighted deltas are merged in one pass, combined as PEFT's
    `add_weighted_adapter` does (`combine`: "cat", the exact weighted sum of the deltas, or PEFT's "linear").
    `subtract` takes the adapters' deltas out of `base` instead: `base` is then a checkpoint they were merged into.
    Every adapter tensor must update some output tensor, unless `allow_unused`. With `dry_run`, nothing is
    written: the result reports the plan (`coverage`: each adapter tensor and the tensor it changes).
    A merged or converted tensor with NaN or infinite values, or values beyond float16's range in an f16 output,
    is an error unless `allow_nonfinite` (then it is logged and kept in `nonfinite`). The output gets a README.md
    model card: base, adapter, LoRA scaling, dtype, tool version and a hash of each input (`inputs_sha256`);
    with `checksum`, also the SHA-256 of every shard written. The free space at the output is checked first.
    What killed merges into the same output left behind is removed first (see `outputs.remove_stale`).
    With `requantize` ("nf4" or "fp4") the output is a bitsandbytes 4-bit checkpoint (blocks of 64, double
    quantization), the weights transformers would quantize quantized as bitsandbytes does and config.json given
    transformers' `quantization_config` (outputs/requantize.py; which weights is asked of transformers, which must
    be installed). `verify` checks such an output too, quantizing what it derives the same way.
    How to merge is `options` (a MergeOptions), or its fields given by name: `merge(base, adapter, out,
    dtype="f16", max_shard_size="2GB")`; names given override `options`.
    Raises MergeError (and subclasses) for bad input.
    """
    options = MergeOptions.from_settings(options, settings)
    output = check_output_path(output)
    # One merge at a time writes an output: taken before anything costly (downloads, planning), held to the end.
    with nullcontext() if options.dry_run else output_lock(output):
        refs = _adapter_refs(adapter, options.adapter_revision)
        base = _base_ref(base, refs, options)
        if not options.dry_run:
            remove_stale(output)  # under the lock: nothing else can be writing there now
        timings: dict[str, float] = {}
        inputs = prepare(base, refs, output, options, progress, timings)
        converter = None
        if options.gguf and not options.dry_run:
            # llama.cpp's converter checks the architecture and tokenizer the merge will write (vocab only, seconds)
            from .gguf.staged import preflight_merge

            converter = preflight_merge(inputs, options.dtype, options.gguf, options.llama_cpp)
        # which weights --requantize quantizes is planned too: a model it cannot write fails before any byte
        quantized = weights_to_quantize(inputs, options)
        layout = output_layout(inputs, options, quantized)
        if options.dry_run:
            shards = [shard.file_name for shard in plan_shards(layout, options.max_shard_bytes)]
            planned = _result(inputs, output, options.dtype, shards, 0, timings, dry_run=True)
            return replace(planned, bytes_written=sum(tensor.nbytes for tensor in layout))
        replaceable = empty_directory(output)  # without --overwrite, the only thing the result may take the place of
        extra = 0
        if options.gguf:
            from .gguf.staged import gguf_bytes

            extra = gguf_bytes(inputs.plan.output_bytes, options.dtype, options.gguf)
        check_free_space(output, inputs.plan.output_bytes + extra + sum(p.stat().st_size for p in inputs.companions))
        staging: Path | None = None
        gguf_files: list[str] = []
        try:
            # A signal while the staging directory is being made is acted on once it is made and ours to discard.
            with deferred_signals():
                staging, created = make_staging_dir(output)
            sink = output_sink(staging, options, quantized)
            total = sum(tensor.nbytes for tensor in layout)
            bytes_written, nonfinite = _write(inputs, sink, total, options.allow_nonfinite, progress, timings)
            started = time.perf_counter()
            progress(ProgressEvent("save", "start", str(output)))
            adapters = [ref for ref, _ in refs]
            checksums, hashes = finish_output(
                inputs,
                staging,
                sink.files,
                options.dtype,
                base,
                adapters,
                options.checksum,
                requantized_summary(options, quantized),
            )
            if options.requantize is not None:
                compute_dtype = TORCH_DTYPE_NAMES[OUTPUT_DTYPES[options.dtype]]
                add_quantization_config(staging, quantization_config(options.requantize, compute_dtype))
            if options.gguf:
                from .gguf.staged import export_merge

                gguf_files = export_merge(staging, output.name, options, converter, progress, timings)
            publish(staging, output, overwrite=options.overwrite, replaceable=replaceable)
        except BaseException:
            if staging is not None:
                discard(staging, created)
            raise
    timings["save"] = time.perf_counter() - started
    progress(ProgressEvent("save", "done", str(output), elapsed=timings["save"]))
    return replace(
        _result(inputs, output, options.dtype, sink.files, bytes_written, timings),
        nonfinite=nonfinite,
        checksums=checksums,
        inputs_sha256=hashes,
        gguf=tuple(str(output / name) for name in gguf_files),
    )


def verify(
    base: str | Path | None,
    adapter: AdapterRef | Sequence[AdapterRef],
    merged: str | Path,
    options: MergeOptions | None = None,
    *,
    progress: ProgressCallback = ignore_progress,
    **settings: Any,
) -> VerifyReport:
    """Prove that `merged` is `adapter` merged into `base`: every output tensor is derived again, streaming as a
    merge does, and compared byte for byte with the merged files, which must hold nothing else (no LoRA keys).
    Several adapters, weights, `combine` and `subtract` mean what they mean for `merge`. The directory must hold
    no other *.safetensors file (a stale shard) and the config.json the merge writes.

    A `--requantize` output (config.json with the bitsandbytes `quantization_config` it writes) is checked after
    quantizing what is derived the same way; its quant type and dtype are the checkpoint's own.
    `options` and `settings` as for `merge`; the dtype is the merged checkpoint's own. A mismatch is reported in
    the result (`ok` is False), not raised; inputs that cannot be read raise MergeError as for a merge.
    """
    options = MergeOptions.from_settings(options, settings)
    quantization = bitsandbytes_config(Path(merged))
    if quantization is not None:
        options = requantized_options(Path(merged), quantization, options)
        return verify_requantized(plan_merge(base, adapter, options, progress=progress), Path(merged), options)
    merged_index, merged_dtype = open_merged(Path(merged))
    dtype = {name: key for key, name in OUTPUT_DTYPES.items()}[merged_dtype]
    options = options.replace(dtype=dtype)
    inputs = plan_merge(base, adapter, options, progress=progress)
    with TensorReader() as reader:
        report = check_against_plan(inputs.plan, inputs.source, merged_index, reader)
    check_unchanged(opened_files(inputs.plan, merged_index))
    config = expected_config(inputs.base_config, TORCH_DTYPE_NAMES[OUTPUT_DTYPES[dtype]], inputs.plan.config_changes)
    return check_directory(report, merged_index, config)


def plan_merge(
    base: str | Path | None,
    adapter: AdapterRef | Sequence[AdapterRef],
    options: MergeOptions | None = None,
    *,
    headers_only: bool = False,
    progress: ProgressCallback = ignore_progress,
    **settings: Any,
) -> Inputs:
    """The inputs resolved and the merge planned, as a dry run plans it; nothing is written (`inspect --base`,
    `verify`). With `headers_only`, a hub base is read from its safetensors headers over HTTP (`remote`), its
    weights never downloaded: the plan can be checked but not run."""
    options = MergeOptions.from_settings(options, settings)
    refs = _adapter_refs(adapter, options.adapter_revision)
    return prepare(_base_ref(base, refs, options), refs, None, options, progress, {}, headers_only=headers_only)


def _base_ref(base: str | Path | None, adapters: list[tuple[str, float]], options: MergeOptions) -> str:
    """The base given, or else the one the adapters name, pinned to `revision`."""
    if base is None:
        named = default_base([ref for ref, _ in adapters], options.hf_token, options.adapter_name)
        log.info("base: %s (base_model_name_or_path in %s)", named.ref, named.source)
        base = named.ref
    return with_revision(str(base), options.revision)


def _adapter_refs(adapter: AdapterRef | Sequence[AdapterRef], revision: str | None) -> list[tuple[str, float]]:
    """Every adapter given, with its weight (1 unless given), as (reference, weight)."""
    items: Sequence[AdapterRef]
    if isinstance(adapter, str | Path):
        items = [adapter]
    elif isinstance(adapter, tuple) and len(adapter) == 2 and _is_weight(adapter[1]):
        items = [adapter]  # type: ignore[list-item]
    else:
        items = adapter  # type: ignore[assignment]
    refs = []
    for item in items:
        ref, weight = (item[0], item[1]) if isinstance(item, tuple) else (item, 1.0)
        if not isinstance(ref, str | Path) or not _is_weight(weight):
            raise MergeError(f"adapter {item!r}: expected a path or repo id, or (path or repo id, weight)")
        if not math.isfinite(weight):
            raise MergeError(f"{ref}: adapter weight {weight} is not a finite number")
        refs.append((with_revision(str(ref), revision, "--adapter-revision"), float(weight)))
    if not refs:
        raise MergeError("no adapter given")
    return refs


def _is_weight(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _result(
    inputs: Inputs,
    output: Path,
    dtype: str,
    shards: Sequence[str],
    bytes_written: int,
    timings: dict[str, float],
    dry_run: bool = False,
) -> MergeResult:
    plan = inputs.plan
    return MergeResult(
        output=output,
        base=inputs.base_dir,
        adapter=inputs.adapter_dir,
        adapters=inputs.adapter_dirs,
        adapter_weights=inputs.adapter_weights,
        combination=inputs.combination,
        subtract=inputs.subtract,
        dtype=dtype,
        architecture=inputs.architecture,
        shards=tuple(shards),
        tensors_merged=plan.count(Action.MERGE),
        tensors_copied=plan.count(Action.COPY),
        tensors_converted=plan.count(Action.CONVERT),
        tensors_replaced=plan.count(Action.REPLACE),
        bytes_written=plan.output_bytes if dry_run else bytes_written,
        dry_run=dry_run,
        config_changes=dict(plan.config_changes),
        coverage=inputs.coverage,
        unused=plan.unused,
        reshaped=tuple(reshaped(plan)),
        timings=timings,
    )


def _write(
    inputs: Inputs,
    sink: Sink,
    total_bytes: int,
    allow_nonfinite: bool,
    progress: ProgressCallback,
    timings: dict[str, float],
) -> tuple[int, tuple[str, ...]]:
    """Stream every tensor into `sink` and finish it; returns the bytes written and the tensors kept with NaN/inf.
    `total_bytes`: what the sink will write (the progress total)."""
    plan = inputs.plan
    values = ValueCheck(allow_nonfinite)
    total_tensors = len(plan.tasks)
    started = time.perf_counter()
    progress(ProgressEvent("merge", "start", tensors_total=total_tensors, bytes_total=total_bytes))
    done = 0

    def on_tensor(task: TensorTask, bytes_done: int) -> None:
        nonlocal done
        where = task.source.file if task.source is not None else inputs.adapter_dir
        values.tensor_done(str(where), task.output.name, task.output.dtype, math.prod(task.output.shape))
        done += 1
        progress(
            ProgressEvent(
                "merge",
                "update",
                task.output.name,
                elapsed=time.perf_counter() - started,
                tensors_done=done,
                tensors_total=total_tensors,
                bytes_done=bytes_done,
                bytes_total=total_bytes,
            )
        )

    try:
        with TensorReader() as reader:
            run_plan(plan, inputs.source, reader, sink, on_tensor, values)
        sink.finish()
    finally:
        sink.abort()
    timings["merge"] = time.perf_counter() - started
    progress(
        ProgressEvent(
            "merge",
            "done",
            f"{plan.count(Action.MERGE)} merged, {plan.count(Action.COPY) + plan.count(Action.CONVERT)} copied"
            + (f", {plan.count(Action.REPLACE)} replaced" if plan.count(Action.REPLACE) else ""),
            elapsed=timings["merge"],
            tensors_done=total_tensors,
            tensors_total=total_tensors,
            bytes_done=sink.bytes_written,
            bytes_total=total_bytes,
        )
    )
    return sink.bytes_written, tuple(values.findings)
