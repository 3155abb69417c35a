"""The shard writer on its own: bytes land where the header says across piece boundaries, with and without O_DIRECT,
and a disk error in its background thread fails the merge cleanly."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import torch
from factories import assert_same_tensors, make_adapter, make_base, peft_merge, read_tensors
from safetensors import safe_open

from qlora_merge import OutputError, merge
from qlora_merge.inputs.format import TORCH_TO_NAME, read_safetensors_header
from qlora_merge.outputs import safetensors as writer_module
from qlora_merge.outputs.safetensors import SafetensorsSink
from qlora_merge.plan.tasks import OutputTensor


def odd_tensors() -> dict[str, torch.Tensor]:
    """Sizes that are not multiples of anything: every piece boundary falls inside some tensor."""
    generator = torch.Generator().manual_seed(0)
    shapes = {"a": (7, 1001), "b": (3,), "c": (4099,), "d": (2, 3, 517), "e": (1,), "f": (640, 33)}
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.int64, torch.uint8, torch.float32]
    tensors = {}
    for (name, shape), dtype in zip(shapes.items(), dtypes, strict=True):
        values = torch.randn(shape, generator=generator) * 100
        tensors[name] = values.to(dtype)
    return tensors


def write_with(tmp_path: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int, copy: bool) -> Path:
    """Write `tensors` through SafetensorsSink, by write() or by copy_from() out of a source file."""
    out = tmp_path / "out"
    out.mkdir()
    planned = [OutputTensor(n, TORCH_TO_NAME[t.dtype], tuple(t.shape)) for n, t in tensors.items()]
    source = tmp_path / "source.bin"
    raw = {n: t.contiguous().view(torch.uint8).numpy().tobytes() for n, t in tensors.items()}
    source.write_bytes(b"".join(raw.values()))
    writer = SafetensorsSink(out, max_shard_bytes, {"format": "pt"})
    writer.start(planned)
    fd = os.open(source, os.O_RDONLY)
    try:
        offset = 0
        for name, data in raw.items():
            writer.begin(name)
            if copy:
                writer.copy_from(fd, offset, len(data), source)
            else:
                half = len(data) // 2  # two calls per tensor: write() must append, not restart
                writer.write(data[:half])
                writer.write(data[half:])
            writer.end()
            offset += len(data)
        writer.finish()
    finally:
        os.close(fd)
        writer.abort()
    return out


def read_back(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(out.glob("*.safetensors")):
        read_safetensors_header(path)  # our own validation: offsets in range, no overlap, sizes add up
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[key] = f.get_tensor(key)
    return tensors


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("copy", [False, True])
@pytest.mark.parametrize("max_shard_bytes", [10**9, 9000])
def test_bytes_survive_piece_boundaries(
    direct: bool, copy: bool, max_shard_bytes: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "PIECE_BYTES", 2 * writer_module.BLOCK_BYTES)
    monkeypatch.setattr(writer_module, "_direct_io_works", lambda directory: direct)
    tensors = odd_tensors()
    out = write_with(tmp_path, tensors, max_shard_bytes, copy)
    got = read_back(out)
    assert sorted(got) == sorted(tensors)
    for name, tensor in tensors.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    for path in out.glob("*.safetensors"):
        header = read_safetensors_header(path)
        assert path.stat().st_size == header.tensors[-1].end, "the padded last piece must be cut off"
    assert not list(out.glob(".*")), "no probe or temporary file is left"


def test_write_error_in_the_background_thread_fails_the_merge_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk is a user's problem, not a bug: one OutputError naming the shard, and nothing left behind."""
    base = make_base("llama", tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", "llama")
    monkeypatch.setattr(writer_module, "PIECE_BYTES", 4 * writer_module.BLOCK_BYTES)
    failing = FailingPwrite(OSError(errno.ENOSPC, "No space left on device"))
    monkeypatch.setattr(writer_module.os, "pwrite", failing)
    with pytest.raises(OutputError, match=r"model\.safetensors: cannot write \(No space left on device\)"):
        merge(base, adapter, tmp_path / "out")
    assert failing.calls >= 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"], "no output and no staging dir"


def test_any_error_in_the_writer_thread_ends_the_merge_instead_of_hanging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = make_base("llama", tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", "llama")
    monkeypatch.setattr(writer_module, "PIECE_BYTES", 4 * writer_module.BLOCK_BYTES)
    monkeypatch.setattr(writer_module.os, "pwrite", FailingPwrite(ValueError("a bug in the writer")))
    raised: list[BaseException] = []

    def run() -> None:
        try:
            merge(base, adapter, tmp_path / "out")
        except BaseException as exc:
            raised.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "the merge hung after its writer thread failed"
    assert len(raised) == 1 and isinstance(raised[0], ValueError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


class FailingPwrite:
    """os.pwrite that raises `error` on its third call."""

    def __init__(self, error: BaseException) -> None:
        self.error, self.calls, self.real = error, 0, os.pwrite

    def __call__(self, fd: int, data: memoryview, offset: int) -> int:
        self.calls += 1
        if self.calls == 3:
            raise self.error
        return self.real(fd, data, offset)


def test_merge_without_direct_io_is_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The buffered fallback (filesystems that refuse O_DIRECT) writes the same checkpoint."""
    monkeypatch.setattr(writer_module, "_direct_io_works", lambda directory: False)
    monkeypatch.setattr(writer_module, "PIECE_BYTES", 3 * writer_module.BLOCK_BYTES)
    base = make_base("mistral", tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", "mistral")
    merge(base, adapter, tmp_path / "out", max_shard_size="50KB")
    assert_same_tensors(read_tensors(tmp_path / "out"), peft_merge(base, adapter, tmp_path / "peft", torch.bfloat16))
