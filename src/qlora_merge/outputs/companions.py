"""The files beside the weights that a merge copies into the output (configs, tokenizer, chat template, code), and
the config.json it writes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..names import ADAPTER_CONFIG_NAME, PICKLE_INDEX_NAME, WEIGHTS_INDEX_NAME

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


def _input_file(path: Path, directory: Path) -> bool:
    """Whether `path` may be copied into the output: a regular file of the input directory, or a link to one
    inside it or, in the hub cache, in its repo's blobs/. Any other link is left out with a warning: followed, a
    link to /proc/self/environ or /etc/passwd would put that file into the merged model (and onto the hub)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if stat.S_ISREG(info.st_mode):
        return True
    if not stat.S_ISLNK(info.st_mode):
        return False
    root = directory.resolve()
    allowed = [root]
    if root.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<commit>/file -> ../../blobs/<hash>
        allowed.append(root.parent.parent / "blobs")
    target = path.resolve()
    if target.is_file() and any(target.is_relative_to(place) for place in allowed):
        return True
    log.warning("%s: a link to %s, which is not a file of this input directory: not copied", path, target)
    return False


def companion_files(base_dir: Path, weight_files: Iterable[str]) -> list[Path]:
    """Every top-level file of the base that is not weights: configs, tokenizer, chat template, code (regular files
    only, or links that stay inside the input: see `_input_file`)."""
    skip = set(weight_files) | set(WEIGHT_INDEXES) | set(NOT_COPIED)
    return sorted(
        p
        for p in base_dir.iterdir()
        if p.name not in skip
        and not p.name.endswith(WEIGHT_SUFFIXES)
        and not p.name.startswith(".")
        and _input_file(p, base_dir)
    )


def adapter_tokenizer_files(adapter_dir: Path) -> list[Path]:
    """Tokenizer files a trainer saved beside the adapter; they win over the base's (they may be resized)."""
    return [adapter_dir / name for name in TOKENIZER_FILES if _input_file(adapter_dir / name, adapter_dir)]


def copy_companions(files: Iterable[Path], destination: Path) -> None:
    for path in files:
        shutil.copyfile(path, destination / path.name)


def write_config(
    base_config: dict[str, Any], dtype_name: str, destination: Path, changes: dict[str, Any] | None = None
) -> None:
    """config.json with every dtype field (top level and nested sub-configs) set to the output dtype, and the
    plan's changes (`vocab_size` after a resize, `tie_word_embeddings` when untied) applied. A quantized base's
    `quantization_config` is left out: every weight of the merge is dequantized."""
    config = output_config(base_config, dtype_name, changes)
    (destination / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def output_config(
    base_config: dict[str, Any], dtype_name: str, changes: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The config.json `write_config` writes, as a dict."""
    return _with_changes(_with_dtype(_dequantized(base_config), dtype_name), changes or {})


def add_quantization_config(destination: Path, quantization: dict[str, Any]) -> None:
    """Add `quantization_config` to the config.json written in `destination` (`--requantize`: the output is
    quantized, and transformers reads how from there)."""
    path = destination / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = quantization
    path.write_text(json.dumps(config, indent=2) + "\n")


def _dequantized(config: dict[str, Any]) -> dict[str, Any]:
    if isinstance(config.get("quantization_config"), dict):
        return {key: value for key, value in config.items() if key != "quantization_config"}
    return config


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
