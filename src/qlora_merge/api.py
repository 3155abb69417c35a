"""The merge, end to end: resolve inputs -> read adapter -> plan -> stream and merge -> write -> check -> publish."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .adapter import read_adapter
from .adapter.combine import WeightedAdapter, adapter_to_merge, scaled_config
from .adapter.config import LoraConfig
from .adapter.weights import AdapterTensor, AdapterWeights, dtype_of, read_chunks, read_tensor
from .dtypes import canonical_dtype
from .errors import CheckpointFormatError, MergeError
from .inputs.base_choice import check_not_swapped, default_base
from .inputs.config import read_base_config
from .inputs.format import read_safetensors_header
from .inputs.index import open_checkpoint, open_merged
from .inputs.opened import check_unchanged, opened_files
from .inputs.reader import TensorReader
from .inputs.remote import RemoteBase, is_repo_ref, remote_base
from .inputs.resolve import resolve_adapter, resolve_base, with_revision
from .merging.checks import ValueCheck
from .merging.stream import run_plan
from .merging.variants import Combination, lora_scaling
from .names import ADAPTER_CONFIG_NAME, WEIGHTS_INDEX_NAME
from .outputs.card import AdapterSource, Provenance, input_files, shard_checksums, snapshot_commit, write_card
from .outputs.safetensors import CheckpointWriter, parse_size
from .outputs.staging import (
    adapter_tokenizer_files,
    check_free_space,
    check_not_inside,
    check_output_free,
    check_output_path,
    companion_files,
    copy_companions,
    discard,
    empty_directory,
    make_staging_dir,
    output_lock,
    publish,
    remove_stale,
    write_config,
)
from .plan.keymap import resolve_loader
from .plan.matching import (
    OUTPUT_DTYPES,
    TORCH_DTYPE_NAMES,
    Action,
    CoverageRow,
    MergePlan,
    TensorTask,
    build_plan,
    coverage,
)
from .progress import ProgressCallback, ProgressEvent, human_bytes, ignore_progress
from .verification.tensors import VerifyReport, check_against_plan, check_directory, expected_config

log = logging.getLogger(__name__)

# Tensors that may be tied copies of each other are compared this many bytes at a time.
COMPARE_CHUNK_BYTES = 8 << 20

# One adapter: a directory or repo id, optionally with the weight its delta gets: ("org/style", 0.5).
AdapterRef = str | Path | tuple[str | Path, float]
COMBINATIONS = tuple(c.value for c in Combination)


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


@dataclass(frozen=True)
class Inputs:
    """Resolved, validated inputs and the plan made from them; nothing has been written yet."""

    base_dir: Path
    adapter_dirs: tuple[Path, ...]
    base_config: dict[str, Any]
    architecture: str
    plan: MergePlan
    companions: tuple[Path, ...]
    coverage: tuple[CoverageRow, ...]  # every adapter tensor and what it does to the output
    adapter_weights: tuple[float, ...] = ()
    loras: tuple[str, ...] = ()  # per adapter: r, alpha, scaling and variants, for the model card
    base_shards: tuple[str, ...] = ()
    adapter_files: tuple[tuple[str, ...], ...] = ()  # per adapter: its weights file and config
    combination: str | None = None  # with several adapters
    subtract: bool = False

    @property
    def adapter_dir(self) -> Path:
        return self.adapter_dirs[0]


def merge(
    base: str | Path | None,
    adapter: AdapterRef | Sequence[AdapterRef],
    output: str | Path,
    *,
    dtype: str = "bf16",
    loader: str = "auto",
    hf_token: str | None = None,
    adapter_name: str | None = None,
    combine: str = "cat",
    subtract: bool = False,
    revision: str | None = None,
    adapter_revision: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    allow_unused: bool = False,
    dry_run: bool = False,
    allow_nonfinite: bool = False,
    checksum: bool = False,
    progress: ProgressCallback = ignore_progress,
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
    Raises MergeError (and subclasses) for bad input.
    """
    dtype = canonical_dtype(dtype)
    try:
        max_shard_bytes = parse_size(max_shard_size)
    except ValueError as exc:
        raise MergeError(f"--max-shard-size: {exc}") from exc
    output = check_output_path(output)
    # One merge at a time writes an output: taken before anything costly (downloads, planning), held to the end.
    with nullcontext() if dry_run else output_lock(output):
        refs = _adapter_refs(adapter, adapter_revision)
        base = _base_ref(base, refs, revision, hf_token, adapter_name)
        how = _combination(combine)
        if not dry_run:
            remove_stale(output)  # under the lock: nothing else can be writing there now
        timings: dict[str, float] = {}
        inputs = _prepare(
            base,
            refs,
            output,
            dtype,
            loader,
            hf_token,
            max_shard_bytes,
            overwrite,
            allow_unused,
            progress,
            timings,
            adapter_name=adapter_name,
            how=how,
            subtract=subtract,
        )
        if dry_run:
            return _result(inputs, output, dtype, 0, timings, dry_run=True)
        replaceable = empty_directory(output)  # without --overwrite, the only thing the result may take the place of
        check_free_space(output, inputs.plan.output_bytes + sum(p.stat().st_size for p in inputs.companions))
        staging, created = make_staging_dir(output)
        try:
            bytes_written, nonfinite = _write(inputs, staging, allow_nonfinite, progress, timings)
            started = time.perf_counter()
            progress(ProgressEvent("save", "start", str(output)))
            checksums, hashes = _finish(inputs, staging, dtype, base, [ref for ref, _ in refs], checksum)
            publish(staging, output, overwrite=overwrite, replaceable=replaceable)
        except BaseException:
            discard(staging, created)
            raise
    timings["save"] = time.perf_counter() - started
    progress(ProgressEvent("save", "done", str(output), elapsed=timings["save"]))
    return replace(
        _result(inputs, output, dtype, bytes_written, timings),
        nonfinite=nonfinite,
        checksums=checksums,
        inputs_sha256=hashes,
    )


def verify(
    base: str | Path | None,
    adapter: AdapterRef | Sequence[AdapterRef],
    merged: str | Path,
    *,
    loader: str = "auto",
    hf_token: str | None = None,
    adapter_name: str | None = None,
    allow_unused: bool = False,
    combine: str = "cat",
    subtract: bool = False,
    revision: str | None = None,
    adapter_revision: str | None = None,
    progress: ProgressCallback = ignore_progress,
) -> VerifyReport:
    """Prove that `merged` is `adapter` merged into `base`: every output tensor is derived again, streaming as a
    merge does, and compared byte for byte with the merged files, which must hold nothing else (no LoRA keys).
    Several adapters, weights, `combine` and `subtract` mean what they mean for `merge`. The directory must hold
    no other *.safetensors file (a stale shard) and the config.json the merge writes.

    The dtype is the merged checkpoint's own. A mismatch is reported in the result (`ok` is False), not raised;
    inputs that cannot be read raise MergeError as for a merge.
    """
    merged_index, merged_dtype = open_merged(Path(merged))
    dtype = {name: key for key, name in OUTPUT_DTYPES.items()}[merged_dtype]
    inputs = plan_merge(
        base,
        adapter,
        dtype=dtype,
        loader=loader,
        hf_token=hf_token,
        adapter_name=adapter_name,
        allow_unused=allow_unused,
        combine=combine,
        subtract=subtract,
        revision=revision,
        adapter_revision=adapter_revision,
        progress=progress,
    )
    with TensorReader() as reader:
        report = check_against_plan(inputs.plan, merged_index, reader)
    check_unchanged(opened_files(inputs.plan, merged_index))
    config = expected_config(inputs.base_config, TORCH_DTYPE_NAMES[OUTPUT_DTYPES[dtype]], inputs.plan.config_changes)
    return check_directory(report, merged_index, config)


def plan_merge(
    base: str | Path | None,
    adapter: AdapterRef | Sequence[AdapterRef],
    *,
    dtype: str = "bf16",
    loader: str = "auto",
    hf_token: str | None = None,
    adapter_name: str | None = None,
    allow_unused: bool = False,
    combine: str = "cat",
    subtract: bool = False,
    revision: str | None = None,
    adapter_revision: str | None = None,
    headers_only: bool = False,
    progress: ProgressCallback = ignore_progress,
) -> Inputs:
    """The inputs resolved and the merge planned, as a dry run plans it; nothing is written (`inspect --base`,
    `verify`). With `headers_only`, a hub base is read from its safetensors headers over HTTP (`remote`), its
    weights never downloaded: the plan can be checked but not run."""
    refs = _adapter_refs(adapter, adapter_revision)
    return _prepare(
        _base_ref(base, refs, revision, hf_token, adapter_name),
        refs,
        None,
        canonical_dtype(dtype),
        loader,
        hf_token,
        parse_size("5GB"),
        False,
        allow_unused,
        progress,
        {},
        adapter_name=adapter_name,
        how=_combination(combine),
        subtract=subtract,
        headers_only=headers_only,
    )


def _base_ref(
    base: str | Path | None,
    adapters: list[tuple[str, float]],
    revision: str | None,
    hf_token: str | None,
    adapter_name: str | None,
) -> str:
    """The base given, or else the one the adapters name, pinned to `revision`."""
    if base is None:
        named = default_base([ref for ref, _ in adapters], hf_token, adapter_name)
        log.info("base: %s (base_model_name_or_path in %s)", named.ref, named.source)
        base = named.ref
    return with_revision(str(base), revision)


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


def _combination(combine: str) -> Combination:
    try:
        return Combination(combine)
    except ValueError:
        raise MergeError(f"--combine {combine!r}: expected one of {', '.join(COMBINATIONS)}") from None


def _result(
    inputs: Inputs, output: Path, dtype: str, bytes_written: int, timings: dict[str, float], dry_run: bool = False
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
        shards=tuple(shard.file_name for shard in plan.shards),
        tensors_merged=plan.count(Action.MERGE),
        tensors_copied=plan.count(Action.COPY),
        tensors_converted=plan.count(Action.CONVERT),
        tensors_replaced=plan.count(Action.REPLACE),
        bytes_written=plan.output_bytes if dry_run else bytes_written,
        dry_run=dry_run,
        config_changes=dict(plan.config_changes),
        coverage=inputs.coverage,
        unused=plan.unused,
        reshaped=tuple(_reshaped(plan)),
        timings=timings,
    )


def _prepare(
    base: str,
    adapters: list[tuple[str, float]],
    output: Path | None,
    dtype: str,
    loader: str,
    hf_token: str | None,
    max_shard_bytes: int,
    overwrite: bool,
    allow_unused: bool,
    progress: ProgressCallback,
    timings: dict[str, float],
    *,
    adapter_name: str | None = None,
    how: Combination = Combination.CAT,
    subtract: bool = False,
    headers_only: bool = False,
) -> Inputs:
    with _stage("resolve", progress, timings) as stage:
        if output is not None:
            check_output_free(output, overwrite)
        remote = _remote_base(base, hf_token) if headers_only else None
        base_dir = remote.index.root if remote is not None else resolve_base(base, hf_token)
        adapter_dirs = [resolve_adapter(ref, hf_token, adapter_name) for ref, _ in adapters]
        check_not_swapped(base_dir, adapter_dirs, base, [ref for ref, _ in adapters])
        if output is not None:
            check_not_inside(output, [base_dir], may_hold=adapter_dirs)
        base_config = remote.config if remote is not None else read_base_config(base_dir)
        resolved_loader = resolve_loader(loader, base_config)
        stage.detail = resolved_loader.architecture
    with _stage("base", progress, timings) as stage:
        index = remote.index if remote is not None else open_checkpoint(base_dir)
        stage.detail = f"{len(index.tensors)} tensors in {len(index.files)} file(s), {human_bytes(index.total_bytes)}"
        if remote is not None:
            stage.detail += f", headers only: {human_bytes(remote.header_bytes)} read from the hub"
    with _stage("tokenizer", progress, timings) as stage:
        from_adapter = _adapters_tokenizer(adapter_dirs)
        overridden = {p.name for p in from_adapter} | {"config.json"}
        on_disk = companion_files(base_dir, index.weight_file_names) if remote is None else []
        companions = [p for p in on_disk if p.name not in overridden]
        stage.detail = f"{len(companions) + len(from_adapter)} files" + (
            f", tokenizer from the adapter ({len(from_adapter)} files)" if from_adapter else ""
        )
    with _stage("adapter", progress, timings) as stage:
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
                    dtype,
                    max_shard_bytes,
                    allow_unused=allow_unused,
                    same_values=lambda x, y, transpose: _same_values(x, y, transpose, reader),
                )

            if len(read) > 1:  # each against the base on its own first: its errors name its own files
                for adapter in read:
                    plan_for(scaled_config(adapter), adapter.weights)
            config, weights = adapter_to_merge(read, how, subtract)
            plan = plan_for(config, weights)
        rows = coverage(plan, weights)
        stage.detail = _adapter_detail(read[0], subtract) if len(read) == 1 else _combined_detail(read, how, subtract)
    return Inputs(
        base_dir=base_dir,
        adapter_dirs=tuple(adapter_dirs),
        base_config=base_config,
        architecture=resolved_loader.architecture,
        plan=plan,
        companions=tuple(companions + from_adapter),
        coverage=tuple(rows),
        adapter_weights=tuple(weight for _, weight in adapters),
        loras=tuple(_lora_summary(adapter.config, adapter.weights) for adapter in read),
        base_shards=tuple(sorted(index.weight_file_names)),
        adapter_files=tuple((adapter.weights.path.name, ADAPTER_CONFIG_NAME) for adapter in read),
        combination=how.value if len(read) > 1 else None,
        subtract=subtract,
    )


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


def _combined_detail(adapters: list[WeightedAdapter], how: Combination, subtract: bool) -> str:
    weights = ", ".join(f"{adapter.weight:g}" for adapter in adapters)
    modules = len({module for adapter in adapters for module in adapter.weights.pairs})
    verb = "subtracted" if subtract else "combined"
    return f"{len(adapters)} adapters {verb} ({how.value}, weights {weights}), {modules} LoRA modules"


def _reshaped(plan: MergePlan) -> list[str]:
    lines = []
    for task in plan.tasks:
        source = task.source
        if source is None or (source.name == task.output.name and source.shape == task.output.shape):
            continue
        what = task.note or f"resized from {source.shape}"
        lines.append(f"{task.output.name} {task.output.shape}: {what}")
    return lines


def _adapter_detail(adapter: WeightedAdapter, subtract: bool) -> str:
    """One adapter as its config describes it (its own r and alpha); a weight or a subtraction said apart."""
    config, weights = adapter.config, adapter.weights
    features = [
        name
        for name, on in (
            ("rsLoRA", config.use_rslora),
            ("DoRA", config.use_dora),
            ("lora_bias", config.lora_bias),
            (f"bias={config.bias}", config.bias != "none"),
            (f"{len(weights.replacements)} replaced tensors", bool(weights.replacements)),
        )
        if on
    ]
    applied = [f"weight {adapter.weight:g}"] if adapter.weight != 1.0 else []
    applied += ["subtracted"] if subtract else []
    return f"{len(weights.pairs)} LoRA modules, r={config.r}, alpha={config.lora_alpha:g}" + "".join(
        f", {f}" for f in features + applied
    )


def _lora_summary(config: Any, weights: AdapterWeights) -> str:
    """r, alpha and scaling, and what else changes the merge, in one line for the model card."""
    rule = "alpha/sqrt(r), rsLoRA" if config.use_rslora else "alpha/r"
    scaling = lora_scaling(config.lora_alpha, config.r, config.use_rslora)
    notes = [
        note
        for note, on in (
            (
                "rank_pattern/alpha_pattern give some modules their own",
                bool(config.rank_pattern or config.alpha_pattern),
            ),
            ("DoRA", config.use_dora),
            ("lora_bias", config.lora_bias),
            (f"bias={config.bias}", config.bias != "none"),
            (f"{len(weights.replacements)} tensors replaced (modules_to_save)", bool(weights.replacements)),
            ("trainable tokens", bool(weights.token_deltas)),
        )
        if on
    ]
    return f"r={config.r}, alpha={config.lora_alpha:g}, scaling={scaling:g} ({rule}), {len(weights.pairs)} modules" + (
        "".join(f"; {note}" for note in notes)
    )


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


def _write(
    inputs: Inputs,
    staging: Path,
    allow_nonfinite: bool,
    progress: ProgressCallback,
    timings: dict[str, float],
) -> tuple[int, tuple[str, ...]]:
    """Stream every tensor into the staging dir; returns the bytes written and the tensors kept with NaN/inf."""
    plan = inputs.plan
    values = ValueCheck(allow_nonfinite)
    total_tensors = len(plan.tasks)
    total_bytes = plan.output_bytes
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

    writer = CheckpointWriter(staging, list(plan.shards), {"format": "pt"})
    try:
        with TensorReader() as reader:
            run_plan(plan, reader, writer, on_tensor, values)
        writer.close()
    finally:
        writer.abort()
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
            bytes_done=writer.bytes_written,
            bytes_total=total_bytes,
        )
    )
    return writer.bytes_written, tuple(values.findings)


def _finish(
    inputs: Inputs, staging: Path, dtype: str, base: str, adapters: list[str], checksum: bool
) -> tuple[dict[str, str], dict[str, str]]:
    """Companion files, config.json, a re-read of what was written before it may be published, and the model card
    (README.md) with the hash of each input and, with `checksum`, each shard's SHA-256. Returns the shard
    checksums and the input hashes."""
    from . import __version__

    copy_companions(inputs.companions, staging)
    if inputs.base_config:
        write_config(inputs.base_config, TORCH_DTYPE_NAMES[OUTPUT_DTYPES[dtype]], staging, inputs.plan.config_changes)
    _check_written(inputs.plan, staging)
    several = len(inputs.adapter_dirs) > 1
    sources = [
        (f"adapter {number}" if several else "adapter", directory, names)
        for number, (directory, names) in enumerate(
            zip(inputs.adapter_dirs, inputs.adapter_files, strict=True), start=1
        )
    ]
    read = opened_files(inputs.plan)
    files = input_files(inputs.base_dir, inputs.base_shards, sources, read)
    checksums = shard_checksums(staging, [shard.file_name for shard in inputs.plan.shards]) if checksum else {}
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
    )
    write_card(staging, provenance)
    # Last, once every read is done: a weight file written to in place while it was read may have given bytes
    # of both versions.
    check_unchanged(read)
    return checksums, {f"{f.source}/{f.name}": f.sha256 for f in files if f.sha256}


def _check_written(plan: MergePlan, staging: Path) -> None:
    """Every planned tensor is in the shards exactly once with its dtype and shape, each shard ends where its
    last tensor does, and the index agrees (names and total size)."""
    found: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for shard in plan.shards:
        path = staging / shard.file_name
        header = read_safetensors_header(path)
        for entry in header.tensors:
            if entry.name in found:
                raise CheckpointFormatError(f"{path}: tensor '{entry.name}' was written twice")
            found[entry.name] = (entry.dtype, entry.shape, shard.file_name)
        end = header.tensors[-1].end if header.tensors else 0
        if sum(e.nbytes for e in header.tensors) != shard.nbytes or path.stat().st_size != end:
            raise CheckpointFormatError(f"{path}: written shard is not the planned size")
    expected = {t.output.name: (t.output.dtype, t.output.shape) for t in plan.tasks}
    if {k: v[:2] for k, v in found.items()} != expected:
        raise CheckpointFormatError(f"{staging}: written shards do not match the plan")
    if len(plan.shards) > 1:
        index = json.loads((staging / WEIGHTS_INDEX_NAME).read_text())
        weight_map = index["weight_map"]
        if index["metadata"]["total_size"] != plan.output_bytes or weight_map != {n: v[2] for n, v in found.items()}:
            raise CheckpointFormatError(f"{staging / WEIGHTS_INDEX_NAME}: index does not match the shards")


class _stage:
    """Times one stage and reports its start and end; `detail` set inside the block goes into the end event."""

    def __init__(self, name: str, progress: ProgressCallback, timings: dict[str, float]) -> None:
        self.name, self.progress, self.timings, self.detail = name, progress, timings, ""

    def __enter__(self) -> _stage:
        self.started = time.perf_counter()
        self.progress(ProgressEvent(self.name, "start"))
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.timings[self.name] = time.perf_counter() - self.started
            self.progress(ProgressEvent(self.name, "done", self.detail, elapsed=self.timings[self.name]))
