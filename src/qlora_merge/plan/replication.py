"""layer_replication: the base as PEFT's adapted model holds it, each replicated layer a tensor of its own."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from ..errors import ShapeMismatch, UnsupportedAdapter
from ..inputs.format import TensorEntry
from ..inputs.index import CheckpointIndex

# The decoder layer lists PEFT's replicate_layers knows: llama-like `layers`, bert's `encoder.layer`, falcon's `h`.
LAYER_LIST = re.compile(r"^((?:.*\.)?(?:layers|encoder\.layer|h))\.(\d+)\.(.+)$")


def replicate_layers(
    base: CheckpointIndex, base_config: dict[str, Any], ranges: tuple[tuple[int, int], ...], adapter_path: Path
) -> tuple[CheckpointIndex, dict[str, Any]]:
    """layer_replication: the base as PEFT's adapted model holds it, and the config.json changes that follow.

    PEFT's `replicate_layers` builds a new layer list from the [start, end) ranges (`[[0, 2], [1, 3]]` on three
    layers gives 0, 1, 1, 2), the copies sharing the base's weights and each getting its own LoRA. Layer j of the
    result reads base layer map[j]'s bytes under the name `<prefix>.j.*`, so every copy is materialised and merged
    with its own delta. (PEFT's merge_and_unload would add all copies' deltas into the one shared weight.)
    """
    groups: dict[str, dict[int, list[TensorEntry]]] = {}
    for entry in base.tensors.values():
        found = LAYER_LIST.match(entry.name)
        if found:
            groups.setdefault(found.group(1), {}).setdefault(int(found.group(2)), []).append(entry)
    if not groups:
        raise UnsupportedAdapter(
            f"{adapter_path}: layer_replication needs a list of decoder layers ('model.layers.N.*'), and the base "
            "checkpoint has none"
        )
    # The decoder's own list: the longest, then the shortest name (not `mtp.layers`, a one-layer extra head)
    prefix = min(groups, key=lambda p: (-len(groups[p]), p.count("."), p))
    layers = groups[prefix]
    count = len(layers)
    if sorted(layers) != list(range(count)):
        raise ShapeMismatch(f"{base.root}: the layers under '{prefix}' are not numbered 0 to {count - 1}")
    mapping = [i for start, end in ranges for i in range(start, end)]
    if max(mapping) >= count:
        raise ShapeMismatch(
            f"{adapter_path}: layer_replication {[list(r) for r in ranges]} names layer {max(mapping)}, but the "
            f"base has {count} layers under '{prefix}'"
        )
    tensors: dict[str, TensorEntry] = {}
    placed = False
    for entry in base.tensors.values():
        found = LAYER_LIST.match(entry.name)
        if not found or found.group(1) != prefix:
            tensors[entry.name] = entry
        elif not placed:
            placed = True
            for new, old in enumerate(mapping):  # the new layer list, where the base's first layer was
                for source in layers[old]:
                    rest = LAYER_LIST.match(source.name).group(3)  # type: ignore[union-attr]
                    name = f"{prefix}.{new}.{rest}"
                    tensors[name] = dataclasses.replace(source, name=name)
    changes: dict[str, Any] = {"num_hidden_layers": len(mapping)}
    for config in (base_config, base_config.get("text_config")):
        types = config.get("layer_types") if isinstance(config, dict) else None
        if isinstance(types, list) and len(types) == count:
            changes["layer_types"] = [types[i] for i in mapping]
    return dataclasses.replace(base, tensors=tensors), changes
