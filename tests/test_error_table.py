"""The README's table of errors covers every error the bad-input tests produce: each message matches a row."""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from test_bad_inputs import CASES, Sources, sources  # noqa: F401 - `sources` is the module fixture those cases use
from tiny_checkpoints import PEFT_PREFIX, llama_checkpoint

from qlora_merge import MergeError, merge

README = Path(__file__).parent.parent / "README.md"


def table_patterns() -> list[re.Pattern[str]]:
    """One regex per `fragment` in the first column of the README's error table; `...` stands for anything."""
    text = README.read_text().split("## Errors and what to do", 1)[1].split("\n## ", 1)[0]
    patterns = []
    for row in text.splitlines():
        if not row.startswith("| `"):
            continue
        first = re.split(r"(?<!\\)\|", row)[1]
        for fragment in re.findall(r"`([^`]+)`", first):
            parts = fragment.replace("\\|", "|").split("...")
            patterns.append(re.compile(".*".join(re.escape(part) for part in parts)))
    return patterns


def output_and_value_errors(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The messages of the refusals about the output and about merged values."""
    base, adapter = llama_checkpoint(tmp / "in")
    messages = []

    def expect(run: Callable[[], object]) -> None:
        with pytest.raises(MergeError) as raised:
            run()
        messages.append(str(raised.value))

    taken = tmp / "taken"
    taken.mkdir()
    (taken / "x").write_text("x")
    expect(lambda: merge(base, adapter, taken))
    (tmp / "file").write_text("x")
    expect(lambda: merge(base, adapter, tmp / "file", overwrite=True))
    expect(lambda: merge(base, adapter, base / "out"))
    expect(lambda: merge(base, adapter, tmp / "in", overwrite=True))
    with monkeypatch.context() as patch:
        patch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1, 1, 0))  # type: ignore[attr-defined]
        expect(lambda: merge(base, adapter, tmp / "out"))
    with monkeypatch.context() as patch:
        import tempfile

        patch.setattr(tempfile, "mkdtemp", lambda **kwargs: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
        expect(lambda: merge(base, adapter, tmp / "out"))
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors[f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"][0, 0] = math.nan
    save_file(tensors, weights)
    expect(lambda: merge(base, adapter, tmp / "out"))
    tensors[f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"][0, 0] = math.inf
    save_file(tensors, weights)
    expect(lambda: merge(base, adapter, tmp / "out"))
    tensors[f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj.lora_B.weight"][0, 0] = 1e6
    save_file(tensors, weights)
    expect(lambda: merge(base, adapter, tmp / "out", dtype="f16"))
    return messages


def test_every_error_message_has_a_row(sources: Sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    patterns = table_patterns()
    assert len(patterns) > 40
    messages = output_and_value_errors(tmp_path / "own", monkeypatch)
    for name, build, _, _ in CASES:
        case_dir = tmp_path / name
        case_dir.mkdir()
        bad = build(sources, case_dir)
        with pytest.raises(MergeError) as raised:
            merge(bad.base, bad.adapter, case_dir / "out", **bad.kwargs)
        messages.append(str(raised.value))
    missing = [m for m in messages if not any(p.search(m) for p in patterns)]
    assert not missing, "errors the README's table does not list:\n" + "\n".join(missing)
