"""What every adapter tensor does to the output, for `inspect` and the merge report: the plan read back per key."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from ..adapter.weights import AdapterWeights, describe_key
from .tasks import ExpertUpdate, LoraUpdate, MergePlan, TokenUpdate


@dataclass(frozen=True)
class CoverageRow:
    """One adapter tensor and what it does to the output (`target` is empty when it updates nothing)."""

    adapter_key: str
    role: str
    adapter_shape: tuple[int, ...]
    target: str
    target_shape: tuple[int, ...]
    action: str


def coverage(plan: MergePlan, weights: AdapterWeights) -> list[CoverageRow]:
    """Every adapter tensor -> the output tensor it changes, in adapter-file order. Each one must be accounted for:
    used, a checked tied copy, not needed, or explicitly allowed unused; one the plan forgot is a bug."""
    rows: dict[str, CoverageRow] = {}
    per_expert = Counter(
        t.update.pair.keys for t in plan.tasks if isinstance(t.update, ExpertUpdate) and t.update.expert is not None
    )
    for task in plan.tasks:
        action = task.action.value + (f", {task.note}" if task.note else "")
        if isinstance(task.update, LoraUpdate):
            action += f", {task.update.layout.value}" + (" DoRA" if task.update.dora else "")
        elif isinstance(task.update, TokenUpdate):
            action += f", {len(task.update.indices)} token rows replaced"
        elif isinstance(task.update, ExpertUpdate):
            update = task.update
            if update.expert is None:
                action += f", all {update.experts} experts"
            else:  # one row per key: its first tensor, and how many it updates
                action += f", {update.experts} experts in {per_expert[update.pair.keys]} per-expert tensors like it"
                if any(key in rows for key in task.adapter_keys):
                    continue
        for key in task.adapter_keys:
            rows[key] = CoverageRow(
                key, describe_key(key), weights.shapes[key], task.output.name, task.output.shape, action
            )
    for key in plan.tied_copies:
        rows[key] = CoverageRow(key, describe_key(key), weights.shapes[key], "", (), "tied copy of the embedding's")
    for key in plan.unused:
        why = f"{plan.unused_reasons[key]}, " if key in plan.unused_reasons else ""
        rows[key] = CoverageRow(key, describe_key(key), weights.shapes[key], "", (), f"unused ({why}--allow-unused)")
    for key, why in weights.redundant.items():
        rows[key] = CoverageRow(key, describe_key(key), weights.shapes[key], "", (), f"not needed: {why}")
    missing = [key for key in weights.shapes if key not in rows]
    if missing:
        raise RuntimeError(f"{weights.path}: adapter tensors the plan does not use: {', '.join(missing[:5])}")
    return [rows[key] for key in weights.shapes]
