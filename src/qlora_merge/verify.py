"""Prove a merge took: derive every output tensor again from base and adapter and compare it, byte for byte,
with the merged checkpoint on disk.

The derivation is the merge engine itself (`stream.run_plan`) writing into a comparing sink instead of shards, so
the check streams like a merge: flat memory, any size. It catches a merged checkpoint that is corrupt, truncated,
made from another base or adapter, missing tensors, carrying extra ones (a LoRA key left behind, a stale shard),
or of another dtype or shape. That the engine's math equals PEFT's is what the oracle tests prove.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy
import torch

from .checkpoint.format import TensorEntry
from .checkpoint.index import CheckpointIndex
from .checkpoint.reader import TensorReader
from .plan import MergePlan
from .stream import run_plan

# The merged checkpoint is read back in pieces of at most this many bytes, compared with what the merge produces.
COMPARE_CHUNK_BYTES = 8 << 20
LORA_MARKERS = (".lora_", "lora_magnitude_vector", ".base_layer.", "modules_to_save", "trainable_tokens")


@dataclass(frozen=True)
class VerifyReport:
    """What the check found; `ok` when every planned tensor matched and nothing else is in the merged files."""

    merged: Path
    tensors_checked: int
    tensors_merged: int
    mismatched: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    lora_keys: tuple[str, ...] = ()
    details: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.mismatched or self.missing or self.unexpected or self.lora_keys)

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"merged": str(self.merged), "ok": self.ok}


def check_against_plan(plan: MergePlan, merged: CheckpointIndex, reader: TensorReader) -> VerifyReport:
    """Run the plan into a sink that compares each tensor with `merged`, then account for every merged tensor."""
    sink = _ComparingSink(merged)
    try:
        run_plan(plan, reader, sink, lambda task, written: None)  # type: ignore[arg-type]
    finally:
        sink.close()
    planned = {task.output.name for task in plan.tasks}
    for task in plan.tasks:
        entry = merged.tensors.get(task.output.name)
        if entry is not None and (entry.dtype, entry.shape) != (task.output.dtype, task.output.shape):
            expected = f"{task.output.dtype}{list(task.output.shape)}"
            sink.details[task.output.name] = f"{entry.dtype}{list(entry.shape)} in the merged file, {expected} expected"
            if task.output.name not in sink.mismatched:
                sink.mismatched.append(task.output.name)
    extra = sorted(set(merged.tensors) - planned)
    lora_keys = tuple(name for name in extra if any(marker in name for marker in LORA_MARKERS))
    return VerifyReport(
        merged=merged.root,
        tensors_checked=len(planned),
        tensors_merged=sum(1 for task in plan.tasks if task.update is not None),
        mismatched=tuple(sink.mismatched),
        missing=tuple(sink.missing),
        unexpected=tuple(name for name in extra if name not in lora_keys),
        lora_keys=lora_keys,
        details=dict(sink.details),
    )


class _ComparingSink:
    """Takes a merge's output like CheckpointWriter does (begin / write / copy_from / end) and compares it with the
    merged checkpoint's bytes instead of writing them."""

    def __init__(self, merged: CheckpointIndex) -> None:
        self._merged = merged
        self._reader = TensorReader()
        self._entry: TensorEntry | None = None
        self._cursor = 0
        self._equal = True
        self._name = ""
        self.bytes_written = 0
        self.mismatched: list[str] = []
        self.missing: list[str] = []
        self.details: dict[str, str] = {}

    def begin(self, name: str) -> None:
        self._name, self._cursor, self._equal = name, 0, True
        self._entry = self._merged.tensors.get(name)
        if self._entry is None:
            self.missing.append(name)

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        self._compare(view)
        self.bytes_written += len(view)

    def copy_from(self, src_fd: int, offset: int, count: int, source: Path) -> None:
        for start in range(0, count, COMPARE_CHUNK_BYTES):
            size = min(COMPARE_CHUNK_BYTES, count - start)
            self._compare(memoryview(os.pread(src_fd, size, offset + start)))
            self.bytes_written += size

    def end(self) -> None:
        entry = self._entry
        if entry is None:
            return
        if self._cursor != entry.nbytes:
            self._equal = False
            self.details[self._name] = f"{entry.nbytes} bytes in the merged file, {self._cursor} expected"
        if not self._equal:
            self.mismatched.append(self._name)

    def close(self) -> None:
        self._reader.close()

    def _compare(self, expected: memoryview) -> None:
        entry = self._entry
        if entry is None or not self._equal:
            self._cursor += len(expected)
            return
        if self._cursor + len(expected) > entry.nbytes:
            self._equal = False
            self.details[self._name] = f"{entry.dtype}{list(entry.shape)} in the merged file is smaller than expected"
            return
        found = torch.empty(len(expected), dtype=torch.uint8)
        self._reader.read_bytes_into(entry.file, entry.start + self._cursor, found)
        if not numpy.array_equal(found.numpy(), numpy.frombuffer(expected, dtype=numpy.uint8)):
            self._equal = False
            self.details[self._name] = "values differ from base + adapter"
        self._cursor += len(expected)
