"""A plain LoRA weight merged on both cores: blocks of rows, each `torch.mm(B, A)` then the compiled pass
(fused.py), taken by the main thread and a helper thread from a shared counter. Both calls release the GIL; the
blocks are the ones blocking.py proved exact, so which thread computes one changes no bit."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from ..plan.tasks import LoraUpdate, TensorTask
from .fused import FUSED
from .variants import MIN_BLOCK_ROWS, linear_delta_rows

if TYPE_CHECKING:
    from .stream import _Streams

# LoRA merges read and write this many blocks of rows at a time, shared out between the cores that compute them.
PAIRED_BLOCKS = 2


def io_rows(task: TensorTask, step: int) -> int:
    """Rows read and written at a time for a task computed in blocks of `step` rows: a LoRA merge takes
    PAIRED_BLOCKS blocks at once, so that two cores can compute them side by side; the blocks themselves, and so
    the bits, are the same as one at a time."""
    return step * PAIRED_BLOCKS if isinstance(task.update, LoraUpdate) else step


@contextmanager
def arithmetic_helper() -> Iterator[Executor | None]:
    """A second arithmetic thread where this process may run on two cores or more (QLORA_MERGE_THREADS=1: not),
    else None."""
    if len(os.sched_getaffinity(0)) < 2 or os.environ.get("QLORA_MERGE_THREADS", "2") == "1":
        yield None
        return
    # torch's thread count is per thread for OpenMP: left at its default, the helper's products would each start
    # a team of threads that spin on the cores the merge needs (user time doubled, wall time up 50%).
    with ThreadPoolExecutor(1, "qlora-merge-arithmetic", initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield pool


def fused_blocks(
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    start: int,
    stop: int,
    step: int,
    rows: torch.Tensor,
    out_dtype: torch.dtype,
    io: _Streams,
) -> None:
    """W + scaling * (B @ A) for rows [start, stop) of a weight, in blocks of `step` rows: each block's product
    (torch.mm), then the sum, rounding and value count in one pass (merging/fused.c). With a helper thread the
    second block is computed on the other core meanwhile; both calls release the GIL. Only a block with a NaN or
    an infinity pays for the float32 sum again, to tell float16 overflow from the rest."""
    cols = rows.shape[1]
    raw, claimed = io.output(rows.numel() * out_dtype.itemsize)
    merged = raw.view(out_dtype).view(rows.shape)
    blocks = [(first, min(stop, first + step)) for first in range(start, stop, step)]
    scratches = [
        io.workspace.take(f"scratch{i}", max(last - first, MIN_BLOCK_ROWS) * cols * 4).view(torch.float32)
        for i, (first, last) in enumerate(blocks)
    ]

    def compute(i: int) -> tuple[int, torch.Tensor]:
        first, last = blocks[i]
        product = linear_delta_rows(a, b, scaling, False, first, last, scratches[i], scale=False)
        block = slice(first - start, last - start)
        return FUSED.run(rows[block], product, scaling, merged[block]), product

    results: dict[int, tuple[int, torch.Tensor]] = {}
    claims = itertools.count()  # both threads take the next block from it: the helper shares its core with the
    # reader and the writer, so a fixed half each would leave the main thread waiting for it

    def work() -> None:
        while (i := next(claims)) < len(blocks):
            results[i] = compute(i)

    helped = io.helper.submit(work) if io.helper is not None and len(blocks) > 1 else None
    work()
    if helped is not None:
        helped.result()
    for i, (first, last) in enumerate(blocks):
        nonfinite, product = results[i]
        if nonfinite:
            weight = rows[first - start : last - start]
            io.check.block(merged[first - start : last - start], (product * scaling).add_(weight.float()))
    io.commit(raw, claimed)
