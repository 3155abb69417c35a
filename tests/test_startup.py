"""Start-up: what answers before any tensor work does not import torch (about a second on its own)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import sys
from qlora_merge.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
print("torch" in sys.modules, code)
"""


@pytest.mark.parametrize(
    "argv, code",
    [
        (["--help"], 0),
        (["--version"], 0),
        (["verify", "--help"], 0),
        (["inspect", "--help"], 0),
        (["--adapter", "a", "--output", "o", "--dtype", "f99"], 2),
        (["--adapter", "a", "--output", "o", "--bogus"], 2),
    ],
)
def test_answers_without_importing_torch(argv: list[str], code: int) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=60)
    assert done.stdout.split()[-2:] == ["False", str(code)], done.stdout + done.stderr


def test_a_merge_does_import_it() -> None:
    """The probe can fail: a command that reaches the library loads torch."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, "--base", "/nonexistent", "--adapter", "/nonexistent", "--output", "/tmp/x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.split()[-2:] == ["True", "2"], done.stdout + done.stderr


def test_prefetch_hints_a_local_base_and_ignores_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before torch loads, the CLI asks the kernel to read the start of a local base's shards (a hint: WILLNEED, in
    shard order, up to the budget); a hub id or a missing path is left to the merge, and a FIFO does not block."""
    import os

    from qlora_merge.inputs import prefetch

    for name, size in (("model-00002-of-00002.safetensors", 3000), ("model-00001-of-00002.safetensors", 5000)):
        (tmp_path / name).write_bytes(b"\0" * size)
    os.mkfifo(tmp_path / "a-fifo.safetensors")
    hints: list[tuple[str, int]] = []
    real_open = os.open
    opened: dict[int, str] = {}

    def recording_open(path: object, flags: int, *args: object) -> int:
        fd = real_open(path, flags, *args)  # type: ignore[arg-type]
        opened[fd] = Path(str(path)).name
        return fd

    monkeypatch.setattr(prefetch.os, "open", recording_open)
    monkeypatch.setattr(
        prefetch.os, "posix_fadvise", lambda fd, offset, count, advice: hints.append((opened[fd], count))
    )
    thread = prefetch.prefetch_base(str(tmp_path), budget=6000)
    assert thread is not None
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert hints == [("model-00001-of-00002.safetensors", 5000), ("model-00002-of-00002.safetensors", 1000)]
    assert prefetch.prefetch_base("someone/some-model") is None
    assert prefetch.prefetch_base(str(tmp_path / "missing")) is None
    assert prefetch.prefetch_base(None) is None
