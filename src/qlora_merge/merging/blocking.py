"""How a merge is cut into pieces, and the self-tests that a cut changes no bits: weight rows in blocks
(BlockingCheck) and fused MoE experts one at a time (ExpertCheck).

A cut keeps memory flat, but the BLAS kernel that computes a product depends on its shape: a block's product, or
one expert's, may sum in another order than the whole product PEFT computes. Each check compares the cut with the
whole once per shape, on random factors, and falls back to the whole where they differ.
"""

from __future__ import annotations

import logging

import torch

from .variants import MIN_BLOCK_ROWS, expert_delta, expert_deltas_whole, linear_delta_rows

log = logging.getLogger(__name__)

# Merges work on blocks of weight rows of about this many elements, so float32 intermediates stay in cache
# and memory does not grow with the tensor (a 70B down_proj would need ~2.8 GB of buffers whole).
BLOCK_ELEMENTS = 1 << 20


class BlockingCheck:
    """Whether row-blocked B @ A equals the whole product bit for bit, per shape, on this machine's BLAS.

    Which kernel runs depends on the shapes (and thread count), not the values, so one comparison on random
    factors per distinct shape settles it for every tensor of that shape. A shape that fails is merged as one
    block, which costs memory but never exactness.
    """

    def __init__(self) -> None:
        self._verdicts: dict[tuple[object, ...], bool] = {}

    def rows_per_block(
        self,
        rows: int,
        cols: int,
        a: tuple[int, ...],
        b: tuple[int, ...],
        dtype: torch.dtype,
        transposed: bool,
        dora: bool = False,
    ) -> int:
        """Rows per block for a weight of `rows` x `cols` updated by factors of shapes `a` and `b` multiplied in
        `dtype`; `dora` also checks DoRA's row norms, blocked against whole."""
        wanted = max(MIN_BLOCK_ROWS, BLOCK_ELEMENTS // max(cols, 1))
        if wanted >= rows:
            return rows
        # The self-test runs on two full blocks and the real tail, not on all rows: what it guards against is the
        # kernel chosen for a block's shape, and a whole-tensor reference would cost memory growing with the model
        # (235 MB for an 8B down_proj). Full-size products are compared with PEFT's by the tests and the benchmark.
        proxy_rows = min(rows, 2 * wanted + (rows % wanted or wanted))
        a_shape = (a[0], proxy_rows) if transposed else a
        b_shape = b if transposed else (proxy_rows, b[1])
        key = (a_shape, b_shape, dtype, transposed, wanted, dora)
        if key not in self._verdicts:
            self._verdicts[key] = blocks_match_whole(a_shape, b_shape, dtype, transposed, wanted, dora)
            if not self._verdicts[key]:
                log.info("blocked LoRA products differ from whole ones for A%s B%s; merging whole", a, b)
        return wanted if self._verdicts[key] else rows


def blocks_match_whole(
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    dtype: torch.dtype,
    transposed: bool,
    rows_per_block: int,
    dora: bool = False,
) -> bool:
    """Compute B @ A whole and in blocks of `rows_per_block` weight rows on random factors; True if bit-identical.

    With `dora`, the row norms of W + delta too (random W), blocked against whole.
    """
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(a_shape, generator=generator, dtype=dtype)
    b = torch.randn(b_shape, generator=generator, dtype=dtype)
    whole = b @ a
    if transposed:
        whole = whole.T
    rows, cols = whole.shape
    weight = torch.randn(rows, cols, generator=generator, dtype=dtype) if dora else None
    whole_norm = torch.linalg.norm(weight + whole, dim=1) if weight is not None else None
    scratch = torch.empty(max(rows_per_block, MIN_BLOCK_ROWS) * cols, dtype=dtype)
    for start in range(0, rows, rows_per_block):
        stop = min(rows, start + rows_per_block)
        block = linear_delta_rows(a, b, 1.0, transposed, start, stop, scratch)
        if not torch.equal(block, whole[start:stop]):
            return False
        if weight is not None and whole_norm is not None:
            norm = torch.linalg.norm(weight[start:stop] + block, dim=1)
            if not torch.equal(norm, whole_norm[start:stop]):
                return False
    return True


class ExpertCheck:
    """Whether one expert's product equals its slice of PEFT's batched einsum bit for bit, per factor shape.

    Like BlockingCheck: the kernel depends on shapes, not values, so random factors of the real per-expert shape
    (two experts, not all of them, to keep the check small) settle it. A shape that fails is merged from the
    whole einsum, which costs memory but never exactness.
    """

    def __init__(self) -> None:
        self._verdicts: dict[tuple[object, ...], bool] = {}

    def per_expert(self, a: tuple[int, ...], b: tuple[int, ...], experts: int, dtype: torch.dtype) -> bool:
        rank = a[0] // experts
        proxy = min(experts, 2)
        key = (rank, a[1], b[0], proxy, dtype)
        if key not in self._verdicts:
            generator = torch.Generator().manual_seed(0)
            fa = torch.randn(proxy * rank, a[1], generator=generator, dtype=dtype)
            fb = torch.randn(b[0], proxy * rank, generator=generator, dtype=dtype)
            whole = expert_deltas_whole(fa, fb, proxy, 1.0, False)
            self._verdicts[key] = all(
                torch.equal(expert_delta(fa, fb, proxy, e, 1.0, False), whole[e]) for e in range(proxy)
            )
            if not self._verdicts[key]:
                log.info("per-expert LoRA products differ from PEFT's einsum for A%s B%s; merging whole", a, b)
        return self._verdicts[key]
