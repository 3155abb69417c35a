"""Our merge against PEFT's `merge_and_unload()` + `save_pretrained()`, tensor by tensor, and against the logits of
the unmerged PeftModel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import (
    assert_same_tensors,
    logits,
    make_adapter,
    make_base,
    peft_merge,
    read_config,
    read_tensors,
)

from qlora_merge import merge

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]


def variant_options(arch: str, variant: str) -> dict:
    if variant == "standard":
        return {"r": 4, "lora_alpha": 8}
    if variant == "rslora":
        # 5 / sqrt(8) is not a power of two, so a wrong scaling cannot hide behind exact float arithmetic.
        return {"r": 8, "lora_alpha": 5, "use_rslora": True}
    if arch == "gpt2":
        return {
            "r": 4,
            "lora_alpha": 8,
            "rank_pattern": {"c_attn": 2, "h.1.mlp.c_proj": 6},
            "alpha_pattern": {"c_fc": 3.5, "h.0.attn.c_proj": 13},
        }
    return {
        "r": 4,
        "lora_alpha": 8,
        "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
        "alpha_pattern": {"v_proj": 3.5, "layers.0.mlp.up_proj": 13},
    }


@pytest.fixture(scope="module")
def bf16_bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {arch: make_base(arch, root / arch) for arch in ARCHS}


@pytest.mark.parametrize("variant", ["standard", "rslora", "patterns"])
@pytest.mark.parametrize("arch", ARCHS)
def test_bit_identical_to_peft(arch: str, variant: str, bf16_bases: dict[str, Path], tmp_path: Path) -> None:
    base = bf16_bases[arch]
    adapter = make_adapter(base, tmp_path / "adapter", arch, **variant_options(arch, variant))
    reference = peft_merge(base, adapter, tmp_path / "peft", torch.bfloat16)

    result = merge(base, adapter, tmp_path / "ours", dtype="bf16")

    ours = read_tensors(tmp_path / "ours")
    assert_same_tensors(ours, reference)
    base_tensors = read_tensors(base)
    changed = [name for name in ours if not torch.equal(ours[name], base_tensors[name])]
    assert len(changed) == result.tensors_merged > 0


def test_patterns_change_the_scaling(bf16_bases: dict[str, Path], tmp_path: Path) -> None:
    """The pattern variant is not accidentally equal to the plain one: per-module alpha really changes weights."""
    base = bf16_bases["llama"]
    options = variant_options("llama", "patterns")
    adapter = make_adapter(base, tmp_path / "a", "llama", **options)
    merge(base, adapter, tmp_path / "ours", dtype="f32")
    config = (adapter / "adapter_config.json").read_text().replace('"v_proj": 3.5', '"v_proj": 8')
    (adapter / "adapter_config.json").write_text(config)
    merge(base, adapter, tmp_path / "plain_alpha", dtype="f32")
    with_pattern, without = read_tensors(tmp_path / "ours"), read_tensors(tmp_path / "plain_alpha")
    name = "model.layers.0.self_attn.v_proj.weight"
    assert not torch.equal(with_pattern[name], without[name])
    assert torch.equal(
        with_pattern["model.layers.0.self_attn.q_proj.weight"], without["model.layers.0.self_attn.q_proj.weight"]
    )


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_merge_reproduces_adapter_logits(arch: str, tmp_path: Path) -> None:
    base = make_base(arch, tmp_path / "base", dtype=torch.float32)
    adapter = make_adapter(base, tmp_path / "adapter", arch)
    merge(base, adapter, tmp_path / "ours", dtype="f32")

    expected = logits(base, adapter)
    got = logits(tmp_path / "ours")
    assert not torch.allclose(expected, logits(base), atol=1e-3), "the adapter must change the logits"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert_same_tensors(read_tensors(tmp_path / "ours"), peft_merge(base, adapter, tmp_path / "peft", torch.float32))


def test_bf16_base_to_f32_equals_peft_on_a_float32_load(bf16_bases: dict[str, Path], tmp_path: Path) -> None:
    base = bf16_bases["llama"]
    adapter = make_adapter(base, tmp_path / "adapter", "llama")
    merge(base, adapter, tmp_path / "ours", dtype="f32")
    assert_same_tensors(read_tensors(tmp_path / "ours"), peft_merge(base, adapter, tmp_path / "peft", torch.float32))
    assert read_config(tmp_path / "ours")["dtype"] == "float32"


def test_bf16_base_to_f16_rounds_once_and_beats_peft(bf16_bases: dict[str, Path], tmp_path: Path) -> None:
    """bf16 -> f16: PEFT merges in bf16 and converts (two roundings); ours rounds the float32 sum once."""
    base = bf16_bases["llama"]
    adapter = make_adapter(base, tmp_path / "adapter", "llama")
    result = merge(base, adapter, tmp_path / "ours", dtype="f16")
    peft_bf16 = peft_merge(base, adapter, tmp_path / "peft", torch.bfloat16)
    ours = read_tensors(tmp_path / "ours")
    exact = _float64_merge(base, adapter)
    assert len(exact) == result.tensors_merged
    ours_total = peft_total = 0.0
    for name, truth in exact.items():
        ours_error = (ours[name].double() - truth).abs()
        peft_error = (peft_bf16[name].to(torch.float16).double() - truth).abs()
        assert ours_error.max() <= peft_error.max(), name
        ours_total += ours_error.sum().item()
        peft_total += peft_error.sum().item()
    assert ours_total < peft_total / 2
    assert all(t.dtype == torch.float16 for t in ours.values())
    assert read_config(tmp_path / "ours")["dtype"] == "float16"


def _float64_merge(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The exact merged values, in float64, for every adapted weight of a llama adapter."""
    import json

    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    weights = read_tensors(base)
    lora = read_tensors(adapter)
    exact = {}
    for key, a in lora.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        b = lora[key.replace("lora_A", "lora_B")]
        exact[f"{module}.weight"] = weights[f"{module}.weight"].double() + (b.double() @ a.double()) * scaling
    return exact
