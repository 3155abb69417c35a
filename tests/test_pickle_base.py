"""A base saved as PyTorch pickles (pytorch_model.bin, or shards with pytorch_model.bin.index.json) merges bit for
bit as the same base saved as safetensors; read with weights_only torch.load only, through temporary safetensors
files that are gone once the merge is."""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from factories import make_adapter, make_base, read_tensors

from qlora_merge import merge, verify
from qlora_merge.checkpoint import pickled
from qlora_merge.checkpoint.index import open_checkpoint
from qlora_merge.errors import CheckpointFormatError


def pickle_base(safetensors_base: Path, directory: Path, shards: int) -> Path:
    """The same base as torch.save'd state dicts in HF naming (transformers 5 no longer writes .bin): one
    pytorch_model.bin, or `shards` files and their index."""
    directory.mkdir()
    for path in safetensors_base.iterdir():
        if not path.name.startswith("model") or path.suffix not in (".safetensors", ".json"):
            shutil.copy(path, directory / path.name)
    tensors = read_tensors(safetensors_base)
    names = list(tensors)
    if shards == 1:
        torch.save(tensors, directory / "pytorch_model.bin")
        return directory
    weight_map = {}
    for i in range(shards):
        file_name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {name: tensors[name] for name in names[i::shards]}
        torch.save(part, directory / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())}}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
    return directory


@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_pickle_base_merges_like_the_safetensors_base(tmp_path: Path, arch: str, shards: int) -> None:
    base = make_base(arch, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", arch)
    merge(str(base), str(adapter), str(tmp_path / "reference"))
    bin_base = pickle_base(base, tmp_path / "bin-base", shards)
    if arch == "qwen2":  # tied: a pickle keeps the head as a second view of the embedding; converted once
        state = torch.load(bin_base / "pytorch_model.bin", weights_only=True) if shards == 1 else None
        if state is not None:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
            torch.save(state, bin_base / "pytorch_model.bin")
    before = set(Path(tempfile.gettempdir()).glob("qlora-merge-bin-*"))

    out = tmp_path / "out"
    merge(str(bin_base), str(adapter), str(out))
    gc.collect()

    reference = read_tensors(tmp_path / "reference")
    ours = read_tensors(out)
    assert sorted(ours) == sorted(reference)
    for name, expected in reference.items():
        assert ours[name].dtype == expected.dtype and torch.equal(ours[name], expected), name
    assert not {p.name for p in out.iterdir()} & {"pytorch_model.bin", "pytorch_model.bin.index.json"}
    assert set(Path(tempfile.gettempdir()).glob("qlora-merge-bin-*")) <= before, "temporary files left"
    assert verify(str(bin_base), str(adapter), str(out)).ok


def test_temporary_files_live_as_long_as_the_index(tmp_path: Path) -> None:
    base = pickle_base(make_base("llama", tmp_path / "base"), tmp_path / "bin-base", 2)
    index = open_checkpoint(base)
    converted = {entry.file.parent for entry in index.tensors.values()}
    assert len(converted) == 1
    scratch = converted.pop()
    assert scratch != base and scratch.is_dir()
    assert sorted(index.weight_file_names) == sorted(p.name for p in base.glob("pytorch_model-*.bin"))
    del index
    gc.collect()
    assert not scratch.exists()


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.makedirs, (str(self.marker),))


def test_pickle_with_code_is_refused_without_running_it(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(2), "x": _RunsCode(tmp_path / "ran")}, path)
    with pytest.raises(CheckpointFormatError, match="refused, it pickles objects other than tensors"):
        pickled.load_pickle_weights(path)
    assert not (tmp_path / "ran").exists()
    torch.save({"w": torch.zeros(2), "nested": {"a": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointFormatError, match="expected a mapping of names to tensors"):
        pickled.load_pickle_weights(path)
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointFormatError, match="legacy"):
        pickled.load_pickle_weights(path)
