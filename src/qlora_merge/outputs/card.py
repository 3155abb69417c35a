"""The merged model's card (README.md): where it came from, with a hash of each input, and per-shard SHA-256s."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..inputs.opened import OpenedFile

CARD_NAME = "README.md"
HASH_CHUNK_BYTES = 8 << 20
# The hub cache stores a file tracked by git LFS as blobs/<its SHA-256>, others as blobs/<git's SHA-1>.
LFS_BLOB_NAME = re.compile(r"[0-9a-f]{64}")
# The base's small files that pin down what it is: hashed. (Its shards are listed, see input_files.)
BASE_FILES_HASHED = ("config.json", "model.safetensors.index.json")
COMBINATION_TEXT = {
    "cat": "the weighted sum of the adapters' deltas",
    "linear": "PEFT's add_weighted_adapter linear: the factors averaged, cross terms included",
}


def sha256_file(path: Path, opened: OpenedFile | None = None) -> str:
    """Hex SHA-256 of a file, read a chunk at a time (shards are gigabytes); through `opened`, the descriptor the
    merge read it by, when given."""
    digest = hashlib.sha256()
    if opened is not None:
        offset = 0
        while chunk := os.pread(opened.fd, HASH_CHUNK_BYTES, offset):
            digest.update(chunk)
            offset += len(chunk)
        return digest.hexdigest()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class InputFile:
    """One file the merge read; `sha256` is empty for a base shard that was not hashed (see `input_files`)."""

    source: str  # "base" or "adapter"
    name: str
    size: int
    sha256: str = ""


@dataclass(frozen=True)
class AdapterSource:
    """One adapter the merge applied."""

    ref: str  # as given: a directory or a repo id[@revision]
    lora: str  # r, alpha, scaling and variants in a few words
    weight: float = 1.0
    commit: str = ""  # the hub commit the files came from, when a repo id was resolved


@dataclass(frozen=True)
class Provenance:
    """What the card says the merge was made from, and how."""

    base: str  # as given: a directory or a repo id[@revision]
    adapters: tuple[AdapterSource, ...]
    dtype: str
    version: str
    base_commit: str = ""  # the hub commit the files came from, when a repo id was resolved
    inputs: tuple[InputFile, ...] = ()
    checksums: Mapping[str, str] = field(default_factory=dict)  # output shard -> SHA-256 (only with --checksum)
    combination: str = ""  # how several adapters were combined ("cat", "linear")
    subtract: bool = False  # the adapters' deltas were taken out of `base` rather than added
    base_quantization: str = ""  # how the base was quantized (its weights were dequantized to be merged)
    # --base-quant: how the base's weights were round-tripped through 4-bit before merging, in words
    base_roundtrip: str = ""
    # --requantize: how the output's weights are quantized, in words
    requantized: str = ""


def snapshot_commit(directory: Path) -> str:
    """The commit of a hub cache snapshot directory (…/snapshots/<commit>), else ""."""
    return directory.name if directory.parent.name == "snapshots" else ""


def input_files(
    base_dir: Path,
    base_shards: Iterable[str],
    adapters: Iterable[tuple[str, Path, Iterable[str]]],
    opened: Iterable[OpenedFile] = (),
) -> list[InputFile]:
    """Each adapter's files (`adapters`: the name the card gives it, its directory, its file names) and the base's
    config and index, hashed (they are small); the base's shards by name and size only: hashing them would read
    the whole base a second time, since the merge reads it tensor by tensor, in parallel, not each file front to
    back. A shard from the hub cache gets its SHA-256 all the same, without a read: git LFS names the cached blob
    after it. A file among `opened` (the weight files the merge read through their descriptors) is described
    from its descriptor: the card is about the file merged, even if its path names another one by now."""
    by_path = {os.path.abspath(f.source): f for f in opened}
    files = []
    for source, directory, names in adapters:
        for name in names:
            path = directory / name
            handle = by_path.get(os.path.abspath(path))
            if handle is not None:
                files.append(InputFile(source, name, handle.size, sha256_file(path, handle)))
            elif path.is_file():
                files.append(InputFile(source, name, path.stat().st_size, sha256_file(path)))
    for name in BASE_FILES_HASHED:
        if (base_dir / name).is_file():
            files.append(InputFile("base", name, (base_dir / name).stat().st_size, sha256_file(base_dir / name)))
    for name in sorted(base_shards):
        path = base_dir / name
        handle = by_path.get(os.path.abspath(path))
        current = handle is None or handle.same_as(path)
        blob = path.resolve().name if current and path.is_symlink() else ""
        size = handle.size if handle is not None else path.stat().st_size
        files.append(InputFile("base", name, size, blob if LFS_BLOB_NAME.fullmatch(blob) else ""))
    return files


def model_card(info: Provenance) -> str:
    """A model card: YAML front matter the hub reads (tags, and base_model when the base is a repo id rather than
    a local directory), provenance, the hash of each input, and the shard checksums when computed."""
    is_local = Path(info.base).exists()
    base = f"`{info.base}`" + (f" (commit `{info.base_commit}`)" if info.base_commit else "")
    adapters = [f"`{a.ref}`" + (f" (commit `{a.commit}`)" if a.commit else "") for a in info.adapters]
    several = len(info.adapters) > 1
    weighted = several or any(a.weight != 1.0 for a in info.adapters)
    if several:
        what = "The LoRA adapters " + ", ".join(
            f"{name} (weight {a.weight:g})" for name, a in zip(adapters, info.adapters, strict=True)
        )
        what += f", combined as '{info.combination}',"
    else:
        what = f"The LoRA adapter {adapters[0]}" + (f" (weight {info.adapters[0].weight:g})" if weighted else "")
    what += f" {'subtracted from' if info.subtract else 'merged into'} {base}"
    rows = []
    for number, (name, adapter) in enumerate(zip(adapters, info.adapters, strict=True), start=1):
        tag = f" {number}" if several else ""
        rows.append(f"| adapter{tag} | {name}" + (f", weight {adapter.weight:g}" if weighted else "") + " |")
        rows.append(f"| LoRA{tag} | {adapter.lora} |")
    lines = [
        "---",
        *([] if is_local else [f"base_model: {json.dumps(info.base.split('@')[0])}"]),  # JSON strings are YAML scalars
        "tags:",
        "- merge",
        "- lora",
        "- qlora-merge",
        "---",
        "",
        "# Merged model",
        "",
        f"{what} by qlora-merge {info.version}, written as {info.dtype}.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {base} |",
        *([f"| base quantization | {info.base_quantization} (dequantized) |"] if info.base_quantization else []),
        *([f"| base weights | {info.base_roundtrip} |"] if info.base_roundtrip else []),
        *rows,
        *([f"| combination | {info.combination} ({COMBINATION_TEXT.get(info.combination, '')}) |"] if several else []),
        *(["| operation | subtracted (the adapters' deltas taken out of the base) |"] if info.subtract else []),
        f"| dtype | {info.dtype} |",
        *([f"| quantization | {info.requantized} |"] if info.requantized else []),
        f"| tool | qlora-merge {info.version} |",
    ]
    if info.inputs:
        lines += ["", "## Inputs", "", "| from | file | bytes | SHA-256 |", "|---|---|---|---|"]
        lines += [f"| {f.source} | {f.name} | {f.size} | {f.sha256 or 'not hashed'} |" for f in info.inputs]
        if any(not f.sha256 for f in info.inputs):
            lines += [
                "",
                "Base shards marked *not hashed* are listed by name and size only: hashing them would read the whole "
                "base a second time. The base's `config.json` and shard index are hashed.",
            ]
    if info.checksums:
        lines += ["", "## Checksums", "", "| file | SHA-256 |", "|---|---|"]
        lines += [f"| {name} | {digest} |" for name, digest in info.checksums.items()]
        lines += ["", "Check them with `sha256sum -c` on lines `<hash>  <file>`."]
    return _printable("\n".join(lines) + "\n")


def _printable(text: str) -> str:
    """`text` as valid UTF-8, as a card must be: a path whose name is not UTF-8 holds its raw bytes as lone
    surrogates (Python's surrogateescape), which are shown as `\\xNN` escapes instead of failing the write."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # surrogates that are not escaped bytes
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def shard_checksums(directory: Path, shards: Iterable[str]) -> dict[str, str]:
    """The SHA-256 of every shard written to `directory`."""
    return {name: sha256_file(directory / name) for name in shards}


def write_card(directory: Path, info: Provenance) -> None:
    (directory / CARD_NAME).write_text(model_card(info), encoding="utf-8")
