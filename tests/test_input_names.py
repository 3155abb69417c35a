"""Input paths and names the filesystem or UTF-8 cannot take: one error line (exit 2), or a complete merge, never an
internal error after the work is done."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from tiny_checkpoints import llama_checkpoint

from qlora_merge import merge, verify
from qlora_merge.cli import main
from qlora_merge.errors import CheckpointFormatError, InputNotFound


def test_an_index_naming_a_file_past_255_bytes_is_one_error_line(tmp_path: Path) -> None:
    base, adapter = llama_checkpoint(tmp_path / "in", shards=2)
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = "x" * 300 + ".safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointFormatError, match=r"weight file 'x+\.\.\. \(312 characters\)' is not a usable file"):
        merge(base, adapter, tmp_path / "out")
    err = io.StringIO()
    assert main(["--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "out")], err=err) == 2
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and "(File name too long)" in lines[0] and len(lines[0]) < 400
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["base", "adapter"])
@pytest.mark.parametrize("path", ["n" * 300, "n/" * 2100], ids=["name-too-long", "path-too-long"])
def test_a_base_or_adapter_path_the_filesystem_cannot_hold_is_one_error_line(
    tmp_path: Path, which: str, path: str
) -> None:
    base, adapter = llama_checkpoint(tmp_path / "in")
    bad = str(tmp_path / path)
    args = (bad, adapter) if which == "base" else (base, bad)
    with pytest.raises(InputNotFound, match=r"characters\): .* directory cannot be opened \(File name too long\)"):
        merge(*args, tmp_path / "out")
    with pytest.raises(InputNotFound, match="directory cannot be opened"):
        verify(*args, tmp_path / "in" / "base")


def test_an_adapter_directory_named_in_bytes_that_are_not_utf8_merges_and_has_a_card(tmp_path: Path) -> None:
    base, adapter = llama_checkpoint(tmp_path / "in")
    odd = Path(os.fsdecode(os.fsencode(tmp_path) + b"/adapter-\xff\xfe"))
    adapter.rename(odd)
    result = merge(base, odd, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_bytes().decode("utf-8")  # valid UTF-8
    assert "adapter-\\xff\\xfe`" in card, "the name's bytes are shown escaped"
    assert result.inputs_sha256["adapter/adapter_model.safetensors"]
    assert verify(base, odd, tmp_path / "out").ok
    out, err = io.StringIO(), io.StringIO()
    argv = ["--base", str(base), "--adapter", str(odd), "--output", str(tmp_path / "cli"), "--json"]
    assert main(argv, out=out, err=err) == 0, err.getvalue()
    assert json.loads(out.getvalue())["adapter"] == str(odd)
