"""All LoRA merge math in one place: scaling, per-module rank/alpha patterns, and the weight update.

Every formula here mirrors what PEFT's `merge_and_unload()` computes, operation for operation, because equal
results need equal float32 operations in the same order: delta = (B @ A) [transposed] * scaling, computed in
float32 (PEFT upcasts adapter weights on load), added to the base weight in float32, rounded once.

The layer kinds differ only in small ways, each copied from PEFT 0.21 (`tuners/lora/layer.py`, `variants.py`,
`dora.py`):

- Linear, W (out, in): W += s * B @ A.
- Conv1D (GPT-2, fan_in_fan_out), W (in, out): W += s * (B @ A).T.
- Embedding, A (r, num), B (dim, r), W (num, dim): W += round(s * (B @ A).T): PEFT rounds the delta to the
  weight's dtype before adding it (`.to(orig_dtype)`), the one place it rounds twice.
- MiCA (init_lora_weights="mica"): rounds the delta first on every layer kind, as embeddings do.
- DoRA: V = W + delta; W' = m / ||V|| * V, the norm taken per output row for Linear (so it can be merged in row
  blocks), per column of the stored weight for Conv1D and Embedding, and per output channel for convolutions
  (those are merged whole).
- Convolutions (nn.Conv1d/2d/3d), A (r, in, *kernel), B (out, r, 1, ...): PEFT's conv delta (conv_delta).
- lora_bias: bias += s * lora_B.bias.
- trainable tokens: W[indices] = delta.to(W.dtype), rows replaced rather than added to (index_copy).
- Several adapters at once (add_weighted_adapter's "cat" and "linear"): combined into one LoRA per module first
  (combination.py), then merged as one adapter with scaling 1.
- MoE experts (target_parameters, PEFT's ParamWrapper), W (E, d1, d2): A (E*r, in) is expert-major, B (out, E*r)
  rank-major; W[e] += round(s * B3[:, :, e] @ A3[e]) with A3 = A.reshape(E, r, in), B3 = B.reshape(out, r, E),
  transposed where the layer stores (experts, in, out) (gpt-oss). PEFT computes all experts in one einsum and
  rounds the delta to the weight's dtype before adding it; one expert's product equals its slice of the einsum
  (checked per shape, see blocking.ExpertCheck).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping

import torch

from ..adapter.patterns import pattern_keys
from ..adapter.weights import adapter_dtype

# The fewest rows a block's B @ A is computed on (see linear_delta_rows); blocking.py sizes the blocks.
MIN_BLOCK_ROWS = 16

# transformers' Conv1D (pytorch_utils.Conv1D) stores its weight (in, out); PEFT transposes the delta for it by
# layer class. These are its layers, by module name, in every architecture of transformers that has any (5.x:
# GPT-2 and its copies, CLVP's decoder MLP); every other layer there (GPT2DoubleHeads' `summary`, `score`,
# `lm_head`, CLVP's attention) is an nn.Linear.
GPT2_CONV1D = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
CONV1D_MODULES = {
    "gpt2": GPT2_CONV1D,
    "openai-gpt": GPT2_CONV1D,
    "imagegpt": GPT2_CONV1D,
    "decision_transformer": GPT2_CONV1D,
    "clvp": frozenset({"c_fc", "c_proj"}),
    "clvp_decoder": frozenset({"c_fc", "c_proj"}),
}


# Architectures whose fused expert weights are (experts, in, out): their experts module sets `is_transposed`.
MOE_TRANSPOSED_MODEL_TYPES = frozenset({"gpt_oss"})


class Layout(enum.Enum):
    """How a LoRA delta lies on the weight it updates."""

    LINEAR = "linear"  # W (out, in), delta B @ A
    CONV1D = "conv1d"  # W (in, out), delta (B @ A).T
    EMBEDDING = "embedding"  # W (num, dim), delta (B @ A).T, rounded to W's dtype before the add
    CONV = "conv"  # W (out, in, *kernel) of nn.Conv1d/2d/3d, A (r, in, *kernel), B (out, r, 1 ...)

    @property
    def transposed(self) -> bool:
        return self in (Layout.CONV1D, Layout.EMBEDDING)


def pattern_key(patterns: Iterable[str], module: str) -> str | None:
    """PEFT's `get_pattern_key`: the first pattern that, as a regex, matches the whole module name or its tail
    after a dot. PEFT does not escape the pattern, so neither do we: `layers.0` also matches `layers_0`.
    (patterns.PatternKeys: matched in bounded time, plain names by lookup.)"""
    return pattern_keys(tuple(patterns)).first(module)


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


def fitting_layouts(weight_shape: tuple[int, ...], out_features: int, in_features: int) -> tuple[Layout, ...]:
    """The layouts a 2-D weight of `weight_shape` may have for a LoRA of (out, in): nn.Linear's (out, in),
    Conv1D's (in, out), both for a square weight (see conv1d_names), or none."""
    found = []
    if weight_shape == (out_features, in_features):
        found.append(Layout.LINEAR)
    if weight_shape == (in_features, out_features):
        found.append(Layout.CONV1D)
    return tuple(found)


def conv1d_names(base_config: dict[str, object]) -> frozenset[str] | None:
    """The module names (last part) that are Conv1D layers in the base's architecture, from config.json's
    model_type (and its sub-models': a VisionEncoderDecoder with a GPT-2 decoder); None when the model's code is
    not transformers' own and so unknown: no config.json, no model_type, or code of its own (`auto_map`)."""
    if base_config.get("auto_map"):
        return None
    types = _model_types(base_config)
    if not types:
        return None
    return frozenset().union(*(CONV1D_MODULES.get(model_type, frozenset()) for model_type in types))


def _model_types(config: dict[str, object], depth: int = 0) -> set[str]:
    found = {config["model_type"]} if isinstance(config.get("model_type"), str) else set()
    if depth < 3:
        for value in config.values():
            if isinstance(value, dict):
                found |= _model_types(value, depth + 1)
    return found  # type: ignore[return-value]


def factor_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The dtype PEFT multiplies B @ A in, from the factors' saved dtypes: float32, float64 if a factor is."""
    return torch.promote_types(adapter_dtype(a), adapter_dtype(b))


def rounds_delta(layout: Layout, mica: bool, expert: bool = False) -> bool:
    """Whether PEFT rounds the delta to the weight's dtype before adding it (`W += delta.to(W.dtype)`): on
    embeddings, on every layer with MiCA (init_lora_weights="mica"), and on MoE experts, which PEFT merges as fused
    parameters (ParamWrapper) even when the adapter was trained on per-expert Linear layers: it rewrites such an
    adapter's factors into the fused layout (A stacked, B block-diagonal) when it loads it."""
    return layout is Layout.EMBEDDING or mica or expert


def merged_whole(layout: Layout, dora: bool) -> bool:
    """DoRA on Conv1D and Embedding weights takes column norms, which need every row, and a convolution's delta is
    one conv op (kernels are small): such a weight is merged in one piece. Everything else goes a block of rows at
    a time."""
    return (dora and layout.transposed) or layout is Layout.CONV


def conv_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """PEFT's `_ConvNd.get_delta_weight`, its own expressions: a 1x1 Conv2d (its kernel's first two sizes 1, 1) as
    the matrix product B @ A; any other kernel as `conv{n}d(A.transpose(0, 1), B).transpose(0, 1) * s`, the delta
    laid out (out, in, *kernel)."""
    if tuple(a.shape[2:4]) == (1, 1):
        return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scaling
    conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}[a.dim()]
    return conv(a.transpose(0, 1), b).transpose(0, 1) * scaling


def dora_conv(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, magnitude: torch.Tensor
) -> torch.Tensor:
    """DoRA on a convolution, whole and unrounded, with PEFT's expressions (`DoraConvNdVariant.merge_unsafe`):
    V = W + delta, the norm over every dim but the output channel (`V.norm(p=2, dim=(1, ...), keepdim=True)`),
    W' = (m / norm).view(-1, 1, ...) * V. The magnitude is saved (1, out, 1, ...), as the norm's transpose."""
    v = weight + conv_delta(a, b, scaling)
    norm = v.norm(p=2, dim=tuple(range(1, v.dim())), keepdim=True).transpose(1, 0)
    factor = magnitude.reshape(norm.shape) / norm
    return factor.view(-1, *(1,) * (v.dim() - 1)) * v


def conv_merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W + delta of a convolution weight, unrounded: PEFT's `weight.data += delta` sums in float32 (float64 where
    either side is) and rounds once."""
    delta = conv_delta(a, b, scaling)
    return _sum_into(weight, delta, torch.empty(weight.numel(), dtype=torch.float32))


def linear_delta_rows(
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: float,
    transposed: bool,
    start: int,
    stop: int,
    scratch: torch.Tensor,
    scale: bool = True,
) -> torch.Tensor:
    """Rows [start, stop) of the weight's delta, scaling * (B @ A) (transposed for (in, out) weights), in `scratch`;
    with `scale` False, B @ A unscaled (the fused merge multiplies by `scaling` itself, in the same pass as the add).

    A short block borrows rows before it so that every product has at least MIN_BLOCK_ROWS rows: MKL's sgemm
    picks another kernel for very short row blocks, whose float32 sums differ from the whole product's.
    `scratch` holds at least max(stop - start, MIN_BLOCK_ROWS) * row length elements of the factors' dtype.
    """
    lo = max(0, min(start, stop - MIN_BLOCK_ROWS))
    n = stop - lo
    if transposed:
        product = torch.mm(b, a[:, lo:stop], out=scratch[: b.shape[0] * n].view(b.shape[0], n))
    else:
        product = torch.mm(b[lo:stop], a, out=scratch[: n * a.shape[1]].view(n, a.shape[1]))
    if scale:
        product.mul_(scaling)
    return (product.T if transposed else product)[start - lo :]


def merge_rows_into(
    weight: torch.Tensor,
    delta: torch.Tensor,
    upcast: torch.Tensor,
    out: torch.Tensor,
    round_delta_to: torch.dtype | None = None,
    rounding: torch.Tensor | None = None,
) -> torch.Tensor:
    """out <- W + delta for a block of rows: summed in float32 (float64 if either side is), rounded once. Returns
    the sum before that rounding (for value checks: a float16 overflow is finite there and infinite in `out`).

    `delta` is overwritten. Adding W to the delta rather than the delta to W gives the same bits (IEEE addition
    is commutative). W is first widened into the float32 buffer `upcast`: an in-place float32 += bfloat16 takes
    a slow mixed-dtype path, about eight times slower than the copy and the add together. `round_delta_to` rounds
    the delta to that dtype first, as PEFT's embedding merge does (`W += delta.to(W.dtype)`), through `rounding` if
    given (a buffer of at least as many elements of that dtype) rather than a new tensor.
    """
    if round_delta_to is not None and round_delta_to != delta.dtype:
        if rounding is None:
            delta.copy_(delta.to(round_delta_to))
        else:
            delta.copy_(rounding[: delta.numel()].view(delta.shape).copy_(delta))
    total = _sum_into(weight, delta, upcast)
    out.copy_(total)
    return total


def dora_rows_into(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, upcast: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    """out <- DoRA's merged rows of a Linear weight: V = W + delta, then (m / ||V||_row)[:, None] * V; returns the
    rows before their final rounding.

    PEFT's DoraLinearVariant.merge: the norm is `torch.linalg.norm(W + 1 * delta, dim=1)`, a reduction along each
    contiguous row on its own, so a block of rows gets the same norms as the whole weight (tests/test_dora.py and
    blocking.BlockingCheck verify it). `delta` is overwritten with V.
    """
    v = _sum_into(weight, delta, upcast)
    factor = magnitude / torch.linalg.norm(v, dim=1).to(v.dtype)
    scaled = v.mul_(factor.view(-1, 1))
    out.copy_(scaled)
    return scaled


def dora_whole(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, magnitude: torch.Tensor
) -> torch.Tensor:
    """The DoRA-merged Conv1D or Embedding weight, whole and unrounded, computed with PEFT's own expressions.

    The norm runs down the columns of the stored weight; which reduction kernel sums them, and in which order,
    depends on the memory layout of its input, so the layouts are PEFT's too: `weight`
    is the weight as PEFT holds it (contiguous, in its load dtype), the delta is `(B @ A).T * s` as
    `get_delta_weight` makes it, and the norm's input is `W.T + delta.T` as `get_weight_norm` builds it (PEFT's
    `1 * delta.T` has the same values and layout as `delta.T`). W + delta is computed once and reused for the
    product: the same sums, so the same bits.
    """
    delta = (b @ a).T * scaling
    v_t = weight.T + delta.T
    del delta
    factor = magnitude / torch.linalg.norm(v_t, dim=1).to(v_t.dtype)
    return v_t.mul_(factor.view(-1, 1)).T


def bias_delta(lora_bias: torch.Tensor, scaling: float) -> torch.Tensor:
    """lora_bias=True: PEFT merges `bias += lora_B.bias * scaling`."""
    return lora_bias * scaling


def replace_token_rows(
    rows: torch.Tensor, start: int, indices: torch.Tensor, values: torch.Tensor, held_dtype: torch.dtype
) -> None:
    """Trainable tokens on the block of rows [start, start + len(rows)): the rows named in `indices` take `values`
    rounded to the dtype PEFT holds the weight in (`W.index_copy(0, indices, delta.to(W))`), then `rows`' dtype."""
    inside = (indices >= start) & (indices < start + rows.shape[0])
    if bool(inside.any()):
        rows.index_copy_(0, indices[inside] - start, values[inside].to(held_dtype).to(rows.dtype))


def held_weight(weight: torch.Tensor, held_dtype: torch.dtype) -> torch.Tensor:
    """A tensor PEFT would first load into a parameter of `held_dtype` (a float32 modules_to_save tensor going into
    a bfloat16 model), rounded the way that copy rounds it."""
    return weight if weight.dtype == held_dtype else weight.to(held_dtype)


def expert_delta(
    a: torch.Tensor, b: torch.Tensor, experts: int, expert: int, scaling: float, transposed: bool
) -> torch.Tensor:
    """Expert `expert`'s (d1, d2) slice of PEFT's ParamWrapper delta, unrounded: s * B3[:, :, e] @ A3[e], or its
    transpose where the weight is (experts, in, out). PEFT: `einsum("o r e, e r i -> e o i", B3, A3) * scaling`
    (`"e i o"` when transposed)."""
    rank = a.shape[0] // experts
    a_e = a.reshape(experts, rank, a.shape[1])[expert]
    b_e = b.reshape(b.shape[0], rank, experts)[:, :, expert]
    product = (b_e @ a_e) * scaling
    return product.T if transposed else product


def expert_deltas_whole(
    a: torch.Tensor, b: torch.Tensor, experts: int, scaling: float, transposed: bool
) -> torch.Tensor:
    """PEFT's ParamWrapper delta for every expert at once, with its own einsum (E, d1, d2), unrounded."""
    a3 = a.reshape(experts, -1, a.shape[-1])
    b3 = b.reshape(b.shape[0], -1, experts)
    return torch.einsum("o r e, e r i -> e i o" if transposed else "o r e, e r i -> e o i", b3, a3) * scaling


def _sum_into(weight: torch.Tensor, delta: torch.Tensor, upcast: torch.Tensor) -> torch.Tensor:
    """V = W + delta as PEFT sums it: in float32 into `delta` (W widened through the float32 buffer `upcast`), or
    in float64 where either side is float64 (PEFT adds a float32 delta to a float64 weight, or a float64 delta to
    any weight, in float64: the type promotion of `weight + delta`)."""
    if delta.dtype == torch.float32 and weight.dtype != torch.float64:
        return delta.add_(_widened(weight, upcast))
    return weight + delta


def _widened(weight: torch.Tensor, upcast: torch.Tensor) -> torch.Tensor:
    if weight.dtype == torch.float32:
        return weight
    return upcast[: weight.numel()].view(weight.shape).copy_(weight)
