"""Several adapters, or one with a weight, turned into the one adapter the merge applies.

One adapter with weight w is PEFT's `set_scale(w)`: every scaling multiplied by w (so `--subtract` is w = -1, the
delta the merge added, negated). Several adapters become one LoRA per module the way PEFT's `add_weighted_adapter`
builds its new adapter ("cat" by default, the exact weighted sum of the deltas; or "linear"), whose factors are
computed when the merge reads them (`CombinedFactor`), one module at a time. The math is in `variants`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import ShapeMismatch, UnsupportedAdapter
from ..merging.combination import Combination, linear_coefficients, weighted_alpha
from ..merging.variants import lora_scaling, module_rank_alpha
from .config import LoraConfig
from .weights import AdapterTensor, AdapterWeights, CombinedFactor, LoraPair, adapter_dtype, dtype_of


@dataclass(frozen=True)
class WeightedAdapter:
    """One adapter as read, with the weight its delta gets in the merge."""

    config: LoraConfig
    weights: AdapterWeights
    weight: float = 1.0


def adapter_to_merge(
    adapters: list[WeightedAdapter], how: Combination = Combination.CAT, subtract: bool = False
) -> tuple[LoraConfig, AdapterWeights]:
    """The config and weights the planner merges: one adapter as is (scaled by its weight), several combined.
    With `subtract`, every weight is negated: the adapters' deltas are taken out of a checkpoint they were merged
    into, which only a linear update allows."""
    if not adapters:
        raise ValueError("no adapter to merge")
    if subtract:
        for adapter in adapters:
            _check_removable(adapter)
        adapters = [dataclasses.replace(adapter, weight=-adapter.weight) for adapter in adapters]
    if len(adapters) == 1:
        adapter = adapters[0]
        return scaled_config(adapter), adapter.weights
    return combine(adapters, how)


def scaled_config(adapter: WeightedAdapter) -> LoraConfig:
    """One adapter's config with its weight folded into alpha and alpha_pattern (see `variants.weighted_alpha`).
    Tensors the adapter replaces whole (modules_to_save, trained biases, trainable tokens) cannot be scaled."""
    config, weight = adapter.config, adapter.weight
    if weight == 1.0:
        return config
    _refuse_whole_tensors(adapter, f"a weight of {weight:g}")
    return dataclasses.replace(
        config,
        lora_alpha=weighted_alpha(config.lora_alpha, weight),
        alpha_pattern={key: weighted_alpha(alpha, weight) for key, alpha in config.alpha_pattern.items()},
        # a module with a rank_pattern entry but no alpha_pattern one takes lora_alpha: scaled above
    )


def label(index: int) -> str:
    """How keys of the adapter at `index` (0-based) are told apart in a combination's coverage."""
    return f"#{index + 1} "


def combine(adapters: list[WeightedAdapter], how: Combination) -> tuple[LoraConfig, AdapterWeights]:
    """Several adapters as one: per module, the factors `add_weighted_adapter` would build (see
    `variants.combined_factor`), merged with scaling 1 (the new adapter's r = lora_alpha). A module adapted by only
    some of the adapters gets only their deltas. Adapter keys are prefixed with `label(i)` so every one stays
    accounted for in the coverage."""
    for adapter in adapters:
        _check_combinable(adapter, how)
    # (fan_in_fan_out may differ: PEFT lays out each layer's delta by the layer's class, and so do we)
    first = adapters[0].config
    ranks = [_largest_rank(adapter.config) for adapter in adapters]
    if how is Combination.LINEAR and len(set(ranks)) > 1:
        shown = ", ".join(
            f"{a.config.path.parent.name or a.config.path}: r={r}" for a, r in zip(adapters, ranks, strict=True)
        )
        raise ShapeMismatch(
            f"--combine linear needs adapters of one rank, and these differ ({shown}); --combine cat takes any ranks"
        )
    rank = sum(ranks) if how is Combination.CAT else ranks[0]
    modules: dict[str, list[tuple[int, LoraPair, float]]] = {}
    for index, adapter in enumerate(adapters):
        for module, pair in adapter.weights.pairs.items():
            modules.setdefault(module, []).append((index, pair, _module_scaling(pair, adapter.config)))
    pairs = {module: _combined_pair(module, found, adapters, how, rank) for module, found in modules.items()}
    shapes: dict[str, tuple[int, ...]] = {}
    redundant: dict[str, str] = {}
    unselected: dict[str, str] = {}
    for index, adapter in enumerate(adapters):
        shapes.update({label(index) + key: shape for key, shape in adapter.weights.shapes.items()})
        redundant.update({label(index) + key: why for key, why in adapter.weights.redundant.items()})
        unselected.update({label(index) + key: why for key, why in adapter.weights.unselected.items()})
    config = dataclasses.replace(
        first,
        r=rank,
        lora_alpha=float(rank),
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        target_modules=None,
        modules_to_save=None,
    )
    weights = AdapterWeights(
        path=adapters[0].weights.path,
        pairs=pairs,
        replacements={},
        shapes=shapes,
        redundant=redundant,
        unselected=unselected,
    )
    return config, weights


def _combined_pair(
    module: str,
    found: list[tuple[int, LoraPair, float]],
    adapters: list[WeightedAdapter],
    how: Combination,
    rank: int,
) -> LoraPair:
    first_index, first, _ = found[0]
    for index, pair, _ in found[1:]:
        if pair.embedding != first.embedding or pair.weight_shape != first.weight_shape or pair.kernel != first.kernel:
            raise ShapeMismatch(
                f"{adapters[index].weights.path}: '{module}' is adapted as a {_kind(pair)} "
                f"but {adapters[first_index].weights.path} adapts it as a {_kind(first)}"
            )
    for index, pair, _ in found:
        if how is Combination.LINEAR and pair.rank != rank:
            raise ShapeMismatch(
                f"{adapters[index].weights.path}: '{module}' has rank {pair.rank} (rank_pattern) but the adapters' r "
                f"is {rank}; --combine linear needs one rank per module (--combine cat takes any)"
            )
    a_multipliers: list[tuple[float, ...]] = []
    b_multipliers: list[tuple[float, ...]] = []
    for index, _, scaling in found:
        weight = adapters[index].weight
        if how is Combination.CAT:
            a_multipliers.append((weight, scaling))
            b_multipliers.append(())
        else:
            on_a, on_b = linear_coefficients(weight, scaling)
            a_multipliers.append((on_a,))
            b_multipliers.append((on_b,))
    a_parts, b_parts = tuple(p.a for _, p, _ in found), tuple(p.b for _, p, _ in found)
    a_shape = (rank, *(int(n) for n in first.a.shape[1:]))
    b_shape = (int(first.b.shape[0]), rank, *(int(n) for n in first.b.shape[2:]))
    keys = tuple(label(index) + key for index, pair, _ in found for key in pair.keys)
    return LoraPair(
        module=module,
        a=CombinedFactor(how, "a", a_parts, tuple(a_multipliers), rank, a_shape, _loaded_dtype(a_parts)),
        b=CombinedFactor(how, "b", b_parts, tuple(b_multipliers), rank, b_shape, _loaded_dtype(b_parts)),
        embedding=first.embedding,
        keys=keys,
    )


def _loaded_dtype(parts: tuple[AdapterTensor, ...]) -> torch.dtype:
    """The dtype `variants.combined_factor` returns for these parts: theirs as loaded (see `load_factor`),
    promoted."""
    dtype = adapter_dtype(dtype_of(parts[0]))
    for part in parts[1:]:
        dtype = torch.promote_types(dtype, adapter_dtype(dtype_of(part)))
    return dtype


def _kind(pair: LoraPair) -> str:
    if pair.embedding:
        return "embedding"
    return f"convolution {pair.weight_shape} kernel {pair.kernel}" if pair.kernel else f"{pair.weight_shape} weight"


def _module_scaling(pair: LoraPair, config: LoraConfig) -> float:
    r, alpha = module_rank_alpha(pair.module, config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern)
    return lora_scaling(alpha, r, config.use_rslora)


def _largest_rank(config: LoraConfig) -> int:
    """The rank PEFT sizes an adapter's share of a combination by: r, or the largest rank_pattern entry if larger."""
    return max(config.r, *config.rank_pattern.values()) if config.rank_pattern else config.r


# What an adapter may carry that adds no delta, or not a linear one: the reason it cannot take part in a combination.
def _check_combinable(adapter: WeightedAdapter, how: Combination) -> None:
    config = adapter.config
    features = [
        (config.use_dora, "DoRA (use_dora): its magnitudes rescale whole rows and do not add up"),
        (config.lora_bias, "a LoRA bias (lora_bias), which add_weighted_adapter drops"),
        (bool(config.target_parameters), "LoRA on parameters (target_parameters), which add_weighted_adapter refuses"),
        (bool(config.layer_replication), "layer_replication: its layers do not exist in the other adapters' base"),
        (config.mica, "MiCA (init_lora_weights='mica'), which rounds each delta on its own"),
    ]
    for present, why in features:
        if present:
            raise UnsupportedAdapter(
                f"{config.path}: cannot be combined with other adapters ({how.value}): it uses {why}; merge it on "
                "its own, then merge the others into that output"
            )
    _refuse_whole_tensors(adapter, "a combination with other adapters")


def _refuse_whole_tensors(adapter: WeightedAdapter, what: str) -> None:
    weights = adapter.weights
    whole = [r.key for r in weights.replacements.values()] + [t.key for t in weights.token_deltas.values()]
    if whole:
        more = f" (and {len(whole) - 1} more)" if len(whole) > 1 else ""
        raise UnsupportedAdapter(
            f"{weights.path}: '{whole[0]}'{more} replaces a whole tensor (modules_to_save, a trained bias or "
            f"trainable tokens), which cannot take {what}; merge this adapter on its own at weight 1"
        )


def _check_removable(adapter: WeightedAdapter) -> None:
    """What a merge cannot be undone for, given only the merged checkpoint and the adapter."""
    config = adapter.config
    if config.use_dora:
        raise UnsupportedAdapter(
            f"{config.path}: a DoRA merge cannot be subtracted: it rescales every row by the norm of the original "
            "weight plus delta, which the merged checkpoint no longer holds"
        )
    if config.layer_replication:
        raise UnsupportedAdapter(
            f"{config.path}: a layer_replication merge cannot be subtracted: the merged checkpoint holds the copied "
            "layers, each with its own delta"
        )
    _refuse_whole_tensors(adapter, "--subtract (the original values are gone from the merged checkpoint)")
