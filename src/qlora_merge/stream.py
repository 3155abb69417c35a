"""Execute a merge plan: read each base tensor, copy, convert or merge it, and stream it into the writer."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .adapter.weights import load_factor
from .checkpoint.format import DTYPES
from .checkpoint.reader import TensorReader
from .checkpoint.writer import CheckpointWriter
from .plan import Action, MergePlan, TensorTask
from .variants import MIN_BLOCK_ROWS, BlockingCheck, factor_dtype, linear_delta_rows, merge_rows_into

# Converting dtypes goes in pieces of this many bytes so a 1 GB embedding never sits in memory whole.
CONVERT_CHUNK_BYTES = 64 << 20

TensorDone = Callable[[TensorTask, int], None]


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


def run_plan(plan: MergePlan, reader: TensorReader, writer: CheckpointWriter, on_tensor: TensorDone) -> None:
    """Write every planned tensor in order; `on_tensor(task, bytes_written_so_far)` after each one."""
    workspace = Workspace()
    blocking = BlockingCheck()
    for task in plan.tasks:
        writer.begin(task.output.name)
        if task.action is Action.COPY:
            writer.copy_from(reader.fd(task.source.file), task.source.start, task.source.nbytes)
        elif task.action is Action.CONVERT:
            _convert(task, reader, writer, workspace)
        else:
            _merge(task, reader, writer, workspace, blocking)
        writer.end()
        on_tensor(task, writer.bytes_written)


def _convert(task: TensorTask, reader: TensorReader, writer: CheckpointWriter, workspace: Workspace) -> None:
    source = task.source
    in_dtype, in_size = DTYPES[source.dtype]
    out_dtype, out_size = DTYPES[task.output.dtype]
    step = max(CONVERT_CHUNK_BYTES // in_size, 1) * in_size
    for offset in range(0, source.nbytes, step):
        count = min(step, source.nbytes - offset)
        piece = workspace.take("input", count)
        reader.read_bytes_into(source.file, source.start + offset, piece)
        converted = workspace.take("output", count // in_size * out_size)
        converted.view(out_dtype).copy_(piece.view(in_dtype))
        writer.write(memoryview(converted.numpy()))


def _merge(
    task: TensorTask, reader: TensorReader, writer: CheckpointWriter, workspace: Workspace, blocking: BlockingCheck
) -> None:
    """Merge one weight block of rows at a time: read the rows, add their delta, round, write."""
    update = task.update
    assert update is not None
    source = task.source
    a = load_factor(update.pair.a, reader)
    b = load_factor(update.pair.b, reader)
    compute = factor_dtype(a.dtype, b.dtype)
    a, b = a.to(compute), b.to(compute)
    in_dtype, in_size = DTYPES[source.dtype]
    out_dtype, out_size = DTYPES[task.output.dtype]
    rows, cols = source.shape
    step = blocking.rows_per_block(rows, cols, a, b, update.transposed)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        n = stop - start
        raw = workspace.take("input", n * cols * in_size)
        reader.read_bytes_into(source.file, source.start + start * cols * in_size, raw)
        scratch = workspace.take("scratch", max(n, MIN_BLOCK_ROWS) * cols * compute.itemsize).view(compute)
        delta = linear_delta_rows(a, b, update.scaling, update.transposed, start, stop, scratch)
        upcast = workspace.take("upcast", n * cols * 4).view(torch.float32)
        merged = workspace.take("output", n * cols * out_size)
        merge_rows_into(raw.view(in_dtype).view(n, cols), delta, upcast, merged.view(out_dtype).view(n, cols))
        writer.write(memoryview(merged.numpy()))
