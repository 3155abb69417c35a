"""The output directory: a temporary sibling filled completely, then renamed into place; companion files."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import OutputError
from .names import ADAPTER_CONFIG_NAME, PICKLE_INDEX_NAME, WEIGHTS_INDEX_NAME
from .progress import human_bytes

log = logging.getLogger(__name__)

# Files of other weight formats are not companions: copying them would ship stale, unmerged weights.
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".onnx_data",
    ".gguf",
    ".ot",
    ".tflite",
    ".npz",
    ".pkl",
)
WEIGHT_INDEXES = (WEIGHTS_INDEX_NAME, PICKLE_INDEX_NAME)
NOT_COPIED = ("README.md", ".gitattributes", ADAPTER_CONFIG_NAME)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)


def check_output_free(output: Path, overwrite: bool) -> None:
    """Refuse an output that exists and holds something, unless overwriting: checked before any download."""
    if output.exists() and not output.is_dir():
        raise OutputError(f"{output}: exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise OutputError(f"{output}: exists and is not empty (pass --overwrite to replace it)")


def check_not_inside(output: Path, inputs: Iterable[Path], may_hold: Iterable[Path] = ()) -> None:
    """Refuse an output equal to or inside an input, or holding one: replacing it would delete what is read.

    An input in `may_hold` (the adapter) may hold the output in a subdirectory, as axolotl lays it out
    ({output_dir}/merged beside the adapter files): only its top-level files are read, and a merge never
    replaces anything but the output directory itself.
    """
    resolved = output.resolve()
    nested_ok = [source.resolve() for source in may_hold]
    for source in [*inputs, *may_hold]:
        inside = resolved.is_relative_to(source.resolve()) and source.resolve() not in nested_ok
        if resolved == source.resolve() or inside:
            raise OutputError(f"{output}: output must not be inside an input ({source})")
        if source.resolve().is_relative_to(resolved):
            raise OutputError(f"{output}: output must not contain an input ({source}): replacing it would delete it")


# Free space kept beyond the planned bytes: headers, companion files, and a disk never filled to the last byte.
SPACE_HEADROOM_BYTES = 64 << 20


def check_free_space(output: Path, needed: int) -> None:
    """Refuse to start a merge whose output cannot fit: better now than after writing most of it.

    The space is measured on the nearest existing ancestor of the output (the directories may not exist yet).
    An old output being replaced still takes its space until the end, so it is not counted as free.
    """
    place = output.resolve()
    while not place.exists() and place != place.parent:
        place = place.parent
    try:
        free = shutil.disk_usage(place).free
    except OSError:  # cannot tell (an unusual filesystem): writing will report a full disk by itself
        return
    wanted = needed + SPACE_HEADROOM_BYTES
    if free < wanted:
        raise OutputError(
            f"{place}: not enough free space for the output: needs {human_bytes(wanted)} ({wanted} bytes, "
            f"{SPACE_HEADROOM_BYTES >> 20} MiB of it headroom), {human_bytes(free)} ({free} bytes) available"
        )


def remove_stale(output: Path) -> list[Path]:
    """Clear what merges into `output` that were killed (SIGKILL, power loss) left beside it; returns it.

    A merge writes into `.NAME.partial-PID-*` and, while replacing an old output, parks that one in
    `.NAME.old-PID-*`; a killed process cannot remove them. Only directories of exactly these names whose
    process is no longer alive on this machine are touched. An old output parked by a merge killed between its
    two renames is the only copy left: it is put back in place rather than deleted.
    """
    parent = output.resolve().parent
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        kind = _stale_kind(entry, output.name)
        if kind is None:
            continue
        path = Path(entry.path)
        parked = path / output.name
        if kind == "old" and parked.is_dir() and not os.path.lexists(output.resolve()):
            parked.rename(output.resolve())
            log.warning("%s: put back the previous output, which a killed merge had moved to %s", output, path)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _stale_kind(entry: os.DirEntry[str], name: str) -> str | None:
    for kind in ("partial", "old"):
        prefix = f".{name}.{kind}-"
        if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
            pid = entry.name[len(prefix) :].split("-", 1)[0]
            return kind if pid.isdigit() and not _alive(int(pid)) else None
    return None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def make_staging_dir(output: Path) -> tuple[Path, list[Path]]:
    """A hidden sibling of the output on the same filesystem, so the final rename is atomic. Its name carries
    this process's id, so a later merge can tell it from a live one's when this process is killed.

    Missing parent directories are created; they are returned, deepest first, so that a failed merge can remove
    them again and leave the disk as it found it.
    """
    parent = output.resolve().parent
    created = [p for p in (parent, *parent.parents) if not p.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-{os.getpid()}-", dir=parent))
    except OSError as exc:
        _remove_empty(created)
        raise OutputError(f"{parent}: cannot create the output there ({exc.strerror or exc})") from exc
    # mkdtemp makes the directory private (0700); the published model should get the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    return staging, created


def publish(staging: Path, output: Path) -> None:
    """Move the finished staging dir into place; an old output is only removed once the new one is complete."""
    _fsync_dir(staging)
    output = output.resolve()
    retired = None
    if output.exists():
        retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-{os.getpid()}-", dir=output.parent))
        output.rename(retired / output.name)
    try:
        staging.rename(output)
    except BaseException:
        if retired is not None:  # put the old output back: a failed merge must leave it as it was
            (retired / output.name).rename(output)
            retired.rmdir()
        raise
    _fsync_dir(output.parent)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def discard(staging: Path, created_parents: Iterable[Path] = ()) -> None:
    """Remove a staging dir and the parent directories made for it (if still empty)."""
    shutil.rmtree(staging, ignore_errors=True)
    _remove_empty(created_parents)


def _remove_empty(directories: Iterable[Path]) -> None:
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:  # not empty (someone else wrote there) or already gone: leave it
            return


def companion_files(base_dir: Path, weight_files: Iterable[str]) -> list[Path]:
    """Every top-level file of the base that is not weights: configs, tokenizer, chat template, code."""
    skip = set(weight_files) | set(WEIGHT_INDEXES) | set(NOT_COPIED)
    return sorted(
        p
        for p in base_dir.iterdir()
        if p.is_file() and p.name not in skip and not p.name.endswith(WEIGHT_SUFFIXES) and not p.name.startswith(".")
    )


def adapter_tokenizer_files(adapter_dir: Path) -> list[Path]:
    """Tokenizer files a trainer saved beside the adapter; they win over the base's (they may be resized)."""
    return [adapter_dir / name for name in TOKENIZER_FILES if (adapter_dir / name).is_file()]


def copy_companions(files: Iterable[Path], destination: Path) -> None:
    for path in files:
        shutil.copyfile(path, destination / path.name)


def write_config(
    base_config: dict[str, Any], dtype_name: str, destination: Path, changes: dict[str, Any] | None = None
) -> None:
    """config.json with every dtype field (top level and nested sub-configs) set to the output dtype, and the
    plan's changes (`vocab_size` after a resize, `tie_word_embeddings` when untied) applied."""
    config = _with_changes(_with_dtype(base_config, dtype_name), changes or {})
    (destination / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _with_changes(config: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """Set each changed field at the top level and in a nested `text_config` (multimodal models keep the language
    model's vocab_size and tying there); a field a config lacks is added at the top level only."""
    updated = dict(config)
    text = dict(updated["text_config"]) if isinstance(updated.get("text_config"), dict) else None
    for key, value in changes.items():
        updated[key] = value
        if text is not None and key in text:
            text[key] = value
    if text is not None:
        updated["text_config"] = text
    return updated


def _with_dtype(config: dict[str, Any], dtype_name: str) -> dict[str, Any]:
    updated = {}
    for key, value in config.items():
        if key in ("torch_dtype", "dtype") and (value is None or isinstance(value, str)):
            updated[key] = dtype_name
        elif isinstance(value, dict):
            updated[key] = _with_dtype(value, dtype_name)
        else:
            updated[key] = value
    if "torch_dtype" not in updated and "dtype" not in updated and "model_type" in updated:
        updated["torch_dtype"] = dtype_name
    return updated


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
