"""FP8 bases with block scales (placeholder until the reader lands: no config matches yet)."""

from __future__ import annotations

from typing import Any

from .index import CheckpointIndex


def matches(config: dict[str, Any]) -> bool:
    return False


def summary(config: dict[str, Any]) -> str:
    return ""


def logical_index(index: CheckpointIndex, config: dict[str, Any]) -> CheckpointIndex:
    return index
