"""Whole tensors saved in the adapter replace the base's: modules_to_save (lm_head, embed_tokens, a classifier
head), trained biases (bias="all" | "lora_only"); and LoRA biases (lora_bias=True) are added."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from factories import (
    assert_same_tensors,
    logits,
    make_adapter,
    make_base,
    peft_merge,
    read_tensors,
    tiny_config,
)
from safetensors.torch import load_file, save_file

from qlora_merge import merge


def changed_names(ours: dict[str, torch.Tensor], base: Path) -> set[str]:
    before = read_tensors(base)
    return {name for name, tensor in ours.items() if name not in before or not torch.equal(tensor, before[name])}


@pytest.mark.parametrize(
    ("arch", "options", "replaced"),
    [
        ("llama", {"modules_to_save": ["lm_head", "embed_tokens"]}, {"lm_head.weight", "model.embed_tokens.weight"}),
        ("phi3", {"modules_to_save": ["lm_head"]}, {"lm_head.weight"}),
        ("qwen2", {"bias": "all", "target_modules": ["q_proj", "v_proj"]}, {"model.layers.0.self_attn.k_proj.bias"}),
        ("gpt2", {"bias": "all"}, {"transformer.h.0.ln_1.bias", "transformer.ln_f.bias"}),
        ("gpt2", {"bias": "lora_only"}, {"transformer.h.1.attn.c_attn.bias", "transformer.h.0.mlp.c_fc.bias"}),
        ("gpt2", {"lora_bias": True}, {"transformer.h.0.attn.c_attn.bias", "transformer.h.1.mlp.c_proj.bias"}),
        (
            "qwen2",
            {"lora_bias": True, "target_modules": ["q_proj", "k_proj"]},
            {"model.layers.1.self_attn.q_proj.bias"},
        ),
    ],
    ids=[
        "mts-llama",
        "mts-phi3",
        "bias-all-qwen2",
        "bias-all-gpt2",
        "bias-lora-only-gpt2",
        "lora-bias-gpt2",
        "lora-bias-qwen2",
    ],
)
def test_bit_identical_to_peft(arch: str, options: dict[str, Any], replaced: set[str], tmp_path: Path) -> None:
    base = make_base(arch, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", arch, **options)
    reference = peft_merge(base, adapter, tmp_path / "peft", torch.bfloat16)

    result = merge(base, adapter, tmp_path / "ours")

    ours = read_tensors(tmp_path / "ours")
    assert_same_tensors(ours, reference)
    assert replaced <= changed_names(ours, base), "the adapter's tensors must change these"
    assert {row.adapter_key for row in result.coverage} == set(load_file(adapter / "adapter_model.safetensors"))


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("llama", {"modules_to_save": ["lm_head", "embed_tokens"]}),
        ("gpt2", {"bias": "all", "lora_bias": True}),
    ],
)
def test_float32_merge_reproduces_adapter_logits(arch: str, options: dict[str, Any], tmp_path: Path) -> None:
    base = make_base(arch, tmp_path / "base", dtype=torch.float32)
    adapter = make_adapter(base, tmp_path / "adapter", arch, **options)
    merge(base, adapter, tmp_path / "ours", dtype="f32")
    expected = logits(base, adapter)
    torch.testing.assert_close(logits(tmp_path / "ours"), expected, rtol=1e-5, atol=1e-5)
    assert_same_tensors(read_tensors(tmp_path / "ours"), peft_merge(base, adapter, tmp_path / "peft", torch.float32))


def test_old_modules_to_save_keys_are_read(tmp_path: Path) -> None:
    """Files that kept the wrapper's name (`lm_head.modules_to_save.default.weight`) replace the same tensor."""
    base = make_base("llama", tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", "llama", modules_to_save=["lm_head"])
    merge(base, adapter, tmp_path / "new")
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.lm_head.modules_to_save.default.weight"] = tensors.pop("base_model.model.lm_head.weight")
    save_file(tensors, path)
    merge(base, adapter, tmp_path / "old")
    assert_same_tensors(read_tensors(tmp_path / "old"), read_tensors(tmp_path / "new"))


def test_classifier_head_is_replaced(tmp_path: Path) -> None:
    """A sequence-classification adapter: PEFT puts the `score` head in modules_to_save itself."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    config = tiny_config("llama")
    config.num_labels = 3
    config.pad_token_id = 0
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert "base_model.model.score.weight" in load_file(tmp_path / "adapter" / "adapter_model.safetensors")

    merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "ours")

    reference_model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "base", dtype=torch.bfloat16
    )
    PeftModel.from_pretrained(reference_model, tmp_path / "adapter").merge_and_unload().save_pretrained(
        tmp_path / "peft"
    )
    ours = read_tensors(tmp_path / "ours")
    assert_same_tensors(ours, read_tensors(tmp_path / "peft"))
    assert "score.weight" in changed_names(ours, tmp_path / "base")
