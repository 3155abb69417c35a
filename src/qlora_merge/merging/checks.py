"""Values a merge must not write silently: NaN, infinities, and sums beyond float16's range."""

from __future__ import annotations

import logging
import math

import torch

from ..errors import NonFiniteValues

log = logging.getLogger(__name__)

F16_MAX = 65504.0


def count_nonfinite(out: torch.Tensor, wide: torch.Tensor | None = None) -> tuple[int, int, int]:
    """(NaN, infinite, overflowed) elements of a block about to be written; `wide` is the same block before its
    final rounding, where the caller has it. Overflowed: finite in `wide`, infinite in `out` (a float32 sum past
    65504 rounded to float16); without `wide` every infinity counts as infinite.

    The common case costs one reduction in the block's own dtype and no allocation (a sixth of the rounding copy
    that made the block, where isfinite().all() costs ten times more): a sum is finite only if every element is,
    since a NaN or an infinity makes it NaN or infinite. Only a non-finite sum, which can also be a sum of finite
    values past the dtype's range (65504 for float16), pays for the exact counts.
    """
    if not out.is_floating_point() or out.numel() == 0:
        return 0, 0, 0
    if math.isfinite(float(out.sum())):
        return 0, 0, 0
    nan = int(torch.isnan(out).sum())
    infinite = torch.isinf(out)
    overflowed = 0
    if wide is not None and wide.shape == out.shape:
        overflowed = int((infinite & torch.isfinite(wide)).sum())
    return nan, int(infinite.sum()) - overflowed, overflowed


def describe(where: str, name: str, dtype: str, numel: int, nan: int, infinite: int, overflowed: int) -> str:
    """One line naming the file the tensor comes from, the tensor, and what is wrong with how many of its values."""
    parts = []
    if nan:
        parts.append(f"{nan} NaN")
    if infinite:
        parts.append(f"{infinite} infinite")
    if overflowed:
        limit = f"float16's range (|x| > {F16_MAX:.0f}" if dtype == "F16" else f"{dtype}'s range ("
        parts.append(f"{overflowed} beyond {limit}, rounded to +-inf)")
    return f"{where}: tensor '{name}' ({dtype}): {' and '.join(parts)} of {numel} values after merging"


class ValueCheck:
    """Counts bad values block by block (`block`) and judges each tensor once it is written (`tensor_done`):
    an error by default, a logged warning with `allow_nonfinite`. Tensors copied byte for byte are not decoded,
    so not checked: they are the base's own."""

    def __init__(self, allow_nonfinite: bool = False) -> None:
        self.allow_nonfinite = allow_nonfinite
        self.findings: list[str] = []
        self._counts = [0, 0, 0]

    def block(self, out: torch.Tensor, wide: torch.Tensor | None = None) -> None:
        for i, n in enumerate(count_nonfinite(out, wide)):
            self._counts[i] += n

    def tensor_done(self, where: str, name: str, dtype: str, numel: int) -> None:
        counts, self._counts = self._counts, [0, 0, 0]
        if not any(counts):
            return
        message = describe(where, name, dtype, numel, *counts)
        if dtype == "F16" and counts[2] and not counts[0] and not counts[1]:
            advice = "write --dtype bf16 or f32, or pass --allow-nonfinite to write them anyway"
        else:
            advice = "pass --allow-nonfinite to write them anyway"
        if not self.allow_nonfinite:
            raise NonFiniteValues(f"{message}; {advice}")
        log.warning("%s (written as they are: --allow-nonfinite)", message)
        self.findings.append(message)
