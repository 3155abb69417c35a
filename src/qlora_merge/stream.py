"""Execute a merge plan: read each base tensor, copy, convert or merge it, and stream it into the writer."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .adapter.weights import load_factor
from .checkpoint.format import DTYPES
from .checkpoint.reader import TensorReader
from .checkpoint.writer import CheckpointWriter
from .plan import Action, MergePlan, TensorTask
from .variants import merge_linear

# Converting dtypes goes in pieces of this many bytes so a 1 GB embedding never sits in memory whole.
CONVERT_CHUNK_BYTES = 64 << 20

TensorDone = Callable[[TensorTask, int], None]


def run_plan(plan: MergePlan, reader: TensorReader, writer: CheckpointWriter, on_tensor: TensorDone) -> None:
    """Write every planned tensor in order; `on_tensor(task, bytes_written_so_far)` after each one."""
    for task in plan.tasks:
        writer.begin(task.output.name)
        if task.action is Action.COPY:
            writer.copy_from(reader.fd(task.source.file), task.source.start, task.source.nbytes)
        elif task.action is Action.CONVERT:
            _convert(task, reader, writer)
        else:
            _merge(task, reader, writer)
        writer.end()
        on_tensor(task, writer.bytes_written)


def _convert(task: TensorTask, reader: TensorReader, writer: CheckpointWriter) -> None:
    source = task.source
    in_dtype, in_size = DTYPES[source.dtype]
    out_dtype = DTYPES[task.output.dtype][0]
    step = max(CONVERT_CHUNK_BYTES // in_size, 1) * in_size
    buffer = torch.empty(min(step, source.nbytes), dtype=torch.uint8)
    for offset in range(0, source.nbytes, step):
        piece = buffer[: min(step, source.nbytes - offset)]
        reader.read_bytes_into(source.file, source.start + offset, piece)
        writer.write(_as_bytes(piece.view(in_dtype).to(out_dtype)))


def _merge(task: TensorTask, reader: TensorReader, writer: CheckpointWriter) -> None:
    update = task.update
    assert update is not None
    weight = reader.read(task.source)
    a = load_factor(update.pair.a, reader)
    b = load_factor(update.pair.b, reader)
    merged = merge_linear(weight, a, b, update.scaling, update.transposed, DTYPES[task.output.dtype][0])
    writer.write(_as_bytes(merged))


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
