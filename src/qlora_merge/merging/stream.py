"""Execute a merge plan: read each tensor from its source, copy, convert, replace or merge it, and stream it into
the sink. Formats are the sources' and the sink's business: here a base tensor is a run of values, an output
tensor a run of bytes."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from ..adapter.weights import AdapterTensor, dtype_of, load_factor, read_tensor
from ..inputs.format import DTYPES, TensorEntry
from ..inputs.reader import ByteRange, ReadAhead, TensorReader
from ..inputs.sources import SafetensorsSource, Source
from ..outputs.sink import Sink
from ..plan.tasks import Action, BiasUpdate, ExpertUpdate, LoraUpdate, MergePlan, TensorTask, TokenUpdate
from .blocking import BlockingCheck
from .checks import ValueCheck
from .expert_deltas import ExpertDeltas
from .fused import FUSED
from .twocore import arithmetic_helper, fused_blocks, io_rows
from .variants import (
    MIN_BLOCK_ROWS,
    Layout,
    bias_delta,
    conv_merged,
    dora_conv,
    dora_rows_into,
    dora_whole,
    factor_dtype,
    held_weight,
    linear_delta_rows,
    merge_rows_into,
    replace_token_rows,
)

# Converting dtypes goes in pieces of this many bytes so a 1 GB embedding never sits in memory whole.
CONVERT_CHUNK_BYTES = 8 << 20

TensorDone = Callable[[TensorTask, int], None]
# Adapter tensors (a modules_to_save replacement, a trainable-tokens delta) are always safetensors.
ADAPTER_SOURCE = SafetensorsSource()
# The torch thread count of whoever runs the plan, which runs its own arithmetic on one thread.
CALLER_THREADS: ContextVar[int] = ContextVar("caller_threads", default=1)


class Workspace:
    """Buffers reused from tensor to tensor, grown to the largest tensor seen.

    A fresh tensor-sized allocation per merge makes the kernel hand out and zero pages every time, which cost
    more than the merge itself (system time was twice user time); reusing three buffers removes that.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, role: str, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of exactly `nbytes` for `role`, valid until the next take of that role."""
        buffer = self._buffers.get(role)
        if buffer is None or buffer.numel() < nbytes:
            self._buffers.pop(role, None)
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            self._buffers[role] = buffer
        return buffer[:nbytes]


def run_plan(
    plan: MergePlan,
    source: Source,
    reader: TensorReader,
    sink: Sink,
    on_tensor: TensorDone,
    check: ValueCheck | None = None,
) -> None:
    """Write every planned tensor in order into `sink` (started with the plan's layout here, finished by the
    caller); `on_tensor(task, bytes_written_so_far)` after each one. Base tensors are read from `source`, adapter
    tensors through `reader`. `check` counts NaN, infinite and overflowing values in every block computed (raw
    copies are not decoded); its caller judges them.

    Torch runs on one thread: its second thread on 1M-element blocks gained ~12% on an idle machine but made a 3B
    merge ~3x slower on a busy one. The second core comes in as a helper thread computing every other block of a
    LoRA merge (merging/twocore.py), while the reader and writer threads mostly wait on the disk.
    """
    check = check or ValueCheck()
    threads = torch.get_num_threads()
    caller = CALLER_THREADS.set(threads)
    torch.set_num_threads(1)
    try:
        blocking = BlockingCheck()
        steps = {t.output.name: step for t in plan.tasks if (step := _rows_per_block(t, blocking)) is not None}
        workspace = Workspace()
        deltas = ExpertDeltas(reader)
        sink.start([task.output for task in plan.tasks])
        with ReadAhead(list(_input_ranges(plan, source, steps))) as ahead, arithmetic_helper() as helper:
            io = _Streams(source, reader, ahead, sink, workspace, check, helper)
            for task in plan.tasks:
                sink.begin(task.output.name)
                raw = source.raw(task.source) if task.action is Action.COPY and task.source is not None else None
                if raw is not None:
                    sink.copy_from(reader.fd(raw.path), raw.offset, raw.nbytes, raw.path)
                elif task.action in (Action.COPY, Action.CONVERT):
                    assert task.source is not None
                    _convert(task.source, source, task.output.dtype, io)
                elif task.action is Action.REPLACE:
                    _replace(task, io)
                elif isinstance(task.update, ExpertUpdate):
                    _merge_experts(task, task.update, deltas, io)
                else:
                    _merge(task, steps.get(task.output.name), io)
                sink.end()
                on_tensor(task, sink.bytes_written)
    finally:
        torch.set_num_threads(threads)
        CALLER_THREADS.reset(caller)


@dataclass(frozen=True)
class _Streams:
    """What every step of the merge reads from and writes to."""

    source: Source  # the base's tensors
    reader: TensorReader  # adapter tensors, and whole base tensors read where they are used
    ahead: ReadAhead  # the reads the merge streams through, fetched ahead
    sink: Sink
    workspace: Workspace
    check: ValueCheck
    helper: Executor | None = None  # a thread that computes blocks on the second core

    def elements(self, entry: TensorEntry, start: int, stop: int, source: Source) -> torch.Tensor:
        """Elements [start, stop) of `entry`, 1-D, through the read-ahead (in the order _input_ranges announced)."""
        data = self.ahead.take_all(source.reads(entry, start, stop))
        return source.decode(entry, start, stop, data)

    def write(self, raw: torch.Tensor) -> None:
        self.sink.write(memoryview(raw.numpy()))

    def output(self, nbytes: int) -> tuple[torch.Tensor, bool]:
        """A uint8 buffer for the current tensor's next `nbytes` bytes: the sink's own space where it offers it
        (True: commit() it once filled), else a reused one to write()."""
        claim = getattr(self.sink, "claim", None)
        space = claim(nbytes) if claim is not None else None
        if space is None:
            return self.workspace.take("output", nbytes), False
        return torch.frombuffer(space, dtype=torch.uint8), True

    def commit(self, raw: torch.Tensor, claimed: bool) -> None:
        if claimed:
            self.sink.commit(raw.numel())  # type: ignore[attr-defined]
        else:
            self.write(raw)


@contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _rows_per_block(task: TensorTask, blocking: BlockingCheck) -> int | None:
    """How many rows of its weight a task takes at a time: a LoRA delta's block, or a chunk of trainable-token
    rows; None for tasks that do not go by rows (biases and column-normed DoRA are merged whole)."""
    update = task.update
    if isinstance(update, TokenUpdate):
        return _chunk_rows(task.output.shape[1], DTYPES[task.output.dtype][1])
    if not isinstance(update, LoraUpdate) or update.whole:
        return None
    a, b = update.pair.a, update.pair.b
    rows, cols = task.output.shape
    compute = factor_dtype(dtype_of(a), dtype_of(b))
    dora = update.pair.magnitude is not None
    return blocking.rows_per_block(rows, cols, tuple(a.shape), tuple(b.shape), compute, update.transposed, dora)


def _chunk_rows(cols: int, item_size: int) -> int:
    """Rows of `cols` elements of `item_size` bytes in one chunk of about CONVERT_CHUNK_BYTES."""
    return max(CONVERT_CHUNK_BYTES // max(cols * item_size, 1), 1)


def _input_ranges(plan: MergePlan, source: Source, steps: dict[str, int]) -> Iterator[ByteRange]:
    """The reads that stream through the merge, in the order it makes them, from the generators the merge itself
    reads by. Raw copies go file to file (announced, not fetched), and the few whole tensors (biases,
    column-normed DoRA) are read where they are used."""
    for task in plan.tasks:
        if task.action in (Action.COPY, Action.CONVERT):
            assert task.source is not None
            raw = source.raw(task.source) if task.action is Action.COPY else None
            if raw is not None:
                yield raw
            else:
                for start, stop in _convert_chunks(task.source):
                    yield from source.reads(task.source, start, stop)
        elif task.action is Action.REPLACE:
            assert task.replacement is not None
            tensor = task.replacement.tensor
            if isinstance(tensor, TensorEntry):
                for start, stop in _convert_chunks(tensor):
                    yield from ADAPTER_SOURCE.reads(tensor, start, stop)
        elif task.output.name in steps:
            tensor, rows_from = _rows_source(task, source)
            if isinstance(tensor, TensorEntry):
                cols = task.output.shape[1]
                for start, stop in _row_blocks(task, io_rows(task, steps[task.output.name])):
                    yield from rows_from.reads(tensor, start * cols, stop * cols)


def _convert_chunks(entry: TensorEntry) -> Iterator[tuple[int, int]]:
    """A tensor's elements in runs of about CONVERT_CHUNK_BYTES: (start, stop)."""
    numel = math.prod(entry.shape)
    step = max(CONVERT_CHUNK_BYTES // DTYPES[entry.dtype][1], 1)
    for start in range(0, numel, step):
        yield start, min(numel, start + step)


def _row_blocks(task: TensorTask, step: int) -> Iterator[tuple[int, int]]:
    """Blocks of `step` rows of the weight a task updates: (start, stop)."""
    rows = task.output.shape[0]
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _convert(entry: TensorEntry, source: Source, out_dtype_name: str, io: _Streams) -> None:
    """A tensor's values in the output dtype, a chunk at a time (same dtype: as decoded)."""
    out_dtype, out_size = DTYPES[out_dtype_name]
    for start, stop in _convert_chunks(entry):
        values = io.elements(entry, start, stop, source)
        if values.dtype == out_dtype:
            io.check.block(values)
            io.write(values.view(torch.uint8))
            continue
        converted = io.workspace.take("output", (stop - start) * out_size)
        io.check.block(converted.view(out_dtype).copy_(values), values)
        io.write(converted)


def _replace(task: TensorTask, io: _Streams) -> None:
    """The adapter's tensor, rounded once to the output dtype."""
    assert task.replacement is not None
    tensor = task.replacement.tensor
    if isinstance(tensor, TensorEntry):
        _convert(tensor, ADAPTER_SOURCE, task.output.dtype, io)
    else:
        _write_tensor(tensor, task, io)


def _merge(task: TensorTask, step: int | None, io: _Streams) -> None:
    """Merge one weight: a bias or a whole tensor at once where the math needs it, else a block of rows at a time."""
    update, reader = task.update, io.reader
    if isinstance(update, BiasUpdate):
        weight = _held_source(task, io)
        delta = bias_delta(load_factor(update.tensor, reader), update.scaling)
        out = torch.empty(task.output.shape, dtype=DTYPES[task.output.dtype][0])
        merge_rows_into(weight, delta, torch.empty(weight.numel()), out)
        _write_tensor(out, task, io)
        return
    if isinstance(update, TokenUpdate):
        assert step is not None
        _replace_tokens(task, update, step, io)
        return
    assert isinstance(update, LoraUpdate)
    a = load_factor(update.pair.a, reader)
    b = load_factor(update.pair.b, reader)
    compute = factor_dtype(a.dtype, b.dtype)
    a, b = a.to(compute), b.to(compute)
    magnitude = load_factor(update.pair.magnitude, reader) if update.pair.magnitude is not None else None
    if update.layout is Layout.CONV:
        weight = _held_source(task, io)
        # oneDNN picks its convolution kernel by thread count, and the kernels round differently: the delta is
        # computed on the caller's threads, as PEFT computes it in the caller's process.
        with _torch_threads(CALLER_THREADS.get()):
            if magnitude is None:
                merged = conv_merged(weight, a, b, update.scaling)
            else:
                merged = dora_conv(weight, a, b, update.scaling, magnitude)
        _write_tensor(merged, task, io)
        return
    if update.whole:
        assert magnitude is not None
        merged = dora_whole(_held_source(task, io), a, b, update.scaling, magnitude)
        _write_tensor(merged, task, io)
        return
    cols = task.output.shape[1]
    assert step is not None
    round_to = DTYPES[task.held_dtype][0] if update.round_delta else None
    out_dtype = DTYPES[task.output.dtype][0]
    # What the compiled pass computes: a plain LoRA product added to W; the rest goes the torch way.
    plain = magnitude is None and round_to is None and not update.transposed and compute == torch.float32
    for start, stop, rows in _weight_rows(task, io_rows(task, step), io):
        if plain and FUSED.available(rows.dtype, out_dtype):  # the dtype of the rows as read, checked once per pair
            fused_blocks(a, b, update.scaling, start, stop, step, rows, DTYPES[task.output.dtype][0], io)
            continue
        for first in range(start, stop, step):
            last = min(stop, first + step)
            weight = rows[first - start : last - start]
            nbytes = max(last - first, MIN_BLOCK_ROWS) * cols * compute.itemsize
            scratch = io.workspace.take("scratch", nbytes).view(compute)
            delta = linear_delta_rows(a, b, update.scaling, update.transposed, first, last, scratch)
            block_magnitude = magnitude[first:last] if magnitude is not None else None
            _add_round_write(weight, delta, task, round_to, block_magnitude, io)


def _add_round_write(
    weight: torch.Tensor,
    delta: torch.Tensor,
    task: TensorTask,
    round_to: torch.dtype | None,
    magnitude: torch.Tensor | None,
    io: _Streams,
) -> None:
    """W + delta (DoRA-scaled by `magnitude` where given; the delta first rounded to `round_to` where given) for a
    block of rows, rounded to the output dtype, value-checked and written. `delta` is overwritten."""
    n, cols = weight.shape
    out_dtype, out_size = DTYPES[task.output.dtype]
    upcast = io.workspace.take("upcast", n * cols * 4).view(torch.float32)
    raw = io.workspace.take("output", n * cols * out_size)
    merged = raw.view(out_dtype).view(n, cols)
    if magnitude is not None:
        unrounded = dora_rows_into(weight, delta, magnitude, upcast, merged)
    else:
        rounding = io.workspace.take("rounding", n * cols * round_to.itemsize).view(round_to) if round_to else None
        unrounded = merge_rows_into(weight, delta, upcast, merged, round_delta_to=round_to, rounding=rounding)
    io.check.block(merged, unrounded)
    io.write(raw)


def _merge_experts(task: TensorTask, update: ExpertUpdate, deltas: ExpertDeltas, io: _Streams) -> None:
    """MoE LoRA, one expert's 2-D weight at a time: the fused (E, d1, d2) tensor expert by expert, or one per-expert
    tensor (rows of its expert's delta). PEFT rounds the delta to the weight's dtype, then adds."""
    entry = task.source
    assert entry is not None and task.replacement is None
    held = DTYPES[task.held_dtype][0]
    rows, cols = task.output.shape[-2:]
    for expert in range(update.experts) if update.expert is None else (update.expert,):
        delta = deltas.delta(update, expert)
        if update.rows is not None:
            delta = delta[update.rows[0] : update.rows[1]]
            weight = io.source.read(entry, io.reader).view(rows, cols)
        else:
            buffer = io.workspace.take("input", rows * cols * entry.torch_dtype.itemsize)
            first = expert * rows * cols
            weight = io.source.read_elements(entry, first, first + rows * cols, io.reader, buffer).view(rows, cols)
        work = io.workspace.take("scratch", rows * cols * delta.element_size()).view(delta.dtype).view(rows, cols)
        work.copy_(delta)  # the sum overwrites its delta; the cached one is reused
        _add_round_write(weight, work, task, held, None, io)


def _replace_tokens(task: TensorTask, update: TokenUpdate, step: int, io: _Streams) -> None:
    """Trainable tokens: the weight as it is, a chunk of rows at a time, with the trained rows put in."""
    cols = task.output.shape[1]
    out_dtype, out_size = DTYPES[task.output.dtype]
    held = DTYPES[task.held_dtype][0]
    indices = torch.tensor(update.indices, dtype=torch.int64)
    values = read_tensor(update.delta, io.reader)
    for start, stop, block in _weight_rows(task, step, io):
        raw = io.workspace.take("output", (stop - start) * cols * out_size)
        out = raw.view(out_dtype).view(stop - start, cols)
        out.copy_(block)
        replace_token_rows(out, start, indices, values, held)
        io.check.block(out)
        io.write(raw)


def _rows_source(task: TensorTask, base: Source) -> tuple[AdapterTensor, Source]:
    """The weight a LoRA delta is added to, and its source: the base's, or the adapter's replacement of it."""
    if task.replacement is not None:
        return task.replacement.tensor, ADAPTER_SOURCE
    assert task.source is not None
    return task.source, base


def _weight_rows(task: TensorTask, step: int, io: _Streams) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The weight being merged, `step` rows at a time, as PEFT holds it: the base's, or the adapter's replacement
    rounded to the dtype the model was loaded in (into a reused buffer, not a new tensor per block). Yields
    (start, stop, rows), the rows valid until the next block."""
    tensor, source = _rows_source(task, io.source)
    dtype = dtype_of(tensor)
    cols = task.output.shape[1]
    held = DTYPES[task.held_dtype][0]
    rounds = task.replacement is not None and held != dtype
    for start, stop in _row_blocks(task, step):
        if isinstance(tensor, TensorEntry):
            rows = io.elements(tensor, start * cols, stop * cols, source).view(stop - start, cols)
        else:
            rows = tensor[start:stop]
        if rounds:
            rows = io.workspace.take("held", rows.numel() * held.itemsize).view(held).view(rows.shape).copy_(rows)
        yield start, stop, rows


def _held_source(task: TensorTask, io: _Streams) -> torch.Tensor:
    """The whole weight being merged, in the dtype PEFT holds it in."""
    if task.replacement is not None:
        weight = read_tensor(task.replacement.tensor, io.reader)
    else:
        assert task.source is not None
        weight = io.source.read(task.source, io.reader)
    return held_weight(weight, DTYPES[task.held_dtype][0])


def _write_tensor(values: torch.Tensor, task: TensorTask, io: _Streams) -> None:
    """Round a tensor held in memory to the output dtype and write it in row-major order, a chunk at a time."""
    out_dtype, out_size = DTYPES[task.output.dtype]
    flat_rows = values.reshape(values.shape[0], -1) if values.dim() > 1 else values.view(-1, 1)
    cols = flat_rows.shape[1]
    step = _chunk_rows(cols, out_size)
    for start in range(0, flat_rows.shape[0], step):
        stop = min(flat_rows.shape[0], start + step)
        raw = io.workspace.take("output", (stop - start) * cols * out_size)
        io.check.block(raw.view(out_dtype).view(stop - start, cols).copy_(flat_rows[start:stop]), flat_rows[start:stop])
        io.write(raw)
