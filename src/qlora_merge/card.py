"""The merged model's card (README.md): where it came from and, with --checksum, a SHA-256 per shard."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

CARD_NAME = "README.md"
HASH_CHUNK_BYTES = 8 << 20


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read a chunk at a time (shards are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def model_card(base: str, adapter: str, dtype: str, version: str, checksums: Mapping[str, str]) -> str:
    """A minimal model card: YAML front matter the hub reads (tags, and base_model when the base is a repo id
    rather than a local directory), provenance, shard checksums."""
    is_local = Path(base).exists()
    lines = [
        "---",
        *([] if is_local else [f"base_model: {json.dumps(base.split('@')[0])}"]),  # JSON strings are YAML scalars
        "tags:",
        "- merge",
        "- lora",
        "- qlora-merge",
        "---",
        "",
        "# Merged model",
        "",
        f"The LoRA adapter `{adapter}` merged into `{base}` by qlora-merge {version}, written as {dtype}.",
    ]
    if checksums:
        lines += ["", "## Checksums", "", "| file | SHA-256 |", "|---|---|"]
        lines += [f"| {name} | {digest} |" for name, digest in checksums.items()]
        lines += ["", "Check them with `sha256sum -c` on lines `<hash>  <file>`."]
    return "\n".join(lines) + "\n"


def write_card(directory: Path, base: str, adapter: str, dtype: str, version: str, shards: list[str]) -> dict[str, str]:
    """Hash every shard in `directory`, write the card there, and return the checksums."""
    checksums = {name: sha256_file(directory / name) for name in shards}
    (directory / CARD_NAME).write_text(model_card(base, adapter, dtype, version, checksums))
    return checksums
