"""Decide, before any byte is written, what happens to every tensor: copy, convert, or merge, and where it goes.

Pure: reads headers and configs only. Every error a user can cause through mismatched inputs is raised here,
so a bad merge fails in a second, not after minutes of writing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .adapter.config import LoraConfig
from .adapter.weights import PEFT_PREFIX, AdapterWeights, LoraPair
from .checkpoint.format import FLOAT_DTYPES, TensorEntry
from .checkpoint.index import CheckpointIndex
from .checkpoint.writer import OutputTensor, ShardLayout, plan_shards
from .errors import ShapeMismatch, UnsupportedAdapter
from .keymap import Loader, match_modules
from .variants import is_transposed, lora_scaling, module_rank_alpha

OUTPUT_DTYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32"}
TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


class Action(enum.Enum):
    COPY = "copy"  # bytes unchanged
    CONVERT = "convert"  # same values, another float dtype
    MERGE = "merge"  # W + delta


@dataclass(frozen=True)
class LoraUpdate:
    pair: LoraPair
    scaling: float
    transposed: bool


@dataclass(frozen=True)
class TensorTask:
    source: TensorEntry
    output: OutputTensor
    action: Action
    update: LoraUpdate | None = None


@dataclass(frozen=True)
class MergePlan:
    tasks: tuple[TensorTask, ...]
    shards: tuple[ShardLayout, ...]

    @property
    def output_bytes(self) -> int:
        return sum(shard.nbytes for shard in self.shards)

    def count(self, action: Action) -> int:
        return sum(1 for task in self.tasks if task.action is action)


def build_plan(
    base: CheckpointIndex,
    base_config: dict[str, Any],
    config: LoraConfig,
    weights: AdapterWeights,
    loader: Loader,
    dtype: str,
    max_shard_bytes: int,
) -> MergePlan:
    """One task per base tensor, in the base's own order, so the input is read front to back."""
    out_dtype = OUTPUT_DTYPES[dtype]
    targets = match_modules(weights.pairs, base.tensors, loader, str(weights.path))
    updates = {
        target: _lora_update(weights.path, weights.pairs[module], base.tensors[target], config, base_config)
        for module, target in targets.items()
    }
    tasks = []
    for entry in base.tensors.values():
        target_dtype = out_dtype if entry.dtype in FLOAT_DTYPES else entry.dtype
        output = OutputTensor(entry.name, target_dtype, entry.shape)
        update = updates.get(entry.name)
        if update is not None:
            action = Action.MERGE
        elif target_dtype == entry.dtype:
            action = Action.COPY
        else:
            action = Action.CONVERT
        tasks.append(TensorTask(entry, output, action, update))
    shards = plan_shards([task.output for task in tasks], max_shard_bytes)
    return MergePlan(tasks=tuple(tasks), shards=tuple(shards))


def _lora_update(
    adapter_path: Path, pair: LoraPair, weight: TensorEntry, config: LoraConfig, base_config: dict[str, Any]
) -> LoraUpdate:
    key = f"{PEFT_PREFIX}{pair.module}"
    if weight.dtype not in FLOAT_DTYPES:
        raise UnsupportedAdapter(
            f"{weight.file}: '{weight.name}' is stored as {weight.dtype}; merging into quantized weights is not "
            "supported (use the full-precision base)"
        )
    r, alpha = module_rank_alpha(pair.module, config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern)
    if pair.rank != r:
        raise ShapeMismatch(f"{adapter_path}: '{key}' has rank {pair.rank} but adapter_config.json gives it r={r}")
    out_features, in_features = int(pair.b.shape[0]), int(pair.a.shape[1])
    transposed = is_transposed(
        weight.shape, out_features, in_features, config.fan_in_fan_out, base_config.get("model_type")
    )
    if transposed is None:
        raise ShapeMismatch(
            f"{adapter_path}: '{key}' updates a ({out_features}, {in_features}) weight but base tensor "
            f"'{weight.name}' is {weight.shape}"
        )
    return LoraUpdate(pair=pair, scaling=lora_scaling(alpha, r, config.use_rslora), transposed=transposed)
