"""--checksum: the output's model card lists every shard with its SHA-256; without it there is no card."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

from tiny_checkpoints import llama_checkpoint

from qlora_merge import __version__, merge
from qlora_merge.card import model_card
from qlora_merge.cli import main

ROW = re.compile(r"^\| (\S+\.safetensors) \| ([0-9a-f]{64}) \|$", re.MULTILINE)


def test_checksums_of_every_shard_are_in_the_card(tmp_path: Path) -> None:
    base, adapter = llama_checkpoint(tmp_path / "in", layers=2)
    output = tmp_path / "out"
    argv = ["--base", str(base), "--adapter", str(adapter), "--output", str(output), "--dtype", "f16"]
    assert main([*argv, "--max-shard-size", "8KB", "--checksum"], out=io.StringIO(), err=io.StringIO()) == 0
    shards = sorted(p.name for p in output.glob("*.safetensors"))
    assert len(shards) > 2
    card = (output / "README.md").read_text()
    listed = dict(ROW.findall(card))
    assert sorted(listed) == shards
    for name, digest in listed.items():
        assert digest == hashlib.sha256((output / name).read_bytes()).hexdigest(), name
    assert card.startswith("---\ntags:\n"), "a local base is no hub repo: no base_model"
    assert f"`{adapter}`" in card and f"qlora-merge {__version__}" in card and "written as f16" in card

    result = merge(base, adapter, tmp_path / "lib", max_shard_size="8KB", dtype="f16", checksum=True)
    assert result.checksums == listed, "the same inputs give the same bytes, and the result reports them"


def test_no_card_without_checksum(tmp_path: Path) -> None:
    base, adapter = llama_checkpoint(tmp_path / "in")
    result = merge(base, adapter, tmp_path / "out")
    assert result.checksums == {}
    assert not (tmp_path / "out" / "README.md").exists()


def test_a_repo_id_base_is_the_cards_base_model() -> None:
    card = model_card("org/base-7b@main", "org/adapter", "bf16", "9.9", {})
    assert card.startswith('---\nbase_model: "org/base-7b"\ntags:\n')
    assert "## Checksums" not in card
