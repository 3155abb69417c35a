"""Run one benchmarked child process and measure its wall time and peak resident set size.

The child is started with ``posix_spawn`` and reaped with ``os.wait4``, whose rusage gives that
child's own ``ru_maxrss``. Linux carries the spawning process's RSS high-water mark over into the
child at ``exec``, so the runner that calls this stays small (no torch) and records its own peak as
``rss_floor`` next to every measurement: a child's peak RSS cannot read below that floor.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

KIB = 1024


@dataclass(frozen=True)
class ChildResult:
    """Outcome of one measured child process."""

    argv: list[str]
    returncode: int
    wall_s: float
    peak_rss_bytes: int
    rss_floor_bytes: int
    stdout_path: Path
    stderr_path: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def error_line(self) -> str:
        """The last non-empty stderr line, or a description of the exit status."""
        lines = [line.strip() for line in self.stderr_path.read_text(errors="replace").splitlines()]
        lines = [line for line in lines if line]
        if self.returncode < 0:
            signal_note = f"killed by signal {-self.returncode}"
            return f"{signal_note}: {lines[-1]}" if lines else signal_note
        return lines[-1] if lines else f"exit status {self.returncode}, no stderr"


def _redirections(stdout_path: Path, stderr_path: Path) -> list[tuple]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    return [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(stdout_path), flags, 0o644),
        (os.POSIX_SPAWN_OPEN, 2, str(stderr_path), flags, 0o644),
    ]


def own_peak_rss_bytes() -> int:
    """This process's RSS high-water mark in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB


def run_child(argv: Sequence[str], log_stem: Path, env: Mapping[str, str]) -> ChildResult:
    """Run ``argv`` to completion with output in ``log_stem``.out/.err; measure wall time and peak RSS.

    Raises ``OSError`` when the program cannot be started at all.
    """
    log_stem.parent.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = log_stem.with_suffix(".out"), log_stem.with_suffix(".err")
    floor = own_peak_rss_bytes()
    started = time.perf_counter()
    pid = os.posix_spawnp(argv[0], list(argv), dict(env), file_actions=_redirections(stdout_path, stderr_path))
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - started
    return ChildResult(
        argv=list(argv),
        returncode=os.waitstatus_to_exitcode(status),
        wall_s=wall,
        peak_rss_bytes=usage.ru_maxrss * KIB,
        rss_floor_bytes=floor,
        stdout_path=stdout_path,
        stderr_path=stderr_path,
    )
