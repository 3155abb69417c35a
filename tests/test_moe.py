"""MoE experts: LoRA on transformers v5's fused 3-D expert parameters (target_parameters, PEFT's ParamWrapper),
merged one expert at a time into whatever layout the checkpoint has (per-expert Linear weights for Qwen-MoE and
Mixtral, fused 3-D tensors stored (experts, in, out) for gpt-oss), bit-identical to PEFT's merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from factories import MOE_PARAMETERS, assert_same_tensors, logits, make_adapter, make_base, peft_merge, read_tensors
from safetensors.torch import load_file, save_file

from qlora_merge import merge
from qlora_merge.errors import MergeError
from qlora_merge.merging.blocking import ExpertCheck
from qlora_merge.merging.variants import expert_delta, expert_deltas_whole

ARCHS = ["qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss"]


def moe_adapter(base: Path, directory: Path, arch: str, **kwargs: object) -> Path:
    """Random LoRA on both expert parameters of every layer, and on two attention projections."""
    options: dict[str, object] = {"target_modules": ["q_proj", "v_proj"], "target_parameters": MOE_PARAMETERS}
    options.update(kwargs)
    return make_adapter(base, directory, arch, **options)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize(("experts", "rank", "d1", "d2"), [(4, 4, 96, 64), (8, 16, 700, 256), (3, 8, 64, 1000)])
def test_one_expert_equals_its_slice_of_peft_einsum(
    experts: int, rank: int, d1: int, d2: int, transposed: bool
) -> None:
    generator = torch.Generator().manual_seed(d1)
    rows, cols = (d2, d1) if transposed else (d1, d2)
    a = torch.randn(experts * rank, cols, generator=generator) * 0.1
    b = torch.randn(rows, experts * rank, generator=generator) * 0.1
    whole = expert_deltas_whole(a, b, experts, 1.5, transposed)
    assert whole.shape == (experts, d1, d2)
    for expert in range(experts):
        # the layout spelled out: expert e uses rows e*r..(e+1)*r of A and every E-th column of B
        a_e, b_e = a[expert * rank : (expert + 1) * rank], b[:, expert::experts]
        reference = (b_e @ a_e) * 1.5
        torch.testing.assert_close(whole[expert], reference.T if transposed else reference)
        assert torch.equal(expert_delta(a, b, experts, expert, 1.5, transposed), whole[expert])
    assert ExpertCheck().per_expert(tuple(a.shape), tuple(b.shape), experts, torch.float32)


@pytest.mark.parametrize("arch", ARCHS)
def test_expert_lora_is_bit_identical_to_peft(arch: str, tmp_path: Path) -> None:
    base = make_base(arch, tmp_path / "base")
    adapter = moe_adapter(base, tmp_path / "adapter", arch)
    keys = load_file(adapter / "adapter_model.safetensors")
    assert any(".experts.base_layer.lora_A." in k for k in keys) and any(".experts.lora_B." in k for k in keys)

    result = merge(base, adapter, tmp_path / "ours")

    ours = read_tensors(tmp_path / "ours")
    assert_same_tensors(ours, peft_merge(base, adapter, tmp_path / "peft", torch.bfloat16))
    before = read_tensors(base)
    changed = [name for name in ours if "expert" in name and not torch.equal(ours[name], before[name])]
    # layers x fused tensors, or layers x experts x (gate, up, down)
    assert len(changed) == (2 * 2 if arch == "gpt_oss" else 2 * 4 * 3), changed
    assert result.tensors_merged == len(changed) + 4  # and q_proj, v_proj of two layers
    assert any("expert" in row.action for row in result.coverage)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_expert_lora_reproduces_adapter_logits(arch: str, tmp_path: Path) -> None:
    base = make_base(arch, tmp_path / "base", dtype=torch.float32)
    adapter = moe_adapter(base, tmp_path / "adapter", arch, r=8, lora_alpha=5, use_rslora=True)
    merge(base, adapter, tmp_path / "ours", dtype="f32")

    expected = logits(base, adapter)
    assert not torch.allclose(expected, logits(base), atol=1e-3), "the adapter must change the logits"
    torch.testing.assert_close(logits(tmp_path / "ours"), expected, rtol=1e-5, atol=1e-5)
    assert_same_tensors(read_tensors(tmp_path / "ours"), peft_merge(base, adapter, tmp_path / "peft", torch.float32))


def test_only_one_expert_parameter_and_rank_pattern(tmp_path: Path) -> None:
    """One targeted parameter (down_proj only), with its own rank and alpha from the patterns."""
    base = make_base("qwen3_moe", tmp_path / "base")
    adapter = moe_adapter(
        base,
        tmp_path / "adapter",
        "qwen3_moe",
        target_parameters=["mlp.experts.down_proj"],
        rank_pattern={"layers.1.mlp.experts.down_proj": 2},
        alpha_pattern={"layers.1.mlp.experts.down_proj": 3},
    )
    merge(base, adapter, tmp_path / "ours")
    assert_same_tensors(read_tensors(tmp_path / "ours"), peft_merge(base, adapter, tmp_path / "peft", torch.bfloat16))


def test_attention_lora_alone_on_a_moe_model(tmp_path: Path) -> None:
    base = make_base("qwen3_moe", tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", "qwen3_moe", target_modules=["q_proj", "k_proj", "o_proj"])
    merge(base, adapter, tmp_path / "ours")
    assert_same_tensors(read_tensors(tmp_path / "ours"), peft_merge(base, adapter, tmp_path / "peft", torch.bfloat16))


def test_expert_factors_that_fit_no_parameter_are_refused(tmp_path: Path) -> None:
    """lora_A of the gate_up_proj wrapper swapped with the down_proj one's: neither pair fits a parameter."""
    base = make_base("qwen3_moe", tmp_path / "base")
    adapter = moe_adapter(base, tmp_path / "adapter", "qwen3_moe")
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    outer, inner = (f"base_model.model.model.layers.0.mlp.experts.{w}lora_A.weight" for w in ("", "base_layer."))
    tensors[outer], tensors[inner] = tensors[inner], tensors[outer]
    save_file(tensors, path)
    with pytest.raises(
        MergeError, match=r"adapter_model.safetensors: '.*layers.0.mlp.experts.*lora_A.weight' .*fits none"
    ):
        merge(base, adapter, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def per_expert_adapter(base: Path, directory: Path, arch: str, r: int = 4) -> Path:
    """An adapter as PEFT saved it for transformers v4, which had one Linear per expert and projection: random
    factors on every expert's gate/up/down (Mixtral: w1/w3/w2). transformers v5 cannot build those layers any
    more, so the file is written here, in PEFT's key layout; PEFT rewrites it into the fused layout on load."""
    projections, module = (
        (("w1", "w2", "w3"), "block_sparse_moe")
        if arch == "mixtral"
        else (("gate_proj", "up_proj", "down_proj"), "mlp")
    )
    generator = torch.Generator().manual_seed(3)
    tensors = {}
    for name, weight in read_tensors(base).items():
        parts = name.split(".")
        if len(parts) > 6 and parts[3:5] == [module, "experts"] and parts[6] in projections:
            key = f"base_model.model.{name.removesuffix('.weight')}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, weight.shape[1], generator=generator) * 0.1
            tensors[f"{key}.lora_B.weight"] = torch.randn(weight.shape[0], r, generator=generator) * 0.1
    assert len(tensors) == 2 * 2 * 4 * 3
    directory.mkdir()
    save_file(tensors, directory / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 8, "lora_dropout": 0.0}
    (directory / "adapter_config.json").write_text(json.dumps({**config, "target_modules": list(projections)}))
    return directory


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_per_expert_lora_from_transformers_v4_is_bit_identical_to_peft(arch: str, tmp_path: Path) -> None:
    """PEFT merges such an adapter as LoRA on the fused parameters, rounding the delta before adding it: so do we."""
    base = make_base(arch, tmp_path / "base")
    adapter = per_expert_adapter(base, tmp_path / "adapter", arch)
    merge(base, adapter, tmp_path / "ours")
    assert_same_tensors(read_tensors(tmp_path / "ours"), peft_merge(base, adapter, tmp_path / "peft", torch.bfloat16))


def test_per_expert_lora_from_transformers_v4_reproduces_adapter_logits(tmp_path: Path) -> None:
    base = make_base("mixtral", tmp_path / "base", dtype=torch.float32)
    adapter = per_expert_adapter(base, tmp_path / "adapter", "mixtral")
    merge(base, adapter, tmp_path / "ours", dtype="f32")
    expected = logits(base, adapter)
    assert not torch.allclose(expected, logits(base), atol=1e-3), "the adapter must change the logits"
    torch.testing.assert_close(logits(tmp_path / "ours"), expected, rtol=1e-5, atol=1e-5)


def test_target_parameters_on_a_2d_weight_are_refused(tmp_path: Path) -> None:
    """PEFT merges a 2-D target parameter with its delta rounded first; not merged yet, so refused by name."""
    base = make_base("qwen3_moe", tmp_path / "base")
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        "qwen3_moe",
        target_modules=["k_proj"],
        target_parameters=["self_attn.q_proj.weight"],
    )
    with pytest.raises(
        MergeError, match=r"adapter_model.safetensors: .*'model.layers.0.self_attn.q_proj.weight'.*not 3-D"
    ):
        merge(base, adapter, tmp_path / "ours")


def fused_moe_checkpoint(directory: Path, experts: int, rank: int = 8, d1: int = 512, d2: int = 1024) -> Path:
    """A gpt-oss-shaped checkpoint holding one fused (experts, in, out) bf16 expert tensor, and an adapter on it."""
    generator = torch.Generator().manual_seed(experts)
    base, adapter = directory / "base", directory / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"]}))
    weight = torch.randn(experts, d1, d2, generator=generator).to(torch.bfloat16)
    save_file({"model.layers.0.mlp.experts.gate_up_proj": weight}, base / "model.safetensors")
    key = "base_model.model.model.layers.0.mlp.experts"
    factors = {
        f"{key}.lora_A.weight": torch.randn(experts * rank, d1, generator=generator) * 0.1,
        f"{key}.lora_B.weight": torch.randn(d2, experts * rank, generator=generator) * 0.1,
    }
    save_file(factors, adapter / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_parameters": ["mlp.experts.gate_up_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return directory


def test_fused_experts_merge_in_flat_memory(tmp_path: Path) -> None:
    """One expert at a time: 4x the experts (a 192 MiB tensor instead of 48 MiB, both past the writer's fixed
    32 MiB pieces; the float32 delta whole would be 384 MiB) costs only the larger factors (~6 MB)."""
    from test_memory import merge_peak_rss

    small = merge_peak_rss(fused_moe_checkpoint(tmp_path / "small", experts=48))
    large = merge_peak_rss(fused_moe_checkpoint(tmp_path / "large", experts=192))
    assert large - small < 24e6, (small, large)
    merged = load_file(tmp_path / "large" / "merged" / "model.safetensors")["model.layers.0.mlp.experts.gate_up_proj"]
    factors = load_file(tmp_path / "large" / "adapter" / "adapter_model.safetensors")
    a, b = (factors[f"base_model.model.model.layers.0.mlp.experts.lora_{x}.weight"] for x in "AB")
    weight = load_file(tmp_path / "large" / "base" / "model.safetensors")["model.layers.0.mlp.experts.gate_up_proj"]
    expected = weight + expert_deltas_whole(a, b, 192, 2.0, True).to(torch.bfloat16)  # PEFT: W += delta.to(W.dtype)
    assert torch.equal(merged, expected)
