"""What a plan is made of: one task per output tensor, saying where its values come from and which rule makes them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from ..adapter.weights import AdapterTensor, LoraPair, Replacement
from ..inputs.format import TensorEntry, tensor_nbytes
from ..merging.variants import Layout, merged_whole


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the merged model: its name, dtype (safetensors' name: BF16, F16, F32) and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


class Action(enum.Enum):
    COPY = "copy"  # bytes unchanged
    CONVERT = "convert"  # same values, another float dtype
    MERGE = "merge"  # W + delta (W from the base, or from the adapter's replacement)
    REPLACE = "replace"  # the adapter's tensor instead of the base's


@dataclass(frozen=True)
class LoraUpdate:
    pair: LoraPair
    scaling: float
    layout: Layout
    round_delta: bool = False  # PEFT rounds the delta to the weight's dtype before adding it

    @property
    def transposed(self) -> bool:
        return self.layout.transposed

    @property
    def dora(self) -> bool:
        return self.pair.magnitude is not None

    @property
    def whole(self) -> bool:
        return merged_whole(self.layout, self.dora)


@dataclass(frozen=True)
class BiasUpdate:
    """lora_bias=True: bias += scaling * lora_B.bias."""

    tensor: AdapterTensor
    scaling: float


@dataclass(frozen=True)
class TokenUpdate:
    """trainable_token_indices: rows `indices` of the weight take the values of `delta` (tokens, dim)."""

    indices: tuple[int, ...]
    delta: AdapterTensor


@dataclass(frozen=True)
class ExpertUpdate:
    """LoRA on a fused 3-D expert parameter (target_parameters): A (E*r, in) and B (out, E*r) update W (E, d1, d2).

    `expert` None: the output tensor is the fused parameter itself, merged one expert at a time. Otherwise it is
    one expert's Linear weight of a per-expert checkpoint: rows `rows` of that expert's (d1, d2) delta.
    """

    pair: LoraPair
    scaling: float
    experts: int
    transposed: bool  # W is (experts, in, out): the layer's `is_transposed`
    expert: int | None = None
    rows: tuple[int, int] | None = None


Update = LoraUpdate | BiasUpdate | TokenUpdate | ExpertUpdate
# Output tensor name -> its update and the adapter keys that make it.
Updates = dict[str, tuple[Update, tuple[str, ...]]]


@dataclass(frozen=True)
class TensorTask:
    output: OutputTensor
    action: Action
    held_dtype: str  # the dtype PEFT holds the weight in while it merges
    source: TensorEntry | None = None  # the base tensor the values come from
    replacement: Replacement | None = None  # or the adapter tensor that replaces it
    update: Update | None = None
    adapter_keys: tuple[str, ...] = ()  # the adapter tensors this output uses
    note: str = ""


@dataclass(frozen=True)
class MergePlan:
    """Every output tensor, in the order it is written (the base's own, so the input is read front to back), and
    what the adapter changes beside the weights. Logical: dtypes and shapes, no files, shards or byte offsets of
    the output, which its sink decides."""

    tasks: tuple[TensorTask, ...]
    config_changes: dict[str, Any] = field(default_factory=dict)
    unused: tuple[str, ...] = ()  # adapter keys that update nothing (only with allow_unused)
    tied_copies: tuple[str, ...] = ()  # adapter keys that mirror tied tensors already merged
    # why an unused key is unused, where it is not that it matches no base tensor (adapter_config.json leaves its
    # module out)
    unused_reasons: dict[str, str] = field(default_factory=dict)

    @property
    def output_bytes(self) -> int:
        """The tensors' size in their dtypes (a safetensors output's size, less its headers)."""
        return sum(task.output.nbytes for task in self.tasks)

    def count(self, action: Action) -> int:
        return sum(1 for task in self.tasks if task.action is action)
