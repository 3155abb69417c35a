"""MoE LoRA (target_parameters): one expert's delta at a time, from factors shared by every expert of a layer."""

from __future__ import annotations

import torch

from ..adapter.weights import load_factor
from ..inputs.reader import TensorReader
from ..plan.tasks import ExpertUpdate
from .blocking import ExpertCheck
from .variants import expert_delta, expert_deltas_whole, factor_dtype


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
