"""Which base a merge reads: the one given, or the one the adapters name; and a check that the two roles are not
swapped (a model passed as the adapter, an adapter as the base)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputNotFound, MergeError
from ..names import ADAPTER_CONFIG_NAME, CONFIG_NAME, PICKLE_WEIGHTS, SHARD_GLOB, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from .resolve import REPO_REF, resolve_adapter, with_revision


@dataclass(frozen=True)
class NamedBase:
    """The base an adapter's config names: `ref` is a repo id or a local directory that exists."""

    ref: str
    named_as: str  # base_model_name_or_path as written
    source: Path  # the adapter_config.json that names it


def default_base(
    adapter_refs: Sequence[str],
    hf_token: str | None = None,
    adapter_name: str | None = None,
    adapter_revision: str | None = None,
) -> NamedBase:
    """The base the adapters (local directories or repo ids, each resolved as a merge resolves it) name."""
    refs = [with_revision(ref, adapter_revision, "--adapter-revision") for ref in adapter_refs]
    return base_named_by([resolve_adapter(ref, hf_token, adapter_name) for ref in refs])


def base_named_by(adapter_dirs: Sequence[Path]) -> NamedBase:
    """The base every adapter was trained on (`base_model_name_or_path`), as PEFT's AutoPeftModel takes it.

    A local path is read from the working directory, as PEFT reads it, else from the adapter's directory (where a
    relative path saved with the adapter points). Raises MergeError naming the file when an adapter names no base,
    names a local path that is not there, or adapters name different bases.
    """
    named = [_named_base(directory) for directory in adapter_dirs]
    if len({base.ref for base in named}) > 1:
        first, other = named[0], next(base for base in named if base.ref != named[0].ref)
        raise MergeError(
            f"the adapters name different bases ({first.named_as!r} in {first.source}, {other.named_as!r} in "
            f"{other.source}): pass --base"
        )
    return named[0]


def _named_base(adapter_dir: Path) -> NamedBase:
    path = adapter_dir / ADAPTER_CONFIG_NAME
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputNotFound(f"{path}: not found, so no base is named: pass --base") from None
    except (OSError, ValueError) as exc:
        raise MergeError(f"{path}: cannot be read ({str(exc)[:120]})") from exc
    named = raw.get("base_model_name_or_path") if isinstance(raw, dict) else None
    if not isinstance(named, str) or not named.strip():
        raise MergeError(f"{path}: names no base (base_model_name_or_path is empty): pass --base")
    for candidate in (Path(named).expanduser(), adapter_dir / named):
        if candidate.is_dir():
            return NamedBase(os.path.normpath(candidate), named, path)
    if REPO_REF.fullmatch(named) and not named.startswith((".", "/", "~")):
        return NamedBase(named, named, path)
    raise InputNotFound(
        f"{path}: its base {named!r} is not a directory here (nor beside the adapter) nor a repo id: pass --base"
    )


def check_not_swapped(base_dir: Path, adapter_dirs: Sequence[Path], base_ref: str, adapter_refs: Sequence[str]) -> None:
    """Refuse, before anything else is read, a base that is an adapter or an adapter that is a model: the later
    errors (no weights, no adapter_config.json) would not say what happened."""
    base_is_adapter = (base_dir / ADAPTER_CONFIG_NAME).is_file() and not _has_model_weights(base_dir)
    for directory, ref in zip(adapter_dirs, adapter_refs, strict=True):
        adapter_is_model = (
            not (directory / ADAPTER_CONFIG_NAME).is_file()
            and (directory / CONFIG_NAME).is_file()
            and _has_model_weights(directory)
        )
        if adapter_is_model and base_is_adapter:
            raise MergeError(
                f"--base {base_ref} holds an adapter and --adapter {ref} holds a model: the two look swapped"
            )
        if adapter_is_model:
            raise MergeError(f"--adapter {ref} holds a model (config.json and weights), not a LoRA adapter")
    if base_is_adapter:
        raise MergeError(
            f"--base {base_ref} holds a LoRA adapter ({ADAPTER_CONFIG_NAME}), not a model: pass it as --adapter"
        )


def _has_model_weights(directory: Path) -> bool:
    names = (WEIGHTS_NAME, WEIGHTS_INDEX_NAME, *PICKLE_WEIGHTS)
    return any((directory / name).is_file() for name in names) or any(directory.glob(SHARD_GLOB))
