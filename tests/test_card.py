"""The model card every merge writes (README.md): base, adapter, scaling, dtype, version, a hash of each input,
and with --checksum the SHA-256 of every shard."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

from test_resolve import BASE_REPO, COMMIT, add_to_cache, hub_cache  # noqa: F401 (hub_cache is a fixture)
from tiny_checkpoints import llama_checkpoint

from qlora_merge import __version__, merge
from qlora_merge.cli import main
from qlora_merge.outputs.card import AdapterSource, Provenance, model_card

ROW = re.compile(r"^\| (\S+\.safetensors) \| ([0-9a-f]{64}) \|$", re.MULTILINE)
INPUT_ROW = re.compile(r"^\| (base|adapter) \| (\S+) \| (\d+) \| ([0-9a-f]{64}|not hashed) \|$", re.MULTILINE)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def inputs_listed(card: str) -> dict[tuple[str, str], tuple[int, str]]:
    return {(source, name): (int(size), digest) for source, name, size, digest in INPUT_ROW.findall(card)}


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
        assert digest == sha256(output / name), name
    assert card.startswith("---\ntags:\n"), "a local base is no hub repo: no base_model"
    assert f"`{adapter}`" in card and f"qlora-merge {__version__}" in card and "written as f16" in card

    result = merge(base, adapter, tmp_path / "lib", max_shard_size="8KB", dtype="f16", checksum=True)
    assert result.checksums == listed, "the same inputs give the same bytes, and the result reports them"


def test_every_merge_has_a_card_with_a_hash_of_each_input(tmp_path: Path) -> None:
    base, adapter = llama_checkpoint(tmp_path / "in", layers=2, shards=3)
    (base / "README.md").write_text("# The base model's own card\n")
    result = merge(base, adapter, tmp_path / "out", dtype="bf16")
    assert result.checksums == {}
    card = (tmp_path / "out" / "README.md").read_text()
    assert "The base model's own card" not in card, "the base's README.md is not copied: ours replaces it"
    assert f"| base model | `{base}` |" in card and f"| adapter | `{adapter}` |" in card
    assert "| LoRA | r=4, alpha=8, scaling=2 (alpha/r), 14 modules |" in card
    assert "| dtype | bf16 |" in card and f"| tool | qlora-merge {__version__} |" in card
    assert "## Checksums" not in card, "shard checksums only with --checksum"

    listed = inputs_listed(card)
    hashed = {
        ("adapter", "adapter_model.safetensors"): adapter / "adapter_model.safetensors",
        ("adapter", "adapter_config.json"): adapter / "adapter_config.json",
        ("base", "config.json"): base / "config.json",
        ("base", "model.safetensors.index.json"): base / "model.safetensors.index.json",
    }
    for key, path in hashed.items():
        assert listed.pop(key) == (path.stat().st_size, sha256(path)), key
    shards = {("base", p.name): (p.stat().st_size, "not hashed") for p in base.glob("model-*.safetensors")}
    assert len(shards) == 3 and listed == shards, "shards by name and size; nothing else"
    assert "would read the whole base a second time" in card
    assert result.inputs_sha256 == {f"{s}/{n}": sha256(p) for (s, n), p in hashed.items()}


def test_rslora_scaling_is_on_the_card(tmp_path: Path) -> None:
    base, adapter = llama_checkpoint(tmp_path / "in")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"use_rslora": True}))
    merge(base, adapter, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| LoRA | r=4, alpha=8, scaling=4 (alpha/sqrt(r), rsLoRA), 7 modules |" in card


def test_a_hub_base_names_its_commit_and_shard_hashes_come_from_the_cache(hub_cache: Path, tmp_path: Path) -> None:  # noqa: F811
    base, adapter = llama_checkpoint(tmp_path / "in", shards=2)
    add_to_cache(hub_cache, BASE_REPO, {p.name: p for p in base.iterdir()}, COMMIT, "main", symlinks=True)
    merge(BASE_REPO, adapter, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith(f'---\nbase_model: "{BASE_REPO}"\n')
    assert f"| base model | `{BASE_REPO}` (commit `{COMMIT}`) |" in card
    listed = inputs_listed(card)
    for shard in base.glob("model-*.safetensors"):
        assert listed[("base", shard.name)] == (shard.stat().st_size, sha256(shard)), "git LFS's blob name, not read"
    assert "not hashed" not in card


def test_a_repo_id_base_is_the_cards_base_model() -> None:
    card = model_card(
        Provenance("org/base-7b@main", (AdapterSource("org/adapter", "r=8, alpha=16, scaling=2"),), "bf16", "9.9")
    )
    assert card.startswith('---\nbase_model: "org/base-7b"\ntags:\n')
    assert "| base model | `org/base-7b@main` |" in card and "| LoRA | r=8, alpha=16, scaling=2 |" in card
    assert "## Checksums" not in card and "## Inputs" not in card
