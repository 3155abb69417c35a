"""The compiled fused merge step (merging/fused.c) against the torch sequence it replaces, bit for bit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_merge.merging import fused
from qlora_merge.merging.fused import FUSED, FusedMerge, reference, same_bits, special_values

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
PAIRS = [(w, o) for w in DTYPES for o in DTYPES]


def test_the_kernel_is_built_and_trusted() -> None:
    """`pip install` compiles it where a C compiler is at hand (this test environment has one): a missing library
    would silently leave every other test on the torch path."""
    for weight, out in PAIRS:
        assert FUSED.available(weight, out), (weight, out)


@pytest.mark.parametrize("weight_dtype, out_dtype", PAIRS, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("scale", [1.0, 2.0, 0.25, 0.3, 1 / 3, 1e-30, 7e30])
def test_bits_equal_torch_on_special_values(weight_dtype: torch.dtype, out_dtype: torch.dtype, scale: float) -> None:
    weight, delta = special_values(seed=1)
    weight = weight.to(weight_dtype)
    expected = torch.empty(weight.shape, dtype=out_dtype)
    total = reference(weight, delta, scale, expected)
    got = torch.empty_like(expected)
    count = FUSED.run(weight, delta, scale, got)
    assert same_bits(got, expected)
    assert count == int((~torch.isfinite(expected)).sum())
    if out_dtype == torch.float16:
        assert bool((torch.isfinite(total) & torch.isinf(expected)).any()), "float16 overflow is covered"


def test_special_values_tell_rounding_modes_apart() -> None:
    """The values are ones a wrong rounding gets wrong: truncating, or rounding ties away from zero, to bfloat16
    or float16 differs from torch on them (so the test above can fail)."""
    weight, delta = special_values()
    total = delta + weight
    finite = torch.isfinite(total)
    bits = total[finite].view(torch.int32)
    truncated = (bits >> 16).to(torch.int16)
    assert not torch.equal(truncated, total[finite].to(torch.bfloat16).view(torch.int16))
    ties_away = ((bits + 0x8000) >> 16).to(torch.int16)
    assert not torch.equal(ties_away, total[finite].to(torch.bfloat16).view(torch.int16))
    small = total[finite & (total.abs() < 65504)]
    assert (small.to(torch.float16).float() != small).any()
    away = torch.where(small.abs() < 2**-14, (small * 2**24).abs().add(0.5).floor() * small.sign() / 2**24, small)
    assert not torch.equal(away.to(torch.float16).view(torch.int16), small.to(torch.float16).view(torch.int16))


def test_a_kernel_that_differs_is_not_trusted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that rounds wrongly (here: torch's sum, truncated) fails the self-test and the merge uses torch."""
    fresh = FusedMerge()

    def truncating(weight: torch.Tensor, delta: torch.Tensor, scale: float, out: torch.Tensor) -> int:
        total = (delta * scale).add_(weight.float())
        if out.dtype == torch.float32:
            out.copy_(total)
        else:
            out.view(torch.int16).copy_((total.view(torch.int32) >> 16).to(torch.int16))
        return int((~torch.isfinite(out)).sum())

    monkeypatch.setattr(fresh, "run", truncating)
    assert not fresh.available(torch.float32, torch.bfloat16)
    assert fresh.available(torch.float32, torch.float32) == FUSED.available(torch.float32, torch.float32)


def test_turned_off_by_the_environment() -> None:
    code = "import torch; from qlora_merge.merging import fused; print(fused.FUSED.available(torch.half, torch.half))"
    env = {"QLORA_MERGE_FUSED": "0", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_refuses_mismatched_tensors() -> None:
    weight = torch.zeros(8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="different lengths"):
        FUSED.run(weight, torch.zeros(7), 1.0, torch.empty(8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous"):
        FUSED.run(weight, torch.zeros(4, 4).T.reshape(-1)[:8].view(2, 4).T, 1.0, torch.empty(8, dtype=torch.bfloat16))


def test_merge_with_and_without_the_kernel_writes_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bundled demo (bf16) merged to bf16, f16 and f32: the kernel ran on every LoRA block, and the files equal
    those of the torch sequence byte for byte."""
    from qlora_merge import MergeOptions, merge

    demo = Path(__file__).parent.parent / "examples" / "tiny-llama"
    calls: list[int] = []
    real_run = FUSED.run

    def counting(*args: object) -> int:
        calls.append(1)
        return real_run(*args)  # type: ignore[arg-type]

    for dtype in ("bf16", "f16", "f32"):
        monkeypatch.setattr(FUSED, "run", counting)
        merge(str(demo / "base"), str(demo / "adapter"), tmp_path / f"fused-{dtype}", MergeOptions(dtype=dtype))
        assert len(calls) >= 28
        calls.clear()
        monkeypatch.setattr(fused.FUSED, "available", lambda weight, out: False)
        merge(str(demo / "base"), str(demo / "adapter"), tmp_path / f"torch-{dtype}", MergeOptions(dtype=dtype))
        assert not calls
        monkeypatch.undo()
        for name in ("model.safetensors",):
            ours = (tmp_path / f"fused-{dtype}" / name).read_bytes()
            assert ours == (tmp_path / f"torch-{dtype}" / name).read_bytes()


def test_two_threads_and_the_sinks_own_buffers_change_no_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights of several 1M-element blocks: the helper thread computes some of them, the blocks are computed
    straight into the writer's pieces, and the files equal those of one thread and of the torch sequence."""
    import threading

    from tiny_checkpoints import llama_checkpoint

    from qlora_merge import MergeOptions, merge
    from qlora_merge.outputs.safetensors import SafetensorsSink

    base, adapter = llama_checkpoint(tmp_path / "model", hidden=1024, intermediate=3072, layers=1, rank=16)
    threads: set[str] = set()
    real_run = FUSED.run

    def recording(*args: object) -> int:
        threads.add(threading.current_thread().name)
        return real_run(*args)  # type: ignore[arg-type]

    commits: list[int] = []
    real_commit = SafetensorsSink.commit

    def committing(self: SafetensorsSink, nbytes: int) -> None:
        commits.append(nbytes)
        real_commit(self, nbytes)

    monkeypatch.setattr(FUSED, "run", recording)
    monkeypatch.setattr(SafetensorsSink, "commit", committing)
    merge(str(base), str(adapter), tmp_path / "two", MergeOptions(dtype="bf16"))
    assert any(name.startswith("qlora-merge-arithmetic") for name in threads), threads
    assert sum(commits) > 10 << 20, "most merged bytes were computed in the writer's own pieces"
    monkeypatch.setenv("QLORA_MERGE_THREADS", "1")
    threads.clear()
    merge(str(base), str(adapter), tmp_path / "one", MergeOptions(dtype="bf16"))
    assert threads == {"MainThread"}
    monkeypatch.setattr(fused.FUSED, "available", lambda weight, out: False)
    merge(str(base), str(adapter), tmp_path / "torch", MergeOptions(dtype="bf16"))
    two = (tmp_path / "two" / "model.safetensors").read_bytes()
    assert two == (tmp_path / "one" / "model.safetensors").read_bytes()
    assert two == (tmp_path / "torch" / "model.safetensors").read_bytes()
