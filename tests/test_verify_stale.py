"""verify looks at the merged directory, not only at the tensors its layout names: a stale *.safetensors file beside
them (loaders that read every such file load it too) and a config.json that is gone or is not the one the merge
writes (the right tensors loaded into another model) are reported, and the merge is not verified."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tiny_checkpoints import llama_checkpoint

from qlora_merge import merge, verify
from qlora_merge.cli import main


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """A base in three shards, its adapter, and their merge as one model.safetensors and as shards."""
    root = tmp_path_factory.mktemp("stale")
    base, adapter = llama_checkpoint(root / "in", layers=2, shards=3)
    merge(base, adapter, root / "single")
    merge(base, adapter, root / "sharded", max_shard_size="20KB")
    assert len(list((root / "sharded").glob("model-*.safetensors"))) > 1
    return base, adapter, root / "single", root / "sharded"


def copied(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_both_merges_verify_as_written(merged: tuple[Path, Path, Path, Path]) -> None:
    base, adapter, single, sharded = merged
    assert verify(base, adapter, single).ok and verify(base, adapter, sharded).ok


def test_stale_shards_beside_model_safetensors_are_reported(
    merged: tuple[Path, Path, Path, Path], tmp_path: Path
) -> None:
    """The base's unmerged shards left in the output directory, as a merge into a copy of the base leaves them."""
    base, adapter, single, _ = merged
    out = copied(single, tmp_path / "out")
    stale = sorted(p.name for p in base.glob("model-*.safetensors"))
    for name in stale:
        shutil.copy(base / name, out / name)
    report = verify(base, adapter, out)
    assert not report.ok
    assert report.unexpected == tuple(stale) and not report.mismatched and not report.missing
    assert (
        "stale weight file" in report.details[stale[0]] and "model.safetensors holds it all" in report.details[stale[0]]
    )


def test_a_stale_single_file_beside_indexed_shards_is_reported(
    merged: tuple[Path, Path, Path, Path], tmp_path: Path
) -> None:
    base, adapter, single, sharded = merged
    out = copied(sharded, tmp_path / "out")
    shutil.copy(single / "model.safetensors", out / "model.safetensors")
    (out / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    report = verify(base, adapter, out)
    assert report.unexpected == ("adapter_model.safetensors", "model.safetensors")
    assert "model.safetensors.index.json does not name it" in report.details["model.safetensors"]


def test_a_deleted_config_is_reported(merged: tuple[Path, Path, Path, Path], tmp_path: Path) -> None:
    base, adapter, single, _ = merged
    out = copied(single, tmp_path / "out")
    (out / "config.json").unlink()
    report = verify(base, adapter, out)
    assert not report.ok and report.missing == ("config.json",)
    assert "the merge writes one" in report.details["config.json"]


def edited(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def apply(config: dict[str, Any]) -> dict[str, Any]:
        change(config)
        return config

    return apply


REPLACED = {
    "architecture": (
        edited(lambda c: c.update(architectures=["MistralForCausalLM"], model_type="mistral")),
        "'architectures' is [\"MistralForCausalLM\"] ([\"LlamaForCausalLM\"] expected); 'model_type' is",
    ),
    "dtype": (edited(lambda c: c.update(torch_dtype="float16")), '\'dtype\' is "float16" ("bfloat16" expected)'),
    "vocab_size": (edited(lambda c: c.update(vocab_size=128)), "'vocab_size' is 128, which the merge does not write"),
    "tying": (edited(lambda c: c.update(tie_word_embeddings=True)), "'tie_word_embeddings' is true, which the merge"),
    "nested": (
        edited(lambda c: c.update(text_config={"vocab_size": 1})),
        "'text_config' is {\"vocab_size\": 1}, which",
    ),
    "not json": (lambda c: "{", "not readable JSON"),
}


@pytest.mark.parametrize("case", sorted(REPLACED))
def test_a_replaced_config_is_reported(merged: tuple[Path, Path, Path, Path], tmp_path: Path, case: str) -> None:
    base, adapter, single, _ = merged
    out = copied(single, tmp_path / "out")
    change, detail = REPLACED[case]
    config = change(json.loads((out / "config.json").read_text()))
    (out / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    report = verify(base, adapter, out)
    assert not report.ok and report.mismatched == ("config.json",)
    assert detail in report.details["config.json"]
    assert report.details["config.json"].startswith("not the one the merge writes: ")


def test_who_wrote_the_config_and_the_dtype_fields_name_do_not_count(
    merged: tuple[Path, Path, Path, Path], tmp_path: Path
) -> None:
    """PEFT's save_pretrained() under another transformers writes its own version, and `dtype` for `torch_dtype`."""
    base, adapter, single, _ = merged
    out = copied(single, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = config.pop("torch_dtype")
    (out / "config.json").write_text(json.dumps(config | {"transformers_version": "9.9.9"}, indent=4))
    assert verify(base, adapter, out).ok


def test_a_config_where_the_merge_writes_none_is_reported(tmp_path: Path) -> None:
    base, adapter = llama_checkpoint(tmp_path / "in")
    (base / "config.json").unlink()
    merge(base, adapter, tmp_path / "out", loader="llama")
    assert not (tmp_path / "out" / "config.json").exists()
    assert verify(base, adapter, tmp_path / "out", loader="llama").ok
    shutil.copy(tmp_path / "out" / "README.md", tmp_path / "out" / "config.json")
    report = verify(base, adapter, tmp_path / "out", loader="llama")
    assert report.unexpected == ("config.json",) and "no config.json" in report.details["config.json"]


def test_the_command_line_says_what_is_wrong_and_exits_3(merged: tuple[Path, Path, Path, Path], tmp_path: Path) -> None:
    base, adapter, single, _ = merged
    out = copied(single, tmp_path / "out")
    (out / "config.json").unlink()
    shutil.copy(base / "model-00001-of-00003.safetensors", out)
    err = io.StringIO()
    argv = ["verify", "--base", str(base), "--adapter", str(adapter), "--merged", str(out)]
    assert main(argv, out=io.StringIO(), err=err) == 3
    line = err.getvalue().strip()
    assert "\n" not in line and "1 missing: config.json (the base has a config.json" in line
    assert "1 unexpected: model-00001-of-00003.safetensors (a stale weight file" in line
