"""An input replaced or rewritten while a merge runs: the merge reads the files it planned from (the descriptors their
headers were read through), so a replacement cannot slip another checkpoint's tensors into the output; a file
changed in place fails the merge. Either way, never a mix of two checkpoints with exit 0."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from factories import make_adapter, make_base, read_tensors
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_pickle_base import pickle_base

from qlora_merge import MergeError, merge
from qlora_merge.inputs.format import read_safetensors_header
from qlora_merge.inputs.reader import TensorReader
from qlora_merge.progress import ProgressEvent


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A sharded llama base, an adapter, and their merge made while nothing changed."""
    root = tmp_path_factory.mktemp("stable")
    base = make_base("llama", root / "base")
    adapter = make_adapter(base, root / "adapter", "llama")
    merge(base, adapter, root / "reference")
    return base, adapter, root / "reference"


def copy_tree(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def other_values(path: Path) -> dict[str, torch.Tensor]:
    return {name: tensor + 1 for name, tensor in load_file(path).items()}


def replace_file(path: Path) -> None:
    """Another file of the same layout and other values written beside `path` and renamed over it, as a download
    or a second merge into the same place would."""
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    fresh = path.with_name(f".{path.name}.new")
    save_file(other_values(path), fresh, metadata=metadata)
    assert [(e.name, e.start, e.end) for e in read_safetensors_header(fresh).tensors] == [
        (e.name, e.start, e.end) for e in read_safetensors_header(path).tensors
    ], "same layout"
    os.replace(fresh, path)


def rewrite_in_place(path: Path) -> None:
    """The same file (same inode) overwritten with other values of the same layout, as `cp other path` does."""
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    fresh = path.with_name(f".{path.name}.new")
    save_file(other_values(path), fresh, metadata=metadata)
    with open(path, "r+b") as f:
        f.write(fresh.read_bytes())
    fresh.unlink()


def at_first_update(action: Callable[[], None]) -> Callable[[ProgressEvent], None]:
    """A progress callback that runs `action` once, when the merge reports its first tensor written."""
    done: list[bool] = []

    def progress(event: ProgressEvent) -> None:
        if event.stage == "merge" and event.status == "update" and not done:
            done.append(True)
            action()

    return progress


def assert_same_checkpoint(ours: Path, reference: Path) -> None:
    expected, found = read_tensors(reference), read_tensors(ours)
    assert sorted(found) == sorted(expected)
    differ = [name for name in expected if not torch.equal(found[name], expected[name])]
    assert not differ, f"{len(differ)} tensors are not the planned base's merge: {differ[:3]}"


def test_base_shards_replaced_during_the_merge_do_not_leak_into_it(
    inputs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, adapter, reference = inputs
    work = copy_tree(base, tmp_path / "base")
    shards = sorted(work.glob("model-*.safetensors"))
    assert len(shards) > 2

    def replace_all() -> None:
        for shard in shards:
            replace_file(shard)

    merge(work, adapter, tmp_path / "out", progress=at_first_update(replace_all))
    assert_same_checkpoint(tmp_path / "out", reference)
    card = (tmp_path / "out" / "README.md").read_text()
    assert all(f"| base | {shard.name} | {shard.stat().st_size} |" in card for shard in shards)


def test_an_adapter_replaced_during_the_merge_does_not_leak_into_it(
    inputs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, adapter, reference = inputs
    work = copy_tree(adapter, tmp_path / "adapter")
    weights = work / "adapter_model.safetensors"
    planned = weights.read_bytes()
    result = merge(base, work, tmp_path / "out", progress=at_first_update(lambda: replace_file(weights)))
    assert_same_checkpoint(tmp_path / "out", reference)
    # The card's hash is that of the adapter that was merged, not of the file at the path afterwards.
    import hashlib

    assert result.inputs_sha256["adapter/adapter_model.safetensors"] == hashlib.sha256(planned).hexdigest()


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_an_input_rewritten_in_place_fails_the_merge(
    inputs: tuple[Path, Path, Path], tmp_path: Path, which: str
) -> None:
    base, adapter, _ = inputs
    if which == "base":
        base = copy_tree(base, tmp_path / "base")
        target = sorted(base.glob("model-*.safetensors"))[-1]
    else:
        adapter = copy_tree(adapter, tmp_path / "adapter")
        target = adapter / "adapter_model.safetensors"
    with pytest.raises(MergeError, match=f"{target.name}: changed while it was being read"):
        merge(base, adapter, tmp_path / "out", progress=at_first_update(lambda: rewrite_in_place(target)))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([which]), "nothing published or left"


def test_a_pickle_base_replaced_during_the_merge_does_not_leak_into_it(
    inputs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, adapter, reference = inputs
    bin_base = pickle_base(base, tmp_path / "bin-base", 1)
    pickled = bin_base / "pytorch_model.bin"

    def replace_pickle() -> None:
        fresh = tmp_path / "other.bin"
        torch.save({name: tensor + 1 for name, tensor in torch.load(pickled, weights_only=True).items()}, fresh)
        os.replace(fresh, pickled)

    merge(bin_base, adapter, tmp_path / "out", progress=at_first_update(replace_pickle))
    assert_same_checkpoint(tmp_path / "out", reference)


def test_tensors_are_read_from_the_file_whose_header_was_read(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(4, dtype=torch.float32)}, path)
    header = read_safetensors_header(path)
    fresh = tmp_path / "fresh.safetensors"
    save_file({"w": torch.full((4,), 7.0)}, fresh)
    os.replace(fresh, path)
    with TensorReader() as reader:
        assert torch.equal(reader.read(header.tensors[0]), torch.arange(4, dtype=torch.float32))
    del header
    with TensorReader() as reader:
        assert torch.equal(reader.read(read_safetensors_header(path).tensors[0]), torch.full((4,), 7.0))
