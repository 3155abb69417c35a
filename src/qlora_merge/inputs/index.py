"""Find a checkpoint's weight files in any of the common layouts and map every tensor to where it lives."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointFormatError, InputNotFound
from ..names import (
    PICKLE_INDEX_NAME,
    PICKLE_NAME,
    PICKLE_WEIGHTS,
    SHARD_PATTERN,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    shard_name,
)
from .format import SafetensorsFile, TensorEntry, read_safetensors_header
from .pickled import open_pickle_shards


@dataclass(frozen=True)
class CheckpointIndex:
    """Every tensor of a checkpoint, in file order and, within a file, in data order."""

    root: Path
    files: tuple[SafetensorsFile, ...]
    tensors: dict[str, TensorEntry]
    # how the weights are quantized (inputs/bnb.py's logical index: "bitsandbytes"), None for plain tensors
    quantization: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(entry.nbytes for entry in self.tensors.values())

    @property
    def weight_file_names(self) -> frozenset[str]:
        return frozenset(f.path.name for f in self.files)


def open_checkpoint(root: Path) -> CheckpointIndex:
    """Read the headers of every weight file under `root` (not the data) and validate them.

    A base saved only as PyTorch pickles (pytorch_model.bin, or shards and pytorch_model.bin.index.json) is read
    safely and converted shard by shard to temporary safetensors files first (see inputs/pickled.py).
    """
    if not root.is_dir():
        raise InputNotFound(f"{root}: base model directory not found")
    index_path = root / WEIGHTS_INDEX_NAME
    pickled = not index_path.is_file() and not (root / WEIGHTS_NAME).is_file()
    pickled = pickled and not any(SHARD_PATTERN.fullmatch(p.name) for p in root.iterdir())
    if pickled and ((root / PICKLE_INDEX_NAME).is_file() or (root / PICKLE_NAME).is_file()):
        index_path = root / PICKLE_INDEX_NAME
        if index_path.is_file():
            file_names, expected = read_index(index_path)
        else:
            file_names, expected = [PICKLE_NAME], None
        sources = [_inside(root, name, index_path) for name in file_names]
        files = open_pickle_shards(sources)
        # The index's names are not checked against the files: a tied weight pickled twice is converted once.
        return indexed(root, files, None, index_path)
    if index_path.is_file():
        file_names, expected = read_index(index_path)
    elif (root / WEIGHTS_NAME).is_file():
        file_names, expected = [WEIGHTS_NAME], None
    else:
        file_names = sorted(p.name for p in root.iterdir() if SHARD_PATTERN.fullmatch(p.name))
        expected = None
        if not file_names:
            pickled = [name for name in PICKLE_WEIGHTS if (root / name).exists()]
            if pickled:
                raise CheckpointFormatError(
                    f"{root / pickled[0]}: only pickle weights found in a format not read here; qlora-merge reads "
                    "safetensors checkpoints and pytorch_model.bin (or shards with pytorch_model.bin.index.json)"
                )
            raise CheckpointFormatError(f"{root}: no model.safetensors or model-*-of-*.safetensors weights found")
        check_complete_shard_set(root, file_names)

    files = tuple(read_safetensors_header(_inside(root, name, index_path)) for name in file_names)
    return indexed(root, files, expected, index_path)


def indexed(
    root: Path, files: tuple[SafetensorsFile, ...], expected: dict[str, str] | None, index_path: Path
) -> CheckpointIndex:
    """The CheckpointIndex of `root`'s weight `files` (headers already read and validated): no tensor in two files,
    every tensor where the index's weight_map (`expected`, None without an index) says, and at least one tensor."""
    tensors: dict[str, TensorEntry] = {}
    for weight_file in files:
        for entry in weight_file.tensors:
            if entry.name in tensors:
                raise CheckpointFormatError(
                    f"{weight_file.path}: tensor '{entry.name}' is also in {tensors[entry.name].file.name}"
                )
            tensors[entry.name] = entry
    if expected is not None:
        for name, file_name in expected.items():
            found = tensors.get(name)
            if found is None or found.file.name != Path(file_name).name:
                raise CheckpointFormatError(f"{index_path}: '{name}' is mapped to {file_name} but is not in it")
    if not tensors:
        raise CheckpointFormatError(f"{root}: the checkpoint contains no tensors")
    return CheckpointIndex(root=root, files=files, tensors=tensors)


def read_index(index_path: Path) -> tuple[list[str], dict[str, str]]:
    """A shard index's weight file names (in first-mention order) and its weight_map, checked to be well formed."""
    try:
        data = json.loads(index_path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: also bad UTF-8 and invalid JSON
        raise CheckpointFormatError(f"{index_path}: not a readable JSON index ({exc})") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFormatError(f"{index_path}: missing or empty 'weight_map'")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointFormatError(f"{index_path}: 'weight_map' must map tensor names to file names")
    return list(dict.fromkeys(weight_map.values())), weight_map


def _inside(root: Path, name: str, named_by: Path) -> Path:
    """A weight file named by an index must stay inside the checkpoint: no absolute paths, '..' or outward links."""
    candidate = root / name
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise CheckpointFormatError(
            f"{named_by}: weight file '{shown_name(name)}' points outside the checkpoint directory"
        )
    try:
        is_file = candidate.is_file()
    except OSError as exc:  # ENAMETOOLONG: a name past 255 bytes or a path past PATH_MAX, which no file can have
        raise CheckpointFormatError(
            f"{named_by}: weight file '{shown_name(name)}' is not a usable file name ({exc.strerror or exc})"
        ) from exc
    if not is_file:
        raise InputNotFound(f"{root / shown_name(name)}: weight file named by {named_by.name} is missing")
    if not candidate.resolve().is_relative_to(root.resolve()) and not _hub_blob(root, candidate):
        raise CheckpointFormatError(f"{named_by}: weight file '{name}' links outside the checkpoint directory")
    return candidate


# Longer names (a corrupt index, a mistyped path) are cut short in messages, which stay one readable line.
SHOWN_NAME_CHARS = 120


def shown_name(name: str) -> str:
    """`name` for a message: as it is, or its start and its length when it is longer than SHOWN_NAME_CHARS."""
    if len(name) <= SHOWN_NAME_CHARS:
        return name
    return f"{name[: SHOWN_NAME_CHARS - 20]}... ({len(name)} characters)"


def _hub_blob(root: Path, candidate: Path) -> bool:
    """huggingface_hub's cache links snapshots/<commit>/<file> to ../../blobs/<hash>: its layout, not an escape."""
    return root.parent.name == "snapshots" and candidate.resolve().parent == (root.parent.parent / "blobs").resolve()


def check_complete_shard_set(root: Path, file_names: list[str]) -> None:
    """`file_names` (model-NNNNN-of-MMMMM.safetensors) are one set, with no shard missing."""
    totals = {SHARD_PATTERN.fullmatch(name).group(2) for name in file_names}  # type: ignore[union-attr]
    if len(totals) != 1:
        raise CheckpointFormatError(f"{root}: shards from different sets: {', '.join(file_names)}")
    total = int(totals.pop())
    present = {int(SHARD_PATTERN.fullmatch(name).group(1)) for name in file_names}  # type: ignore[union-attr]
    missing = sorted(set(range(1, total + 1)) - present)
    if missing:
        raise InputNotFound(f"{root}: shard {shard_name(missing[0], total)} is missing")


# The dtypes a merge writes, by safetensors name.
OUTPUT_DTYPE_NAMES = ("BF16", "F16", "F32")


def open_merged(directory: Path) -> tuple[CheckpointIndex, str]:
    """A merged checkpoint and the dtype it was written in: that of most of its bf16/f16/f32 tensors (headers only,
    no tensor is read)."""
    if not directory.is_dir():
        raise InputNotFound(f"{directory}: merged model directory not found")
    index = open_checkpoint(directory)
    counts = Counter(entry.dtype for entry in index.tensors.values() if entry.dtype in OUTPUT_DTYPE_NAMES)
    if not counts:
        raise CheckpointFormatError(f"{directory}: no bf16, f16 or f32 tensors; not a checkpoint this tool wrote")
    return index, counts.most_common(1)[0][0]
