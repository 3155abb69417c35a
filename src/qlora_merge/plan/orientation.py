"""Whether a square 2-D base weight is stored (out, in) or (in, out), which its shape cannot tell."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapter.selection import strip_base_layers
from ..adapter.weights import PEFT_PREFIX, LoraPair
from ..errors import UnsupportedAdapter
from ..inputs.index import CheckpointIndex
from ..merging.variants import GPT2_CONV1D, Layout, conv1d_names, fitting_layouts


@dataclass(frozen=True)
class Orientation:
    """Whether a square 2-D weight is an nn.Linear's (out, in) or a Conv1D's (in, out), which its shape cannot
    tell: PEFT decides by the layer's class. Known from the architecture (variants.conv1d_names); for code that is
    not transformers' own, Conv1D only appears in GPT-2-derived code, under GPT-2's layer names, so only those
    names are in doubt, and the adapter's non-square layers of those names settle it when they agree."""

    names: frozenset[str] | None  # Conv1D layer names of a known architecture
    evidence: Layout | None  # the layout of the adapter's non-square GPT-2-named layers, when one
    unknown_why: str

    def square(self, adapter_path: Path, key: str, weight_name: str) -> Layout:
        leaf = strip_base_layers(key.removeprefix(PEFT_PREFIX)).rpartition(".")[2]
        if self.names is not None:
            return Layout.CONV1D if leaf in self.names else Layout.LINEAR
        if leaf not in GPT2_CONV1D:
            return Layout.LINEAR
        if self.evidence is not None:
            return self.evidence
        raise UnsupportedAdapter(
            f"{adapter_path}: '{key}' updates the square weight '{weight_name}', stored (out, in) if it is an "
            f"nn.Linear and (in, out) if it is GPT-2's Conv1D, and which it is cannot be known: {self.unknown_why}, "
            "and no non-square layer of the adapter named like GPT-2's shows it"
        )


def find_orientation(
    base_config: dict[str, Any],
    lora_names: dict[str, LoraPair],
    matched: dict[str, str | None],
    base: CheckpointIndex | None,
) -> Orientation:
    names = conv1d_names(base_config)
    if names is not None:
        return Orientation(names, None, "")
    if base_config.get("auto_map"):
        why = "the base runs code of its own (auto_map in config.json), not transformers'"
    elif base_config:
        why = "config.json names no model_type"
    else:
        why = "the base has no config.json naming its architecture"
    seen: set[Layout] = set()
    for name, pair in lora_names.items():
        target = matched.get(name)
        leaf = strip_base_layers(pair.module).rpartition(".")[2]
        if base is None or target is None or pair.embedding or pair.kernel or leaf not in GPT2_CONV1D:
            continue
        layouts = fitting_layouts(base.tensors[target].shape, *pair.weight_shape)
        if len(layouts) == 1:
            seen.add(layouts[0])
    return Orientation(None, seen.pop() if len(seen) == 1 else None, why)
