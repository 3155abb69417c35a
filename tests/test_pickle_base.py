"""A base saved as PyTorch pickles (pytorch_model.bin, or shards with pytorch_model.bin.index.json) merges bit for
bit as the same base saved as safetensors; read with weights_only torch.load only, through temporary safetensors
files that are gone once the merge is."""

from __future__ import annotations

import contextlib
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
from qlora_merge.errors import CheckpointFormatError, MergeError
from qlora_merge.inputs import pickled
from qlora_merge.inputs.index import open_checkpoint
from qlora_merge.inputs.reader import TensorReader


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


def test_temporary_files_are_gone_from_tmpdir_at_once_and_readable_as_long_as_the_index(
    tmp_path: Path, own_tmpdir: Path
) -> None:
    """The copies are read through their descriptors, so their names go as soon as they are opened: a merge
    killed later (even by SIGKILL) leaves nothing in TMPDIR; the space comes back once the index is gone."""
    safetensors_base = make_base("llama", tmp_path / "base")
    base = pickle_base(safetensors_base, tmp_path / "bin-base", 2)
    index = open_checkpoint(base)
    assert list(own_tmpdir.glob("qlora-merge-bin-*")) == []
    assert sorted(index.weight_file_names) == sorted(p.name for p in base.glob("pytorch_model-*.bin"))
    expected = read_tensors(safetensors_base)
    with TensorReader() as reader:
        for name, entry in index.tensors.items():
            assert torch.equal(reader.read(entry), expected[name]), name

    def held_copies() -> list[str]:
        links = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the descriptor listdir itself used is gone
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
        return [link for link in links if str(own_tmpdir) in link]

    assert len(held_copies()) == 2 and all(link.endswith("(deleted)") for link in held_copies())
    del index, entry
    gc.collect()
    assert held_copies() == []


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


@pytest.fixture
def own_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TMPDIR for this test alone, so that what a conversion leaves there can be seen."""
    directory = tmp_path / "tmpdir"
    directory.mkdir()
    monkeypatch.setenv("TMPDIR", str(directory))
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


@pytest.fixture(scope="module")
def bin_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bin-inputs")
    base = make_base("llama", root / "base")
    return pickle_base(base, root / "bin-base", 2), make_adapter(base, root / "adapter", "llama")


def test_a_full_tmpdir_is_one_error_line_and_nothing_is_left_there(
    bin_inputs: tuple[Path, Path], own_tmpdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, adapter = bin_inputs
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))  # type: ignore[attr-defined]
    with pytest.raises(MergeError) as raised:
        merge(base, adapter, tmp_path / "out")
    message = str(raised.value)
    assert "\n" not in message and "No space left on device" in message
    assert f"free in TMPDIR ({own_tmpdir})" in message and "set TMPDIR to a directory on a disk with room" in message
    assert list(own_tmpdir.glob("qlora-merge-bin-*")) == [] and not (tmp_path / "out").exists()


def test_a_disk_that_fills_while_converting_is_one_error_line_and_nothing_is_left_there(
    bin_inputs: tuple[Path, Path], own_tmpdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The free space looked enough (quotas, another writer), then a write failed."""
    base, adapter = bin_inputs
    real_open = open

    def filling_open(path: Path, mode: str = "r") -> object:
        handle = real_open(path, mode)
        if "w" in mode:
            handle.write = lambda data: (_ for _ in ()).throw(OSError(28, "No space left on device"))  # type: ignore[method-assign]
        return handle

    monkeypatch.setattr(pickled, "open", filling_open, raising=False)
    with pytest.raises(MergeError, match=r"cannot write the temporary safetensors copy .* \(No space left on device\)"):
        merge(base, adapter, tmp_path / "out")
    assert list(own_tmpdir.glob("qlora-merge-bin-*")) == []


def test_an_unwritable_tmpdir_is_one_error_line(
    bin_inputs: tuple[Path, Path], own_tmpdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, adapter = bin_inputs
    monkeypatch.setattr(tempfile, "tempdir", str(own_tmpdir / "missing"))
    with pytest.raises(MergeError, match=r"missing: cannot write the temporary .* set TMPDIR to a writable directory"):
        merge(base, adapter, tmp_path / "out")


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupted_conversion_leaves_nothing_in_tmpdir(
    bin_inputs: tuple[Path, Path],
    own_tmpdir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    interrupt: type[BaseException],
) -> None:
    """Ctrl-C (or a signal a handler turns into an exception) halfway through writing the second shard's copy: the
    directory is gone before the exception leaves, not when the garbage collector gets to it."""
    base, adapter = bin_inputs
    real_open = open
    opened: list[Path] = []

    def interrupted_open(path: Path, mode: str = "r") -> object:
        handle = real_open(path, mode)
        opened.append(Path(path))
        if len(opened) == 2:
            real_write = handle.write

            def write_then_interrupt(data: bytes) -> int:
                real_write(data)
                assert list(own_tmpdir.glob("qlora-merge-bin-*/*")) == [opened[1]], "half a copy is there"
                raise interrupt()

            handle.write = write_then_interrupt  # type: ignore[method-assign]
        return handle

    monkeypatch.setattr(pickled, "open", interrupted_open, raising=False)
    with pytest.raises(interrupt) as raised:
        merge(base, adapter, tmp_path / "out")
    assert raised.tb is not None, "the traceback, and every frame in it, is still alive"
    assert len(opened) == 2 and list(own_tmpdir.glob("qlora-merge-bin-*")) == []
