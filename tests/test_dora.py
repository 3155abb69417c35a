"""DoRA (use_dora): magnitudes merged exactly as PEFT merges them, on Linear (row blocks), Conv1D and Embedding
(whole tensors, column norms)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import assert_same_tensors, logits, make_adapter, make_base, peft_merge, read_tensors
from safetensors.torch import load_file, save_file

from qlora_merge import merge
from qlora_merge.merging import blocking
from qlora_merge.merging.blocking import blocks_match_whole
from qlora_merge.merging.variants import (
    MIN_BLOCK_ROWS,
    Layout,
    dora_rows_into,
    dora_whole,
    linear_delta_rows,
)


def dora_linear_whole(
    weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, magnitude: torch.Tensor
) -> torch.Tensor:
    """DoRA on a whole Linear weight with PEFT's expressions: V = W + (B @ A) * s, then (m / ||V||_row) * V."""
    delta = (b @ a) * scaling
    v = weight + delta
    del delta
    factor = magnitude / torch.linalg.norm(v, dim=1).to(v.dtype)
    return v.mul_(factor.view(-1, 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("rows", "cols", "rows_per_block"), [(64, 112, 20), (1000, 96, 333), (514, 2048, 256)])
def test_blocked_dora_rows_are_bit_identical_to_the_whole_tensor(
    rows: int, cols: int, rows_per_block: int, dtype: torch.dtype
) -> None:
    """A row's norm does not depend on the other rows in its block: DoRA on Linear merges in row blocks exactly."""
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(rows, cols, generator=generator).to(dtype)
    a = torch.randn(8, cols, generator=generator) * 0.1
    b = torch.randn(rows, 8, generator=generator) * 0.1
    magnitude = torch.linalg.norm(weight.float(), dim=1) * (1 + 0.1 * torch.randn(rows, generator=generator))
    scaling = 5 / 8**0.5
    whole = dora_linear_whole(weight, a, b, scaling, magnitude).to(dtype)

    blocked = torch.empty_like(weight)
    scratch = torch.empty(max(rows_per_block, MIN_BLOCK_ROWS) * cols)
    for start in range(0, rows, rows_per_block):
        stop = min(rows, start + rows_per_block)
        delta = linear_delta_rows(a, b, scaling, False, start, stop, scratch)
        upcast = torch.empty((stop - start) * cols)
        dora_rows_into(weight[start:stop], delta, magnitude[start:stop], upcast, blocked[start:stop])

    assert torch.equal(blocked, whole), f"{(blocked != whole).sum().item()} elements differ"
    assert not torch.equal(whole, (weight.float() + (b @ a) * scaling).to(dtype)), "the magnitude must matter"
    assert blocks_match_whole(tuple(a.shape), tuple(b.shape), torch.float32, False, rows_per_block, dora=True)


@pytest.mark.parametrize("layout", [Layout.LINEAR, Layout.CONV1D, Layout.EMBEDDING])
def test_dora_whole_equals_peft_layers(layout: Layout) -> None:
    """dora_whole (for Linear, the reference above) against PEFT's own layer merge, for each layer kind, on shapes
    whose column norms sum many rows."""
    import transformers
    from peft import LoraConfig, get_peft_model

    rows, cols = 700, 96
    if layout is Layout.LINEAR:
        layer: torch.nn.Module = torch.nn.Linear(cols, rows, bias=False)
    elif layout is Layout.CONV1D:
        layer = transformers.pytorch_utils.Conv1D(cols, rows)  # weight (in=rows, out=cols)
    else:
        layer = torch.nn.Embedding(rows, cols)
    torch.manual_seed(0)
    model = torch.nn.Sequential(layer).to(torch.bfloat16)
    weight = layer.weight.detach().clone()
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=5, target_modules=["0"], use_dora=True))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "magnitude" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            elif "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    wrapped = peft_model.base_model.model[0]
    if layout is Layout.EMBEDDING:
        a, b = wrapped.lora_embedding_A["default"].detach(), wrapped.lora_embedding_B["default"].detach()
    else:
        a, b = wrapped.lora_A["default"].weight.detach(), wrapped.lora_B["default"].weight.detach()
    magnitude = wrapped.lora_magnitude_vector["default"].weight.detach().clone()
    scaling = wrapped.scaling["default"]
    expected = peft_model.merge_and_unload()[0].weight.detach()

    merged = dora_linear_whole if layout is Layout.LINEAR else dora_whole
    got = merged(weight, a, b, scaling, magnitude).to(torch.bfloat16)
    assert torch.equal(got, expected), f"{(got != expected).sum().item()} elements differ from PEFT's merge"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_dora_bit_identical_to_peft(arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 base, DoRA on every projection (GPT-2: Conv1D, merged whole; phi3: fused qkv/gate_up). Linear weights
    go in blocks of 20 rows, so blocks and short tails are exercised."""
    monkeypatch.setattr(blocking, "BLOCK_ELEMENTS", 20 * 64)
    base = make_base(arch, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", arch, r=8, lora_alpha=5, use_rslora=True, use_dora=True)
    assert any(k.endswith("lora_magnitude_vector") for k in load_file(adapter / "adapter_model.safetensors"))

    result = merge(base, adapter, tmp_path / "ours")

    assert_same_tensors(read_tensors(tmp_path / "ours"), peft_merge(base, adapter, tmp_path / "peft", torch.bfloat16))
    assert result.tensors_merged > 0
    assert any("DoRA" in row.action for row in result.coverage)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_merge_reproduces_adapter_logits(arch: str, tmp_path: Path) -> None:
    base = make_base(arch, tmp_path / "base", dtype=torch.float32)
    adapter = make_adapter(base, tmp_path / "adapter", arch, use_dora=True)
    merge(base, adapter, tmp_path / "ours", dtype="f32")

    expected = logits(base, adapter)
    assert not torch.allclose(expected, logits(base), atol=1e-3), "the adapter must change the logits"
    torch.testing.assert_close(logits(tmp_path / "ours"), expected, rtol=1e-5, atol=1e-5)
    assert_same_tensors(read_tensors(tmp_path / "ours"), peft_merge(base, adapter, tmp_path / "peft", torch.float32))


def test_old_magnitude_key_with_weight_suffix_is_read(tmp_path: Path) -> None:
    """PEFT before 0.12 saved `.lora_magnitude_vector.weight`; it merges the same."""
    base = make_base("llama", tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", "llama", use_dora=True)
    merge(base, adapter, tmp_path / "new")
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    renamed = {(k + ".weight" if k.endswith("lora_magnitude_vector") else k): v for k, v in tensors.items()}
    save_file(renamed, path)
    merge(base, adapter, tmp_path / "old")
    assert_same_tensors(read_tensors(tmp_path / "old"), read_tensors(tmp_path / "new"))
