"""File names of checkpoints and adapters, as transformers, safetensors and PEFT write them: each one in one place."""

from __future__ import annotations

import re

# A checkpoint: one weights file, or numbered shards listed by an index.
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
SHARD_PATTERN = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
SHARD_GLOB = "model-*-of-*.safetensors"
# Pickled weights that transformers may have saved instead (pytorch_model*.bin read with weights_only; others
# recognised, never read).
PICKLE_NAME = "pytorch_model.bin"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_WEIGHTS = (PICKLE_NAME, PICKLE_INDEX_NAME, "model.pt", "consolidated.00.pth")

# A PEFT adapter directory.
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_PICKLE_NAME = "adapter_model.bin"


def shard_name(number: int, total: int) -> str:
    """The `number`-th of `total` shards (from 1), as transformers names it: model-00001-of-00003.safetensors."""
    return f"model-{number:05d}-of-{total:05d}.safetensors"
