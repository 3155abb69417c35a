"""All LoRA merge math in one place: scaling, per-module rank/alpha patterns, and the weight update.

Every formula here mirrors what PEFT's `merge_and_unload()` computes, operation for operation, because equal
results need equal float32 operations in the same order: delta = (B @ A) [transposed] * scaling, computed in
float32 (PEFT upcasts adapter weights on load), added to the base weight in float32, rounded once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import torch

# Architectures whose projection layers are transformers' Conv1D, which stores weights as (in, out).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """PEFT's `get_pattern_key`: the first pattern that, as a regex, matches the whole module name or its tail
    after a dot. PEFT does not escape the pattern, so neither do we: `layers.0` also matches `layers_0`."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def module_rank_alpha(
    module: str, r: int, alpha: float, rank_pattern: Mapping[str, int], alpha_pattern: Mapping[str, float]
) -> tuple[int, float]:
    """Rank and alpha of one module: the first matching `rank_pattern`/`alpha_pattern` entry, else the defaults."""
    r_key = pattern_key(rank_pattern, module)
    alpha_key = pattern_key(alpha_pattern, module)
    return (
        rank_pattern[r_key] if r_key is not None else r,
        alpha_pattern[alpha_key] if alpha_key is not None else alpha,
    )


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA (rsLoRA)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def is_transposed(
    weight_shape: tuple[int, ...], out_features: int, in_features: int, fan_in_fan_out: bool, model_type: str | None
) -> bool | None:
    """Whether the base weight is stored (in, out), as Conv1D does; None if the shapes fit neither way.

    PEFT decides by layer class (Conv1D forces fan_in_fan_out on, nn.Linear forces it off). Without a model class
    the shape decides; only square weights need to know the architecture, or the config flag when it is unknown.
    """
    fits_linear = weight_shape == (out_features, in_features)
    fits_conv1d = weight_shape == (in_features, out_features)
    if fits_linear and fits_conv1d:
        return model_type in CONV1D_MODEL_TYPES if model_type else fan_in_fan_out
    if fits_linear or fits_conv1d:
        return fits_conv1d
    return None


def linear_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, transposed: bool) -> torch.Tensor:
    """scaling * (B @ A) in float32, transposed for (in, out) weights: PEFT's `get_delta_weight`."""
    product = b @ a
    return (product.T if transposed else product) * scaling


def merge_linear(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, transposed: bool, out_dtype: torch.dtype
) -> torch.Tensor:
    """W + delta, added in float32 and rounded once to the output dtype."""
    merged = weight.to(torch.float32) if weight.dtype != torch.float32 else weight.clone()
    merged += linear_delta(a, b, scaling, transposed)
    return merged if out_dtype == torch.float32 else merged.to(out_dtype)
