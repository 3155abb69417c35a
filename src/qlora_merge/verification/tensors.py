"""Prove a merge took: derive every output tensor again from base and adapter and compare it, byte for byte,
with the merged checkpoint on disk.

The derivation is the merge engine itself (`stream.run_plan`) writing into a comparing sink instead of shards, so
the check streams like a merge: flat memory, any size. It catches a merged checkpoint that is corrupt, truncated,
made from another base or adapter, missing tensors, carrying extra ones (a LoRA key left behind), or of another
dtype or shape. Beyond the tensors the checkpoint's layout names, the directory is checked too (`check_directory`):
a stale *.safetensors file beside them, which loaders that read every such file load as well, and a config.json
that is missing or not the one the merge writes (another architecture, dtype, vocab_size or tying would load the
right tensors into the wrong model). That the engine's math equals PEFT's is what the oracle tests prove.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy
import torch

from ..inputs.format import TensorEntry
from ..inputs.index import CheckpointIndex
from ..inputs.reader import TensorReader
from ..inputs.sources import Source
from ..merging.stream import run_plan
from ..names import CONFIG_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from ..outputs.companions import write_config
from ..plan.tasks import MergePlan, OutputTensor

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


def check_against_plan(plan: MergePlan, source: Source, merged: CheckpointIndex, reader: TensorReader) -> VerifyReport:
    """Run the plan into a sink that compares each tensor with `merged`, then account for every merged tensor."""
    sink = ComparingSink(merged)
    try:
        run_plan(plan, source, reader, sink, lambda task, written: None)
        sink.finish()
    finally:
        sink.abort()
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


# config.json fields that say who wrote the file, not what the model is: transformers writes its own version, and
# PEFT's save_pretrained() (whose output verifies) may run under another one than the base was saved with.
CONFIG_PROVENANCE = frozenset({"transformers_version", "_name_or_path", "_commit_hash"})
# The same field under the name older (torch_dtype) and newer (dtype) transformers give it.
DTYPE_ALIASES = {"torch_dtype": "dtype"}
SHOWN_CONFIG_DIFFERENCES = 3


def expected_config(base_config: dict[str, Any], dtype_name: str, changes: dict[str, Any]) -> dict[str, Any] | None:
    """The config.json a merge of these inputs writes (outputs.write_config's own output), or None where it writes
    none (the base has no config.json)."""
    if not base_config:
        return None
    with tempfile.TemporaryDirectory(prefix="qlora-merge-verify-") as directory:
        write_config(base_config, dtype_name, Path(directory), changes)
        return json.loads((Path(directory) / CONFIG_NAME).read_text())


def check_directory(report: VerifyReport, merged: CheckpointIndex, config: dict[str, Any] | None) -> VerifyReport:
    """`report` with what the merged directory holds besides the tensors its layout names: every *.safetensors
    file the layout leaves out (`unexpected`), and config.json against `config`, the one the merge writes
    (`missing`, `mismatched`, or `unexpected` where the merge writes none); each with its reason in `details`."""
    unexpected, missing, mismatched = list(report.unexpected), list(report.missing), list(report.mismatched)
    details = dict(report.details)
    layout = _layout_name(merged)
    for path in sorted(merged.root.glob("*.safetensors")):
        # Hidden files are not read by loaders, which glob as the shell does.
        if path.name not in merged.weight_file_names and not path.name.startswith(".") and path.is_file():
            unexpected.append(path.name)
            details[path.name] = (
                f"a stale weight file: not part of the checkpoint ({layout}), but loaders that read every "
                "*.safetensors file load it too"
            )
    path = merged.root / CONFIG_NAME
    if config is None:
        if path.exists():
            unexpected.append(CONFIG_NAME)
            details[CONFIG_NAME] = "the base has no config.json, so the merge writes none"
    elif not path.is_file():
        missing.append(CONFIG_NAME)
        details[CONFIG_NAME] = "the base has a config.json, so the merge writes one"
    else:
        differences = _config_differences(path, config)
        if differences:
            mismatched.append(CONFIG_NAME)
            shown = "; ".join(differences[:SHOWN_CONFIG_DIFFERENCES])
            more = len(differences) - SHOWN_CONFIG_DIFFERENCES
            details[CONFIG_NAME] = f"not the one the merge writes: {shown}" + (f"; {more} more" if more > 0 else "")
    return replace(
        report,
        unexpected=tuple(unexpected),
        missing=tuple(missing),
        mismatched=tuple(mismatched),
        details=details,
    )


def _layout_name(merged: CheckpointIndex) -> str:
    if (merged.root / WEIGHTS_INDEX_NAME).is_file():
        return f"{WEIGHTS_INDEX_NAME} does not name it"
    if merged.weight_file_names == {WEIGHTS_NAME}:
        return f"{WEIGHTS_NAME} holds it all"
    return "not one of its numbered shards"


def _config_differences(path: Path, expected: dict[str, Any]) -> list[str]:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        return [f"not readable JSON ({str(exc)[:80]})"]
    if not isinstance(found, dict):
        return ["not a JSON object"]
    return _differences(found, expected, "")


def _differences(found: dict[str, Any], expected: dict[str, Any], prefix: str) -> list[str]:
    """Each field that differs, by name: every field counts but who wrote the file (CONFIG_PROVENANCE), and the
    dtype under either of its names."""
    found, expected = _comparable(found), _comparable(expected)
    lines = []
    for key in list(expected) + [k for k in found if k not in expected]:
        name = f"{prefix}{key}"
        if key not in found:
            lines.append(f"'{name}' is missing ({_shown(expected[key])} expected)")
        elif key not in expected:
            lines.append(f"'{name}' is {_shown(found[key])}, which the merge does not write")
        elif isinstance(found[key], dict) and isinstance(expected[key], dict):
            lines += _differences(found[key], expected[key], f"{name}.")
        elif found[key] != expected[key] or isinstance(found[key], bool) != isinstance(expected[key], bool):
            lines.append(f"'{name}' is {_shown(found[key])} ({_shown(expected[key])} expected)")
    return lines


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    comparable = {}
    for key, value in config.items():
        if key in CONFIG_PROVENANCE:
            continue
        alias = DTYPE_ALIASES.get(key, key)
        if alias != key and alias in config:
            continue  # both names: the newer one is what transformers reads
        comparable[alias] = value
    return comparable


def _shown(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


class ComparingSink:
    """A sink (outputs/sink.py) that compares a merge's output with the merged checkpoint's bytes instead of writing
    them: what verify runs the plan into."""

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

    def start(self, tensors: Sequence[OutputTensor]) -> None:
        """Nothing to lay out: the merged files are there already."""

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

    def finish(self) -> None:
        self._reader.close()

    def abort(self) -> None:
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
