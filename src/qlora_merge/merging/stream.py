"""Execute a merge plan: read each tensor, copy, convert, replace or merge it, and stream it into the writer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from ..adapter.weights import AdapterTensor, dtype_of, load_factor, read_tensor
from ..inputs.format import DTYPES, TensorEntry
from ..inputs.reader import ByteRange, ReadAhead, TensorReader
from ..outputs.safetensors import CheckpointWriter
from ..plan.matching import Action, BiasUpdate, ExpertUpdate, LoraUpdate, MergePlan, TensorTask, TokenUpdate
from .checks import ValueCheck
from .variants import (
    MIN_BLOCK_ROWS,
    BlockingCheck,
    ExpertCheck,
    Layout,
    bias_delta,
    conv_merged,
    dora_conv,
    dora_rows_into,
    dora_whole,
    expert_delta,
    expert_deltas_whole,
    factor_dtype,
    held_weight,
    linear_delta_rows,
    merge_rows_into,
    replace_token_rows,
)

# Converting dtypes goes in pieces of this many bytes so a 1 GB embedding never sits in memory whole.
CONVERT_CHUNK_BYTES = 8 << 20

TensorDone = Callable[[TensorTask, int], None]
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


class ExpertDeltas:
    """One expert's delta at a time, for MoE LoRA (target_parameters): the factors of the last adapted parameter
    and the last expert's delta are kept, since a per-expert checkpoint splits one expert's delta over several
    consecutive tensors (gate_proj, up_proj) and every expert of a layer shares the factors."""

    def __init__(self, reader: TensorReader) -> None:
        self._reader = reader
        self._check = ExpertCheck()
        self._factors: tuple[tuple[str, ...], torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self._delta: tuple[tuple[str, ...], int, torch.Tensor] | None = None

    def delta(self, update: ExpertUpdate, expert: int) -> torch.Tensor:
        """Expert `expert`'s (d1, d2) delta, unrounded; valid until the next call, not to be written to."""
        keys = update.pair.keys
        if self._delta is not None and self._delta[:2] == (keys, expert):
            return self._delta[2]
        if self._factors is None or self._factors[0] != keys:
            self._factors = None  # the old factors go before the new ones come
            a = load_factor(update.pair.a, self._reader)
            b = load_factor(update.pair.b, self._reader)
            compute = factor_dtype(a.dtype, b.dtype)
            a, b = a.to(compute), b.to(compute)
            exact = self._check.per_expert(tuple(a.shape), tuple(b.shape), update.experts, compute)
            whole = None if exact else expert_deltas_whole(a, b, update.experts, update.scaling, update.transposed)
            self._factors = (keys, a, b, whole)
        _, a, b, whole = self._factors
        if whole is not None:
            delta = whole[expert]
        else:
            delta = expert_delta(a, b, update.experts, expert, update.scaling, update.transposed)
        self._delta = (keys, expert, delta)
        return delta


def run_plan(
    plan: MergePlan,
    reader: TensorReader,
    writer: CheckpointWriter,
    on_tensor: TensorDone,
    check: ValueCheck | None = None,
) -> None:
    """Write every planned tensor in order; `on_tensor(task, bytes_written_so_far)` after each one. `check` counts
    NaN, infinite and overflowing values in every block computed (copies are not decoded); its caller judges them.

    The arithmetic runs on one torch thread while the other core reads ahead and writes: torch's second thread
    on 1M-element blocks gains ~12% on an idle machine but made a 3B merge ~3x slower on a busy one.
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
        with ReadAhead(list(_input_ranges(plan, steps))) as ahead:
            for task in plan.tasks:
                writer.begin(task.output.name)
                if task.action is Action.COPY:
                    assert task.source is not None
                    source = task.source
                    writer.copy_from(reader.fd(source.file), source.start, source.nbytes, source.file)
                elif task.action is Action.CONVERT:
                    assert task.source is not None
                    _convert(task.source, task.output.dtype, ahead, writer, workspace, check)
                elif task.action is Action.REPLACE:
                    _replace(task, ahead, writer, workspace, check)
                elif isinstance(task.update, ExpertUpdate):
                    _merge_experts(task, task.update, deltas, reader, writer, workspace, check)
                else:
                    _merge(task, steps.get(task.output.name), reader, ahead, writer, workspace, check)
                writer.end()
                on_tensor(task, writer.bytes_written)
    finally:
        torch.set_num_threads(threads)
        CALLER_THREADS.reset(caller)


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


def _input_ranges(plan: MergePlan, steps: dict[str, int]) -> Iterator[ByteRange]:
    """The reads that stream through the merge, in the order it makes them, from the generators the merge itself
    reads by. Copies go file to file (announced, not fetched), and the few whole tensors (biases, column-normed
    DoRA) are read where they are used."""
    for task in plan.tasks:
        if task.action is Action.COPY:
            assert task.source is not None
            yield ByteRange(task.source.file, task.source.start, task.source.nbytes, fetch=False)
        elif task.action is Action.CONVERT:
            assert task.source is not None
            yield from _convert_ranges(task.source)
        elif task.action is Action.REPLACE:
            assert task.replacement is not None
            if isinstance(task.replacement.tensor, TensorEntry):
                yield from _convert_ranges(task.replacement.tensor)
        elif task.output.name in steps:
            for _, _, byte_range in _row_blocks(task, steps[task.output.name]):
                if byte_range is not None:
                    yield byte_range


def _convert_ranges(source: TensorEntry) -> Iterator[ByteRange]:
    """A tensor's bytes in chunks of about CONVERT_CHUNK_BYTES (whole elements)."""
    size = DTYPES[source.dtype][1]
    step = max(CONVERT_CHUNK_BYTES // size, 1) * size
    for offset in range(0, source.nbytes, step):
        yield ByteRange(source.file, source.start + offset, min(step, source.nbytes - offset))


def _row_blocks(task: TensorTask, step: int) -> Iterator[tuple[int, int, ByteRange | None]]:
    """Blocks of `step` rows of the weight a task updates: (start, stop, the bytes to read, or None when the weight
    is an adapter tensor already in memory)."""
    tensor = _rows_source(task)
    rows, cols = task.output.shape
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        if isinstance(tensor, TensorEntry):
            row_bytes = cols * DTYPES[tensor.dtype][1]
            yield start, stop, ByteRange(tensor.file, tensor.start + start * row_bytes, (stop - start) * row_bytes)
        else:
            yield start, stop, None


def _convert(
    source: TensorEntry,
    out_dtype_name: str,
    ahead: ReadAhead,
    writer: CheckpointWriter,
    workspace: Workspace,
    check: ValueCheck,
) -> None:
    in_dtype, in_size = DTYPES[source.dtype]
    out_dtype, out_size = DTYPES[out_dtype_name]
    for byte_range in _convert_ranges(source):
        piece = ahead.take(byte_range)
        if in_dtype == out_dtype:
            check.block(piece.view(in_dtype))
            writer.write(memoryview(piece.numpy()))
            continue
        converted = workspace.take("output", byte_range.nbytes // in_size * out_size)
        check.block(converted.view(out_dtype).copy_(piece.view(in_dtype)), piece.view(in_dtype))
        writer.write(memoryview(converted.numpy()))


def _replace(
    task: TensorTask, ahead: ReadAhead, writer: CheckpointWriter, workspace: Workspace, check: ValueCheck
) -> None:
    """The adapter's tensor, rounded once to the output dtype."""
    assert task.replacement is not None
    tensor = task.replacement.tensor
    if isinstance(tensor, TensorEntry):
        _convert(tensor, task.output.dtype, ahead, writer, workspace, check)
    else:
        _write_tensor(tensor, task, writer, workspace, check)


def _merge(
    task: TensorTask,
    step: int | None,
    reader: TensorReader,
    ahead: ReadAhead,
    writer: CheckpointWriter,
    workspace: Workspace,
    check: ValueCheck,
) -> None:
    """Merge one weight: a bias or a whole tensor at once where the math needs it, else a block of rows at a time."""
    update = task.update
    if isinstance(update, BiasUpdate):
        weight = _held_source(task, reader)
        delta = bias_delta(load_factor(update.tensor, reader), update.scaling)
        out = torch.empty(task.output.shape, dtype=DTYPES[task.output.dtype][0])
        merge_rows_into(weight, delta, torch.empty(weight.numel()), out)
        _write_tensor(out, task, writer, workspace, check)
        return
    if isinstance(update, TokenUpdate):
        assert step is not None
        _replace_tokens(task, update, step, reader, ahead, writer, workspace, check)
        return
    assert isinstance(update, LoraUpdate)
    a = load_factor(update.pair.a, reader)
    b = load_factor(update.pair.b, reader)
    compute = factor_dtype(a.dtype, b.dtype)
    a, b = a.to(compute), b.to(compute)
    magnitude = load_factor(update.pair.magnitude, reader) if update.pair.magnitude is not None else None
    if update.layout is Layout.CONV:
        weight = _held_source(task, reader)
        # oneDNN picks its convolution kernel by thread count, and the kernels round differently: the delta is
        # computed on the caller's threads, as PEFT computes it in the caller's process.
        with _torch_threads(CALLER_THREADS.get()):
            if magnitude is None:
                merged = conv_merged(weight, a, b, update.scaling)
            else:
                merged = dora_conv(weight, a, b, update.scaling, magnitude)
        _write_tensor(merged, task, writer, workspace, check)
        return
    if update.whole:
        assert magnitude is not None
        merged = dora_whole(_held_source(task, reader), a, b, update.scaling, magnitude)
        _write_tensor(merged, task, writer, workspace, check)
        return
    cols = task.output.shape[1]
    assert step is not None
    round_to = DTYPES[task.held_dtype][0] if update.round_delta else None
    for start, stop, weight in _weight_rows(task, step, ahead, workspace):
        n = stop - start
        scratch = workspace.take("scratch", max(n, MIN_BLOCK_ROWS) * cols * compute.itemsize).view(compute)
        delta = linear_delta_rows(a, b, update.scaling, update.transposed, start, stop, scratch)
        block_magnitude = magnitude[start:stop] if magnitude is not None else None
        _add_round_write(weight, delta, task, round_to, block_magnitude, writer, workspace, check)


def _add_round_write(
    weight: torch.Tensor,
    delta: torch.Tensor,
    task: TensorTask,
    round_to: torch.dtype | None,
    magnitude: torch.Tensor | None,
    writer: CheckpointWriter,
    workspace: Workspace,
    check: ValueCheck,
) -> None:
    """W + delta (DoRA-scaled by `magnitude` where given; the delta first rounded to `round_to` where given) for a
    block of rows, rounded to the output dtype, value-checked and written. `delta` is overwritten."""
    n, cols = weight.shape
    out_dtype, out_size = DTYPES[task.output.dtype]
    upcast = workspace.take("upcast", n * cols * 4).view(torch.float32)
    raw = workspace.take("output", n * cols * out_size)
    merged = raw.view(out_dtype).view(n, cols)
    if magnitude is not None:
        unrounded = dora_rows_into(weight, delta, magnitude, upcast, merged)
    else:
        rounding = workspace.take("rounding", n * cols * round_to.itemsize).view(round_to) if round_to else None
        unrounded = merge_rows_into(weight, delta, upcast, merged, round_delta_to=round_to, rounding=rounding)
    check.block(merged, unrounded)
    writer.write(memoryview(raw.numpy()))


def _merge_experts(
    task: TensorTask,
    update: ExpertUpdate,
    deltas: ExpertDeltas,
    reader: TensorReader,
    writer: CheckpointWriter,
    workspace: Workspace,
    check: ValueCheck,
) -> None:
    """MoE LoRA, one expert's 2-D weight at a time: the fused (E, d1, d2) tensor expert by expert, or one per-expert
    tensor (rows of its expert's delta). PEFT rounds the delta to the weight's dtype, then adds."""
    source = task.source
    assert source is not None and task.replacement is None
    held = DTYPES[task.held_dtype][0]
    in_dtype, in_size = DTYPES[source.dtype]
    rows, cols = task.output.shape[-2:]
    for expert in range(update.experts) if update.expert is None else (update.expert,):
        delta = deltas.delta(update, expert)
        if update.rows is not None:
            delta = delta[update.rows[0] : update.rows[1]]
            weight = reader.read(source).view(rows, cols)
        else:
            raw_in = workspace.take("input", rows * cols * in_size)
            reader.read_bytes_into(source.file, source.start + expert * rows * cols * in_size, raw_in)
            weight = raw_in.view(in_dtype).view(rows, cols)
        work = workspace.take("scratch", rows * cols * delta.element_size()).view(delta.dtype).view(rows, cols)
        work.copy_(delta)  # the sum overwrites its delta; the cached one is reused
        _add_round_write(weight, work, task, held, None, writer, workspace, check)


def _replace_tokens(
    task: TensorTask,
    update: TokenUpdate,
    step: int,
    reader: TensorReader,
    ahead: ReadAhead,
    writer: CheckpointWriter,
    workspace: Workspace,
    check: ValueCheck,
) -> None:
    """Trainable tokens: the weight as it is, a chunk of rows at a time, with the trained rows put in."""
    cols = task.output.shape[1]
    out_dtype, out_size = DTYPES[task.output.dtype]
    held = DTYPES[task.held_dtype][0]
    indices = torch.tensor(update.indices, dtype=torch.int64)
    values = read_tensor(update.delta, reader)
    for start, stop, block in _weight_rows(task, step, ahead, workspace):
        raw = workspace.take("output", (stop - start) * cols * out_size)
        out = raw.view(out_dtype).view(stop - start, cols)
        out.copy_(block)
        replace_token_rows(out, start, indices, values, held)
        check.block(out)
        writer.write(memoryview(raw.numpy()))


def _rows_source(task: TensorTask) -> AdapterTensor:
    """The weight a LoRA delta is added to: the base's, or the adapter's replacement of it."""
    if task.replacement is not None:
        return task.replacement.tensor
    assert task.source is not None
    return task.source


def _weight_rows(
    task: TensorTask, step: int, ahead: ReadAhead, workspace: Workspace
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The weight being merged, `step` rows at a time, as PEFT holds it: the base's, or the adapter's replacement
    rounded to the dtype the model was loaded in (into a reused buffer, not a new tensor per block). Yields
    (start, stop, rows), the rows valid until the next block."""
    tensor = _rows_source(task)
    dtype = dtype_of(tensor)
    cols = task.output.shape[1]
    held = DTYPES[task.held_dtype][0]
    rounds = task.replacement is not None and held != dtype
    for start, stop, byte_range in _row_blocks(task, step):
        rows = tensor[start:stop] if byte_range is None else ahead.take(byte_range).view(dtype).view(stop - start, cols)
        if rounds:
            rows = workspace.take("held", rows.numel() * held.itemsize).view(held).view(rows.shape).copy_(rows)
        yield start, stop, rows


def _held_source(task: TensorTask, reader: TensorReader) -> torch.Tensor:
    """The whole weight being merged, in the dtype PEFT holds it in."""
    if task.replacement is not None:
        weight = read_tensor(task.replacement.tensor, reader)
    else:
        assert task.source is not None
        weight = reader.read(task.source)
    return held_weight(weight, DTYPES[task.held_dtype][0])


def _write_tensor(
    values: torch.Tensor, task: TensorTask, writer: CheckpointWriter, workspace: Workspace, check: ValueCheck
) -> None:
    """Round a tensor held in memory to the output dtype and write it in row-major order, a chunk at a time."""
    out_dtype, out_size = DTYPES[task.output.dtype]
    flat_rows = values.reshape(values.shape[0], -1) if values.dim() > 1 else values.view(-1, 1)
    cols = flat_rows.shape[1]
    step = _chunk_rows(cols, out_size)
    for start in range(0, flat_rows.shape[0], step):
        stop = min(flat_rows.shape[0], start + step)
        raw = workspace.take("output", (stop - start) * cols * out_size)
        check.block(raw.view(out_dtype).view(stop - start, cols).copy_(flat_rows[start:stop]), flat_rows[start:stop])
        writer.write(memoryview(raw.numpy()))
