"""The merged model's card (README.md): where it came from, with a hash of each input, and per-shard SHA-256s."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

CARD_NAME = "README.md"
HASH_CHUNK_BYTES = 8 << 20
# The hub cache stores a file tracked by git LFS as blobs/<its SHA-256>, others as blobs/<git's SHA-1>.
LFS_BLOB_NAME = re.compile(r"[0-9a-f]{64}")
# The base's small files that pin down what it is: hashed. (Its shards are listed, see input_files.)
BASE_FILES_HASHED = ("config.json", "model.safetensors.index.json")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read a chunk at a time (shards are gigabytes)."""
    digest = hashlib.sha256()
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
class Provenance:
    """What the card says the merge was made from, and how."""

    base: str  # as given: a directory or a repo id[@revision]
    adapter: str
    dtype: str
    version: str
    lora: str  # r, alpha, scaling and variants in a few words
    base_commit: str = ""  # the hub commit the files came from, when a repo id was resolved
    adapter_commit: str = ""
    inputs: tuple[InputFile, ...] = ()
    checksums: Mapping[str, str] = field(default_factory=dict)  # output shard -> SHA-256 (only with --checksum)


def snapshot_commit(directory: Path) -> str:
    """The commit of a hub cache snapshot directory (…/snapshots/<commit>), else ""."""
    return directory.name if directory.parent.name == "snapshots" else ""


def input_files(
    base_dir: Path, base_shards: Iterable[str], adapter_dir: Path, adapter_files: Iterable[str]
) -> list[InputFile]:
    """The adapter's files and the base's config and index, hashed (they are small); the base's shards by name and
    size only: hashing them would read the whole base a second time, since the merge reads it tensor by tensor,
    in parallel, not each file front to back. A shard from the hub cache gets its SHA-256 all the same, without a
    read: git LFS names the cached blob after it."""
    files = [
        InputFile("adapter", name, (adapter_dir / name).stat().st_size, sha256_file(adapter_dir / name))
        for name in adapter_files
        if (adapter_dir / name).is_file()
    ]
    for name in BASE_FILES_HASHED:
        if (base_dir / name).is_file():
            files.append(InputFile("base", name, (base_dir / name).stat().st_size, sha256_file(base_dir / name)))
    for name in sorted(base_shards):
        path = base_dir / name
        blob = path.resolve().name if path.is_symlink() else ""
        files.append(InputFile("base", name, path.stat().st_size, blob if LFS_BLOB_NAME.fullmatch(blob) else ""))
    return files


def model_card(info: Provenance) -> str:
    """A model card: YAML front matter the hub reads (tags, and base_model when the base is a repo id rather than
    a local directory), provenance, the hash of each input, and the shard checksums when computed."""
    is_local = Path(info.base).exists()
    base = f"`{info.base}`" + (f" (commit `{info.base_commit}`)" if info.base_commit else "")
    adapter = f"`{info.adapter}`" + (f" (commit `{info.adapter_commit}`)" if info.adapter_commit else "")
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
        f"The LoRA adapter {adapter} merged into {base} by qlora-merge {info.version}, written as {info.dtype}.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {base} |",
        f"| adapter | {adapter} |",
        f"| LoRA | {info.lora} |",
        f"| dtype | {info.dtype} |",
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
    return "\n".join(lines) + "\n"


def shard_checksums(directory: Path, shards: Iterable[str]) -> dict[str, str]:
    """The SHA-256 of every shard written to `directory`."""
    return {name: sha256_file(directory / name) for name in shards}


def write_card(directory: Path, info: Provenance) -> None:
    (directory / CARD_NAME).write_text(model_card(info))
