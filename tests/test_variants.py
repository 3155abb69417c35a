"""The LoRA math module on its own: blocked products equal whole ones bit for bit, scaling and pattern rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factories import assert_same_tensors, make_adapter, make_base, peft_merge, read_tensors

from qlora_merge import merge
from qlora_merge.merging import blocking
from qlora_merge.merging.blocking import BlockingCheck, blocks_match_whole
from qlora_merge.merging.variants import (
    MIN_BLOCK_ROWS,
    linear_delta_rows,
    lora_scaling,
    merge_rows_into,
    module_rank_alpha,
    pattern_key,
)


def blocked_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, transposed: bool, rows_per_block: int):
    rows = a.shape[1] if transposed else b.shape[0]
    cols = b.shape[0] if transposed else a.shape[1]
    scratch = torch.empty(max(rows_per_block, MIN_BLOCK_ROWS) * cols)
    blocks = []
    for start in range(0, rows, rows_per_block):
        stop = min(rows, start + rows_per_block)
        blocks.append(linear_delta_rows(a, b, scaling, transposed, start, stop, scratch).clone())
    return torch.cat(blocks)


# Ranks and widths of real adapters, and row blocks that leave tails of 1 to 15 rows (the MKL trap: a short tail
# runs another sgemm kernel whose float32 sums differ from the whole product's unless it is widened).
@pytest.mark.parametrize("rank", [1, 4, 8, 16, 64])
@pytest.mark.parametrize(("rows", "cols", "rows_per_block"), [(64, 112, 20), (1000, 96, 333), (514, 2048, 256)])
@pytest.mark.parametrize("transposed", [False, True])
def test_blocked_delta_is_bit_identical_to_the_whole_product(
    rank: int, rows: int, cols: int, rows_per_block: int, transposed: bool
) -> None:
    generator = torch.Generator().manual_seed(rank * rows)
    out_features, in_features = (cols, rows) if transposed else (rows, cols)
    a = torch.randn(rank, in_features, generator=generator)
    b = torch.randn(out_features, rank, generator=generator)
    scaling = 5 / 8**0.5
    whole = (b @ a) * scaling  # PEFT: (B @ A), transposed if fan_in_fan_out, times scaling
    expected = whole.T if transposed else whole
    got = blocked_delta(a, b, scaling, transposed, rows_per_block)
    assert got.shape == expected.shape
    assert torch.equal(got, expected), f"{(got != expected).sum().item()} float32 elements differ"
    assert blocks_match_whole(tuple(a.shape), tuple(b.shape), torch.float32, transposed, rows_per_block)


def test_merge_rows_rounds_once_like_peft() -> None:
    """W(bf16) + delta(f32) summed in float32 and rounded once equals PEFT's `weight.data += delta` on a bf16 weight."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(48, 80, generator=generator).to(torch.bfloat16)
    delta = torch.randn(48, 80, generator=generator) * 1e-2
    peft = weight.clone()
    peft += delta
    out = torch.empty_like(weight)
    merge_rows_into(weight, delta.clone(), torch.empty(48 * 80), out)
    assert torch.equal(out, peft)
    assert not torch.equal(out, weight + delta.to(torch.bfloat16)), "rounding the delta first is the other rounding"


def test_blocking_falls_back_to_whole_tensors_when_blocks_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    check = BlockingCheck()
    a, b = (8, 4096), (4096, 8)
    assert check.rows_per_block(4096, 4096, a, b, torch.float32, transposed=False) == blocking.BLOCK_ELEMENTS // 4096
    monkeypatch.setattr(blocking, "blocks_match_whole", lambda *args: False)
    assert BlockingCheck().rows_per_block(4096, 4096, a, b, torch.float32, transposed=False) == 4096


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_multi_block_merge_equals_peft(arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 20 rows on 64-wide weights: several blocks per tensor and a 4-row tail, still bit-identical."""
    monkeypatch.setattr(blocking, "BLOCK_ELEMENTS", 20 * 64)
    base = make_base(arch, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", arch, r=8, lora_alpha=5, use_rslora=True)
    merge(base, adapter, tmp_path / "ours")
    assert_same_tensors(read_tensors(tmp_path / "ours"), peft_merge(base, adapter, tmp_path / "peft", torch.bfloat16))


def test_mica_rounds_the_delta_like_peft(tmp_path: Path) -> None:
    """MiCA (init_lora_weights="mica") merges `W += delta.to(W.dtype)` on Linear layers too: bit-identical to PEFT,
    and not what the same factors give as a plain LoRA, which rounds once."""
    base = make_base("llama", tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", "llama", init_lora_weights="mica")
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert config["init_lora_weights"] == "mica"

    merge(base, adapter, tmp_path / "ours")
    ours = read_tensors(tmp_path / "ours")
    assert_same_tensors(ours, peft_merge(base, adapter, tmp_path / "peft", torch.bfloat16))

    config_path.write_text(json.dumps(config | {"init_lora_weights": True}))
    merge(base, adapter, tmp_path / "plain")
    plain = read_tensors(tmp_path / "plain")
    assert any(not torch.equal(ours[name], plain[name]) for name in ours), "the rounding must show"


def test_scaling_rules() -> None:
    assert lora_scaling(16, 8, use_rslora=False) == 2.0
    assert lora_scaling(16, 16, use_rslora=True) == 4.0


def test_pattern_keys_follow_peft() -> None:
    """PEFT matches a pattern against the whole module name or a tail after a dot, as an unescaped regex."""
    patterns = {"q_proj": 2, "layers.1.mlp.down_proj": 6}
    assert pattern_key(patterns, "model.layers.0.self_attn.q_proj") == "q_proj"
    assert pattern_key(patterns, "model.layers.1.mlp.down_proj") == "layers.1.mlp.down_proj"
    assert pattern_key(patterns, "model.layers.11.mlp.down_proj") is None
    assert pattern_key(patterns, "model.layers.0.self_attn.xq_proj") is None
    assert pattern_key({"layers.0": 1}, "model.layers_0") == "layers.0", "unescaped dot, as in PEFT"
    assert module_rank_alpha("model.layers.1.mlp.down_proj", 4, 8, patterns, {"down_proj": 3}) == (6, 3)
    assert module_rank_alpha("model.layers.2.mlp.up_proj", 4, 8, patterns, {"down_proj": 3}) == (4, 8)


def test_self_test_memory_does_not_grow_with_the_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocked-vs-whole self-test runs on two blocks plus the real tail, whatever the number of rows."""
    seen = []
    monkeypatch.setattr(blocking, "blocks_match_whole", lambda *args: seen.append(args) or True)
    rank, cols = 16, 4000  # 262 rows per block: neither row count divides evenly
    wanted = blocking.BLOCK_ELEMENTS // cols
    for rows in (14_336, 128_256):
        BlockingCheck().rows_per_block(rows, cols, (rank, cols), (rows, rank), torch.float32, transposed=False)
        BlockingCheck().rows_per_block(rows, cols, (rank, rows), (cols, rank), torch.float32, transposed=True)
    for a_shape, b_shape, _, transposed, rows_per_block, *_ in seen:
        proxy_rows = a_shape[1] if transposed else b_shape[0]
        assert rows_per_block == wanted
        assert proxy_rows <= 3 * wanted
    tails = {(a[1] if t else b[0]) % wanted for a, b, _, t, *_ in seen}
    assert tails == {14_336 % wanted, 128_256 % wanted} == {188, 138}, "the proxy keeps the real tail's size"


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float64])
def test_merge_rows_returns_the_sum_before_rounding(weight_dtype: torch.dtype) -> None:
    """Value checks compare the written block with this sum (a float16 overflow is finite here, infinite there): it
    must be W + delta in the dtype PEFT sums in, also where that is float64 and the sum is a new tensor."""
    generator = torch.Generator().manual_seed(5)
    weight = (torch.randn(8, 16, generator=generator) * 40000).to(weight_dtype)
    delta = torch.randn(8, 16, generator=generator) * 40000
    expected = weight.double() + delta.double() if weight_dtype == torch.float64 else weight.float() + delta
    out = torch.empty(8, 16, dtype=torch.float16)
    total = merge_rows_into(weight, delta.clone(), torch.empty(8 * 16), out)
    assert total.dtype == expected.dtype and torch.equal(total, expected)
    assert torch.isinf(out).any() and torch.isfinite(total).all(), "the overflow shows only after rounding"


def test_conv1d_names_follow_the_architecture() -> None:
    """Square weights' layout by layer class: Conv1D names per architecture, sub-models included; None when the
    model's code is not transformers' own."""
    from qlora_merge.merging.variants import Layout, conv1d_names, fitting_layouts

    assert conv1d_names({"model_type": "gpt2"}) == {"c_attn", "q_attn", "c_proj", "c_fc"}
    assert conv1d_names({"model_type": "clvp_decoder"}) == {"c_fc", "c_proj"}
    assert conv1d_names({"model_type": "llama"}) == frozenset()
    assert conv1d_names({"model_type": "vision-encoder-decoder", "decoder": {"model_type": "gpt2"}}) >= {"c_attn"}
    assert conv1d_names({}) is None
    assert conv1d_names({"model_type": "gpt2", "auto_map": {"AutoModel": "x.Y"}}) is None
    assert fitting_layouts((4, 4), 4, 4) == (Layout.LINEAR, Layout.CONV1D)
    assert fitting_layouts((8, 4), 4, 8) == (Layout.CONV1D,)
    assert fitting_layouts((8, 4), 8, 4) == (Layout.LINEAR,)
    assert fitting_layouts((8, 5), 8, 4) == ()
