"""Several adapters combined into one LoRA per module, with PEFT's `add_weighted_adapter` arithmetic (PEFT 0.21),
and one adapter's weight folded into its alpha (`set_scale`). Which adapters and modules combine, and how the
combined adapter is read, is adapter/combine.py's and adapter/weights.py's business."""

from __future__ import annotations

import math

import torch

from ..options import Combination

__all__ = ["Combination", "combined_factor", "linear_coefficients", "weighted_alpha"]


def weighted_alpha(alpha: float, weight: float) -> float:
    """One adapter's alpha with its weight folded in: PEFT's `set_scale(weight)` gives scaling weight * alpha / r
    (or / sqrt(r)), and weight * alpha / r == (weight * alpha) / r in floating point, operation for operation."""
    return weight * alpha


def combined_factor(
    how: Combination, side: str, factors: list[torch.Tensor], multipliers: list[tuple[float, ...]], rank: int
) -> torch.Tensor:
    """One factor (`side` "a" or "b") of several adapters' LoRAs on one module combined into a single LoRA, as
    `add_weighted_adapter` builds it (PEFT 0.21), so that the combination merges as one adapter with scaling 1.

    cat: A' = [A_1 * w_1 * s_1; A_2 * w_2 * s_2; ...], B' = [B_1, B_2, ...], zero-padded to `rank` (PEFT sizes the
    new adapter by the sum of the adapters' largest ranks), so B' @ A' = sum(w_i * s_i * B_i @ A_i): the weighted
    sum of the deltas. `multipliers[i]` are applied one after the other, as PEFT's `A * weight * scaling` does.
    linear: A' = sum(c_i * A_i) with c_i = sign * sqrt(|w_i * s_i|) (the sign on A only), B' = sum(|c_i| * B_i),
    each coefficient a float32 as PEFT's `task_arithmetic` holds it.
    """
    dtype = factors[0].dtype
    for factor in factors[1:]:
        dtype = torch.promote_types(dtype, factor.dtype)
    if how is Combination.LINEAR:
        stacked = torch.stack([factor.to(dtype) for factor in factors])
        coefficients = torch.tensor([m for (m,) in multipliers], dtype=torch.float32)
        return (stacked * coefficients.view(-1, *(1,) * factors[0].dim())).sum(dim=0).to(dtype)
    scaled = []
    for factor, factor_multipliers in zip(factors, multipliers, strict=True):
        for multiplier in factor_multipliers:
            factor = factor * multiplier
        scaled.append(factor.to(dtype))
    axis = 0 if side == "a" else 1
    joined = torch.cat(scaled, dim=axis)
    shape = list(joined.shape)
    shape[axis] = rank
    out = torch.zeros(shape, dtype=dtype)
    out.narrow(axis, 0, joined.shape[axis]).copy_(joined)
    return out


def linear_coefficients(weight: float, scaling: float) -> tuple[float, float]:
    """PEFT's "linear" coefficients of one adapter's A and B: the square root of |weight * scaling| on both, its
    sign on A only (so a negative weight subtracts instead of cancelling out)."""
    product = weight * scaling
    root = math.sqrt(abs(product))
    return (root if product >= 0 else -root), root
