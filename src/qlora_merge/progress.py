"""Progress events the pipeline emits; the CLI renders them, scripts may log them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

STAGES = ("resolve", "base", "tokenizer", "adapter", "merge", "save")


@dataclass(frozen=True)
class ProgressEvent:
    """stage is one of STAGES; status is 'start', 'update' (merge only, after each tensor) or 'done'.

    'resolve' finds the inputs (downloading repo ids) and reads config.json; its 'done' detail is the
    architecture the --loader resolved to.
    """

    stage: str
    status: str
    detail: str = ""
    elapsed: float = 0.0
    tensors_done: int = 0
    tensors_total: int = 0
    bytes_done: int = 0
    bytes_total: int = 0


ProgressCallback = Callable[[ProgressEvent], None]


def ignore_progress(event: ProgressEvent) -> None:
    """The default callback: the library itself never prints."""


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as disk sizes and the hub show them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
