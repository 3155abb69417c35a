"""A PEFT LoRA adapter on disk: its config and its weights."""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterFormatError
from .config import LoraConfig, read_adapter_config
from .selection import check_patterns, select_modules
from .weights import PEFT_PREFIX, AdapterWeights, read_adapter_weights


def read_adapter(directory: Path) -> tuple[LoraConfig, AdapterWeights]:
    """The adapter's config and weights, each validated, and checked against each other; the LoRA modules the
    config does not select are set apart (`AdapterWeights.unselected`), as PEFT leaves them out."""
    config = read_adapter_config(directory)
    weights = read_adapter_weights(directory)
    _check_config_agrees(config, weights)
    weights = select_modules(config, weights)
    check_patterns(config, weights.pairs)
    return config, weights


def _check_config_agrees(config: LoraConfig, weights: AdapterWeights) -> None:
    """adapter_config.json and the weights must describe the same adapter: PEFT would silently drop the extra
    tensors (DoRA magnitudes without use_dora) or invent the missing ones (use_dora without them)."""
    for pair in weights.pairs.values():
        if pair.magnitude_key is not None and not config.use_dora:
            raise AdapterFormatError(
                f"{config.path}: use_dora is false but {weights.path.name} has DoRA magnitude '{pair.magnitude_key}'"
            )
        if pair.magnitude_key is None and config.use_dora:
            raise AdapterFormatError(
                f"{config.path}: use_dora is true but {weights.path.name} has no DoRA magnitude for "
                f"'{PEFT_PREFIX}{pair.module}'"
            )
        if pair.bias_key is not None and not config.lora_bias:
            raise AdapterFormatError(
                f"{config.path}: lora_bias is false but {weights.path.name} has LoRA bias '{pair.bias_key}'"
            )
