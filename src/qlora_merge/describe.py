"""What a person reads about a merge: one-line summaries of the adapters and the plan, for progress and the card."""

from __future__ import annotations

from typing import Any

from .adapter.combine import WeightedAdapter
from .adapter.weights import AdapterWeights
from .merging.combination import Combination
from .merging.variants import lora_scaling
from .plan.tasks import MergePlan


def base_roundtrip_detail(quant_type: str, weights: int, blocksize: int) -> str:
    """Which base --base-quant merges into, for progress and the model card."""
    return (
        f"round-tripped through {quant_type} as QLoRA trained on it ({weights} weights: bitsandbytes 4-bit, "
        f"blocks of {blocksize}, double quantization)"
    )


def combined_detail(adapters: list[WeightedAdapter], how: Combination, subtract: bool) -> str:
    weights = ", ".join(f"{adapter.weight:g}" for adapter in adapters)
    modules = len({module for adapter in adapters for module in adapter.weights.pairs})
    verb = "subtracted" if subtract else "combined"
    return f"{len(adapters)} adapters {verb} ({how.value}, weights {weights}), {modules} LoRA modules"


def reshaped(plan: MergePlan) -> list[str]:
    lines = []
    for task in plan.tasks:
        source = task.source
        if source is None or (source.name == task.output.name and source.shape == task.output.shape):
            continue
        what = task.note or f"resized from {source.shape}"
        lines.append(f"{task.output.name} {task.output.shape}: {what}")
    return lines


def adapter_detail(adapter: WeightedAdapter, subtract: bool) -> str:
    """One adapter as its config describes it (its own r and alpha); a weight or a subtraction said apart."""
    config, weights = adapter.config, adapter.weights
    features = [
        name
        for name, on in (
            ("rsLoRA", config.use_rslora),
            ("DoRA", config.use_dora),
            ("lora_bias", config.lora_bias),
            (f"bias={config.bias}", config.bias != "none"),
            (f"{len(weights.replacements)} replaced tensors", bool(weights.replacements)),
        )
        if on
    ]
    applied = [f"weight {adapter.weight:g}"] if adapter.weight != 1.0 else []
    applied += ["subtracted"] if subtract else []
    return f"{len(weights.pairs)} LoRA modules, r={config.r}, alpha={config.lora_alpha:g}" + "".join(
        f", {f}" for f in features + applied
    )


def lora_summary(config: Any, weights: AdapterWeights) -> str:
    """r, alpha and scaling, and what else changes the merge, in one line for the model card."""
    rule = "alpha/sqrt(r), rsLoRA" if config.use_rslora else "alpha/r"
    scaling = lora_scaling(config.lora_alpha, config.r, config.use_rslora)
    notes = [
        note
        for note, on in (
            (
                "rank_pattern/alpha_pattern give some modules their own",
                bool(config.rank_pattern or config.alpha_pattern),
            ),
            ("DoRA", config.use_dora),
            ("lora_bias", config.lora_bias),
            (f"bias={config.bias}", config.bias != "none"),
            (f"{len(weights.replacements)} tensors replaced (modules_to_save)", bool(weights.replacements)),
            ("trainable tokens", bool(weights.token_deltas)),
        )
        if on
    ]
    return f"r={config.r}, alpha={config.lora_alpha:g}, scaling={scaling:g} ({rule}), {len(weights.pairs)} modules" + (
        "".join(f"; {note}" for note in notes)
    )
