"""Start-up: what answers before any tensor work does not import torch (about a second on its own)."""

from __future__ import annotations

import subprocess
import sys

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
