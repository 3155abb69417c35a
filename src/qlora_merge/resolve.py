"""A local directory or a Hugging Face repo id -> a local directory (the only module that talks to the hub)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import InputNotFound

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Everything a merged model needs besides its weights, never the weights of other formats or sub-folders.
BASE_METADATA = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py", "tokenizer*"]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", *BASE_METADATA[1:]]


def resolve_base(ref: str, token: str | None = None, revision: str | None = None) -> Path:
    """A local checkpoint dir as is; a repo id downloaded (metadata first, then only the shards its index names)."""
    local = _local_dir(ref, "base model")
    if local is not None:
        return local
    root = _download(ref, BASE_METADATA, token, revision)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    else:
        shards = ["model.safetensors", "model-*-of-*.safetensors"]
    return _download(ref, shards, token, revision)


def resolve_adapter(ref: str, token: str | None = None, revision: str | None = None) -> Path:
    local = _local_dir(ref, "adapter")
    if local is not None:
        return local
    return _download(ref, ADAPTER_FILES, token, revision)


def _local_dir(ref: str, what: str) -> Path | None:
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InputNotFound(f"{ref}: {what} must be a directory")
    if not REPO_ID.fullmatch(ref) or ref.startswith((".", "/", "~")):
        raise InputNotFound(f"{ref}: {what} directory not found")
    return None


def _download(repo_id: str, patterns: list[str], token: str | None, revision: str | None) -> Path:
    # Imported here: a purely local merge should not pay for the hub client's import.
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=["*/*"], token=token
        )
    except RepositoryNotFoundError as exc:
        raise InputNotFound(f"{repo_id}: repository not found on the hub (or it is private: pass --hf-token)") from exc
    except LocalEntryNotFoundError as exc:
        raise InputNotFound(f"{repo_id}: not in the local hub cache and the hub cannot be reached") from exc
    except HfHubHTTPError as exc:
        raise InputNotFound(f"{repo_id}: download failed ({str(exc).splitlines()[0]})") from exc
    return Path(folder)
