"""A base checkpoint's config.json: read, and the fields the merge relies on checked for type."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import CheckpointFormatError
from ..names import CONFIG_NAME

log = logging.getLogger(__name__)


def read_base_config(base_dir: Path) -> dict[str, Any]:
    """The base's config.json, with the fields the merge reads type-checked; {} (and a warning) when there is
    none."""
    path = base_dir / CONFIG_NAME
    if not path.is_file():
        log.warning("%s: no config.json; the output will have none either", base_dir)
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError covers bad UTF-8 and JSON
        raise CheckpointFormatError(f"{path}: not valid JSON ({str(exc)[:200]})") from exc
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{path}: expected a JSON object")
    _check_config_fields(path, config, "")
    text_config = config.get("text_config")
    if isinstance(text_config, dict):
        _check_config_fields(path, text_config, "text_config.")
    return config


# The config.json fields the merge reads, and the JSON types it reads them as.
CONFIG_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    "architectures": list,
    "model_type": str,
    "text_config": dict,
    "tie_word_embeddings": bool,
    "vocab_size": int,
}


def _check_config_fields(path: Path, config: dict[str, Any], prefix: str) -> None:
    for key, expected in CONFIG_FIELD_TYPES.items():
        value = config.get(key)
        if value is None:
            continue
        wrong = not isinstance(value, expected) or (isinstance(value, bool) and expected is int)
        if key == "architectures" and not wrong:
            wrong = not all(isinstance(item, str) for item in value)
        if wrong:
            shown = repr(value)[:40]
            raise CheckpointFormatError(f"{path}: '{prefix}{key}' has the wrong type ({shown})")
