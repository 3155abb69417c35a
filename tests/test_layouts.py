"""Input layouts, output sharding, companion files, key prefixes and the all-or-nothing output directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from factories import assert_same_tensors, logits, make_adapter, make_base, peft_merge, read_config, read_tensors
from safetensors.torch import save_file

from qlora_merge import KeyMatchError, OutputError, merge
from qlora_merge.merging import stream as stream_module


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A sharded bf16 llama, an adapter for it, and PEFT's merge of the two."""
    root = tmp_path_factory.mktemp("llama")
    base = make_base("llama", root / "base")
    adapter = make_adapter(base, root / "adapter", "llama")
    return base, adapter, peft_merge(base, adapter, root / "peft", torch.bfloat16)


def copy_weights_as(base: Path, directory: Path, layout: str) -> Path:
    """The same tensors as `base`, saved in another on-disk layout."""
    directory.mkdir()
    shutil.copy(base / "config.json", directory / "config.json")
    tensors = read_tensors(base)
    if layout == "single":
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    elif layout == "one-of-one":
        save_file(tensors, directory / "model-00001-of-00001.safetensors", metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": dict.fromkeys(tensors, "model-00001-of-00001.safetensors")}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    elif layout == "shards-without-index":
        for shard in base.glob("model-*.safetensors"):
            shutil.copy(shard, directory / shard.name)
    return directory


@pytest.mark.parametrize("layout", ["single", "one-of-one", "shards-without-index"])
def test_input_layouts(layout: str, llama: tuple, tmp_path: Path) -> None:
    base, adapter, reference = llama
    other = copy_weights_as(base, tmp_path / "base", layout)
    merge(other, adapter, tmp_path / "out")
    assert_same_tensors(read_tensors(tmp_path / "out"), reference)


def test_small_model_is_one_file_without_index(llama: tuple, tmp_path: Path) -> None:
    base, adapter, _ = llama
    result = merge(base, adapter, tmp_path / "out")
    assert result.shards == ("model.safetensors",)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_output_shards_follow_max_shard_size(llama: tuple, tmp_path: Path) -> None:
    base, adapter, reference = llama
    result = merge(base, adapter, tmp_path / "out", max_shard_size="40KB")
    out = tmp_path / "out"
    n = len(result.shards)
    assert n > 2
    assert result.shards == tuple(f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in reference.values())
    assert set(index["weight_map"]) == set(reference)
    for shard in result.shards:
        size = sum(read_tensors_in(out / shard))
        assert size <= 40_000 or len(list(read_tensors_in(out / shard))) == 1
    assert_same_tensors(read_tensors(out), reference)
    torch.testing.assert_close(logits(out), logits(base, adapter), rtol=0.05, atol=0.05)


def read_tensors_in(path: Path):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            tensor = f.get_tensor(key)
            yield tensor.numel() * tensor.element_size()


def test_companion_files_are_copied_and_adapter_tokenizer_wins(llama: tuple, tmp_path: Path) -> None:
    base_src, adapter_src, _ = llama
    base = tmp_path / "base"
    adapter = tmp_path / "adapter"
    shutil.copytree(base_src, base)
    shutil.copytree(adapter_src, adapter)
    (base / "tokenizer.json").write_text('{"from": "base"}')
    (base / "tokenizer_config.json").write_text('{"from": "base"}')
    (base / "tokenizer.model").write_bytes(b"\x00sentencepiece")
    (base / "special_tokens_map.json").write_text("{}")
    (base / "chat_template.jinja").write_text("{{ messages }}")
    (base / "README.md").write_text("base model card")
    (base / "pytorch_model.bin").write_bytes(b"stale weights")
    (base / "original").mkdir()
    (base / "original" / "consolidated.00.pth").write_bytes(b"stale weights")
    (adapter / "tokenizer_config.json").write_text('{"from": "adapter"}')

    merge(base, adapter, tmp_path / "out", dtype="f16")

    out = tmp_path / "out"
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "tokenizer.model", "special_tokens_map.json", "chat_template.jinja"} <= names
    assert {"generation_config.json", "config.json", "model.safetensors"} <= names
    assert not {"pytorch_model.bin", "original", "adapter_config.json"} & names
    assert "base model card" not in (out / "README.md").read_text(), "the card is ours, not the base's"
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"from": "adapter"}
    assert json.loads((out / "tokenizer.json").read_text()) == {"from": "base"}
    config, base_config = read_config(out), read_config(base)
    assert config["dtype"] == "float16"
    assert {k: v for k, v in config.items() if k != "dtype"} == {k: v for k, v in base_config.items() if k != "dtype"}


def rename_keys(base: Path, directory: Path, old: str, new: str, extra: dict[str, torch.Tensor] | None = None) -> Path:
    directory.mkdir()
    shutil.copy(base / "config.json", directory / "config.json")
    tensors = {k.replace(old, new, 1): v for k, v in read_tensors(base).items()}
    save_file(tensors | (extra or {}), directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def test_text_adapter_into_multimodal_layout(llama: tuple, tmp_path: Path) -> None:
    """seed 001's --loader qwen3.5 case: adapter keys `model.layers...`, checkpoint `model.language_model.layers...`;
    extra tensors no model class would load (mtp.*) are carried over untouched."""
    base, adapter, reference = llama
    mtp = {"mtp.layers.0.mlp.down_proj.weight": torch.randn(64, 112).to(torch.bfloat16)}
    nested = rename_keys(base, tmp_path / "vlm", "model.layers.", "model.language_model.layers.", mtp)
    result = merge(nested, adapter, tmp_path / "out")
    ours = read_tensors(tmp_path / "out")
    expected = {k.replace("model.layers.", "model.language_model.layers.", 1): v for k, v in reference.items()}
    assert_same_tensors(ours, expected | mtp)
    assert result.tensors_merged == 14


def test_multimodal_adapter_into_flat_layout(llama: tuple, tmp_path: Path) -> None:
    base, adapter_src, reference = llama
    adapter = tmp_path / "adapter"
    shutil.copytree(adapter_src, adapter)
    weights = read_tensors(adapter)
    renamed = {k.replace("model.model.layers.", "model.model.language_model.layers."): v for k, v in weights.items()}
    save_file(renamed, adapter / "adapter_model.safetensors")
    merge(base, adapter, tmp_path / "out")
    assert_same_tensors(read_tensors(tmp_path / "out"), reference)


def test_ambiguous_match_needs_a_loader(llama: tuple, tmp_path: Path) -> None:
    base, adapter, reference = llama
    tensors = read_tensors(base)
    vision = {
        k.replace("model.layers.", "model.visual.layers.", 1): v.clone() for k, v in tensors.items() if ".layers." in k
    }
    ambiguous = rename_keys(base, tmp_path / "vlm", "model.layers.", "model.language_model.layers.", vision)
    with pytest.raises(KeyMatchError, match=r"matches several base tensors.*--loader"):
        merge(ambiguous, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    merge(ambiguous, adapter, tmp_path / "out", loader="qwen3.5")
    ours = read_tensors(tmp_path / "out")
    for name, value in reference.items():
        assert torch.equal(ours[name.replace("model.layers.", "model.language_model.layers.", 1)], value)
    for name, value in vision.items():
        assert torch.equal(ours[name], value), "the vision tower must stay untouched"


def test_existing_output_is_refused_then_replaced_with_overwrite(llama: tuple, tmp_path: Path) -> None:
    base, adapter, reference = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep me unless --overwrite")
    with pytest.raises(OutputError, match="--overwrite"):
        merge(base, adapter, out)
    assert (out / "old.txt").exists()
    merge(base, adapter, out, overwrite=True)
    assert not (out / "old.txt").exists()
    assert_same_tensors(read_tensors(out), reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no staging or retired directories left"


def test_output_inside_an_input_is_refused(llama: tuple, tmp_path: Path) -> None:
    base, adapter, _ = llama
    with pytest.raises(OutputError, match="inside an input"):
        merge(base, adapter, base / "merged")
    assert not (base / "merged").exists()


def test_failure_midway_leaves_nothing(llama: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, adapter, _ = llama
    calls = 0
    real_merge = stream_module._merge

    def failing_merge(*args: object) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise OSError(28, "No space left on device")
        real_merge(*args)

    monkeypatch.setattr(stream_module, "_merge", failing_merge)
    with pytest.raises(OSError, match="No space left"):
        merge(base, adapter, tmp_path / "merged" / "run-1" / "out")
    assert calls == 5
    assert list(tmp_path.iterdir()) == [], "neither the staging dir nor the parents made for it are left"


def test_a_failed_final_rename_puts_the_old_output_back(
    llama: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, adapter, _ = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous merge")
    from qlora_merge import OutputError
    from qlora_merge.outputs import staging as outputs

    real_rename = outputs._rename

    def rename(source: Path, target: Path, flags: int) -> None:
        if source.name.startswith(".out.partial-"):
            raise OSError(5, "Input/output error")
        real_rename(source, target, flags)

    monkeypatch.setattr(outputs, "_rename", rename)
    with pytest.raises(OutputError, match=r"cannot be replaced \(Input/output error\)"):
        merge(base, adapter, out, overwrite=True)
    assert (out / "old.txt").read_text() == "previous merge"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no staging or retired directory left"
