"""Progress events a merge emits; the CLI renders them, scripts may log them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

STAGES = ("resolve", "base", "tokenizer", "adapter", "merge", "save", "gguf")


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


class stage:  # lower case: it reads as a statement, `with stage("base", progress, timings) as step:`
    """Times one stage and reports its start and end; `detail` set inside the block goes into the end event."""

    def __init__(self, name: str, progress: ProgressCallback, timings: dict[str, float]) -> None:
        self.name, self.progress, self.timings, self.detail = name, progress, timings, ""

    def __enter__(self) -> stage:
        self.started = time.perf_counter()
        self.progress(ProgressEvent(self.name, "start"))
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.timings[self.name] = time.perf_counter() - self.started
            self.progress(ProgressEvent(self.name, "done", self.detail, elapsed=self.timings[self.name]))
