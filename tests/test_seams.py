"""The two seams between the merge and the file formats, and the options object: a source that must decode (as a
quantized one will) and a sink that is not the safetensors writer give the same merge, byte for byte."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from factories import make_adapter, make_base, read_tensors

from qlora_merge import MergeError, merge, preparation
from qlora_merge.api import plan_merge
from qlora_merge.inputs.format import DTYPES, TensorEntry
from qlora_merge.inputs.reader import ByteRange, TensorReader
from qlora_merge.inputs.sources import SafetensorsSource
from qlora_merge.merging.stream import run_plan
from qlora_merge.options import MergeOptions
from qlora_merge.plan.tasks import OutputTensor


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("seams")
    base = make_base("llama", root / "base")
    return base, make_adapter(base, root / "adapter", "llama", modules_to_save=["lm_head"])


class DecodingSource(SafetensorsSource):
    """Reads as a packed format would: no raw bytes to copy, each run of elements in two ranges that `decode`
    must put together (a quantized source reads its blocks and their scales)."""

    def __init__(self) -> None:
        self.decoded = 0

    def raw(self, entry: TensorEntry) -> ByteRange | None:
        return None

    def reads(self, entry: TensorEntry, start: int, stop: int) -> Sequence[ByteRange]:
        size = DTYPES[entry.dtype][1]
        middle = start + (stop - start) // 2
        return tuple(
            ByteRange(entry.file, entry.start + first * size, (last - first) * size)
            for first, last in ((start, middle), (middle, stop))
            if last > first
        )

    def decode(self, entry: TensorEntry, start: int, stop: int, data: Sequence[torch.Tensor]) -> torch.Tensor:
        self.decoded += stop - start
        return torch.cat([part.clone() for part in data]).view(entry.torch_dtype)


def all_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.glob("*.safetensors"))}


@pytest.mark.parametrize("dtype", ["bf16", "f32"])
def test_a_source_that_decodes_gives_the_same_bytes(
    llama: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str
) -> None:
    base, adapter = llama
    merge(base, adapter, tmp_path / "raw", dtype=dtype, max_shard_size="20KB")
    source = DecodingSource()
    monkeypatch.setattr(preparation, "source_for", lambda index: source)
    merge(base, adapter, tmp_path / "decoded", dtype=dtype, max_shard_size="20KB")
    assert source.decoded > 0
    expected = all_bytes(tmp_path / "raw")
    assert len(expected) > 1 and all_bytes(tmp_path / "decoded") == expected


class MemorySink:
    """A sink that keeps every tensor in memory: what a new output format plugs into."""

    def __init__(self) -> None:
        self.bytes_written = 0
        self.layout: list[OutputTensor] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.finished = False
        self._name = ""
        self._parts: list[bytes] = []

    def start(self, tensors: Sequence[OutputTensor]) -> None:
        self.layout = list(tensors)

    def begin(self, name: str) -> None:
        assert name == self.layout[len(self.tensors)].name, "tensors come in the order of the layout"
        self._name, self._parts = name, []

    def write(self, data: memoryview | bytes) -> None:
        self._parts.append(bytes(data))
        self.bytes_written += len(data)

    def copy_from(self, fd: int, offset: int, count: int, source: Path) -> None:
        import os

        self.write(os.pread(fd, count, offset))

    def end(self) -> None:
        planned = self.layout[len(self.tensors)]
        raw = bytearray(b"".join(self._parts))
        values = torch.frombuffer(raw, dtype=DTYPES[planned.dtype][0]) if raw else torch.empty(0)
        self.tensors[self._name] = values.reshape(planned.shape)

    def finish(self) -> None:
        self.finished = True

    def abort(self) -> None:
        pass


def test_another_sink_receives_the_merge_the_safetensors_sink_writes(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    merge(base, adapter, tmp_path / "out")
    inputs = plan_merge(base, adapter)
    sink = MemorySink()
    with TensorReader() as reader:
        run_plan(inputs.plan, inputs.source, reader, sink, lambda task, written: None)
    sink.finish()
    written = read_tensors(tmp_path / "out")
    assert sink.tensors.keys() == written.keys()
    for name, tensor in written.items():
        assert sink.tensors[name].dtype == tensor.dtype and torch.equal(sink.tensors[name], tensor), name
    assert sink.bytes_written == inputs.plan.output_bytes


def test_the_options_object_is_checked_frozen_and_means_what_the_keywords_mean(
    llama: tuple[Path, Path], tmp_path: Path
) -> None:
    options = MergeOptions(dtype="fp16", max_shard_size="30KB", combine="linear")
    assert (options.dtype, options.max_shard_bytes, options.combine) == ("f16", 30_000, "linear")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.dtype = "bf16"  # type: ignore[misc]
    with pytest.raises(MergeError, match="--combine 'sum'"):
        MergeOptions(combine="sum")
    with pytest.raises(MergeError, match="--max-shard-size"):
        MergeOptions(max_shard_size="lots")
    with pytest.raises(TypeError, match="'dtpye'"):
        merge(*llama, tmp_path / "typo", dtpye="f16")

    base, adapter = llama
    by_object = merge(base, adapter, tmp_path / "object", MergeOptions(dtype="f16", max_shard_size="30KB"))
    by_name = merge(base, adapter, tmp_path / "names", dtype="float16", max_shard_size=30_000)
    overridden = merge(base, adapter, tmp_path / "both", MergeOptions(dtype="f32"), dtype="half", max_shard_size="30KB")
    assert by_object.shards == by_name.shards == overridden.shards and len(by_object.shards) > 1
    assert all_bytes(tmp_path / "object") == all_bytes(tmp_path / "names") == all_bytes(tmp_path / "both")
