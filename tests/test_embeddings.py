"""Embedding LoRA (lora_embedding_A/B, W += round(s * (B @ A).T)), with DoRA too; resized vocabularies; tied
embeddings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import assert_same_tensors, logits, make_adapter, make_base, peft_merge, read_config, read_tensors
from safetensors.torch import load_file

from qlora_merge import ShapeMismatch, merge
from qlora_merge.merging import blocking, variants

EMBED = "model.embed_tokens.weight"


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("llama", {"target_modules": ["embed_tokens", "q_proj", "down_proj"]}),
        ("llama", {"target_modules": ["embed_tokens", "q_proj"], "r": 8, "lora_alpha": 5, "use_rslora": True}),
        ("llama", {"target_modules": ["embed_tokens", "v_proj"], "use_dora": True}),
        ("phi3", {"target_modules": ["embed_tokens", "qkv_proj", "gate_up_proj"]}),
    ],
    ids=["llama", "llama-rslora", "llama-dora", "phi3"],
)
def test_embedding_lora_bit_identical_to_peft(
    arch: str, options: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16 base: PEFT rounds the embedding delta to bf16 before adding it; we must round the same way. Blocks of
    20 rows so the embedding goes in several blocks."""
    monkeypatch.setattr(blocking, "BLOCK_ELEMENTS", 20 * 64)
    base = make_base(arch, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", arch, **options)
    keys = load_file(adapter / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys

    merge(base, adapter, tmp_path / "ours")

    ours = read_tensors(tmp_path / "ours")
    assert_same_tensors(ours, peft_merge(base, adapter, tmp_path / "peft", torch.bfloat16))
    assert not torch.equal(ours[EMBED], read_tensors(base)[EMBED])


def test_embedding_delta_is_rounded_before_the_add() -> None:
    """The one place PEFT rounds twice: W(bf16) += delta.to(bf16). Rounding once differs."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, generator=generator).to(torch.bfloat16)
    delta = torch.randn(64, 32, generator=generator) * 0.05
    peft = weight.clone()
    peft += delta.to(torch.bfloat16)
    out = torch.empty_like(weight)
    variants.merge_rows_into(weight, delta.clone(), torch.empty(64 * 32), out, round_delta_to=torch.bfloat16)
    assert torch.equal(out, peft)
    once = torch.empty_like(weight)
    variants.merge_rows_into(weight, delta.clone(), torch.empty(64 * 32), once)
    assert not torch.equal(once, peft)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_embedding_merge_reproduces_adapter_logits(use_dora: bool, tmp_path: Path) -> None:
    base = make_base("llama", tmp_path / "base", dtype=torch.float32)
    adapter = make_adapter(base, tmp_path / "adapter", "llama", target_modules=["embed_tokens"], use_dora=use_dora)
    merge(base, adapter, tmp_path / "ours", dtype="f32")
    expected = logits(base, adapter)
    assert not torch.allclose(expected, logits(base), atol=1e-3), "the adapter must change the logits"
    torch.testing.assert_close(logits(tmp_path / "ours"), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("llama", {"target_modules": ["q_proj"]}),
        ("llama", {"target_modules": ["embed_tokens", "lm_head", "q_proj"]}),
        ("llama", {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens", "lm_head"]}),
        ("qwen2", {"target_modules": ["q_proj"]}),
    ],
    ids=["saved-embeddings", "embedding-and-head-lora", "modules-to-save", "tied-qwen2"],
)
def test_resized_vocabulary(arch: str, options: dict[str, Any], tmp_path: Path) -> None:
    """Tokens were added (160 -> 168) before training: the adapter carries the resized embedding (and head); the
    output takes their shapes, config.json's vocab_size follows and the adapter's tokenizer files are used."""
    base = make_base(arch, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", arch, vocab_size=168, **options)
    (adapter / "tokenizer_config.json").write_text(json.dumps({"added": "by the trainer"}))
    shapes = {k: v.shape for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    assert any(shape[0] == 168 for shape in shapes.values()), shapes

    result = merge(base, adapter, tmp_path / "ours")

    ours = read_tensors(tmp_path / "ours")
    assert_same_tensors(ours, peft_merge(base, adapter, tmp_path / "peft", torch.bfloat16, vocab_size=168))
    assert ours[EMBED].shape == (168, 64)
    config = read_config(tmp_path / "ours")
    assert config["vocab_size"] == 168 == read_config(tmp_path / "peft")["vocab_size"]
    assert config.get("tie_word_embeddings") == read_config(base).get("tie_word_embeddings")
    assert result.config_changes == {"vocab_size": 168}
    assert json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text()) == {"added": "by the trainer"}


def test_resized_vocabulary_logits(tmp_path: Path) -> None:
    base = make_base("llama", tmp_path / "base", dtype=torch.float32)
    adapter = make_adapter(
        base, tmp_path / "adapter", "llama", vocab_size=168, target_modules=["embed_tokens", "lm_head"]
    )
    merge(base, adapter, tmp_path / "ours", dtype="f32")
    prompt = [1, 165, 9, 167, 70, 2, 161, 7]  # new tokens included
    expected = logits(base, adapter, vocab_size=168, ids=prompt)
    assert expected.shape[-1] == 168
    torch.testing.assert_close(logits(tmp_path / "ours", ids=prompt), expected, rtol=1e-5, atol=1e-5)


def test_resized_embedding_without_its_head_is_refused(tmp_path: Path) -> None:
    """LoRA on a resized embedding of an untied model: PEFT saves the embedding but not lm_head, whose new rows
    were never trained; merging would have to invent them."""
    base = make_base("llama", tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", "llama", vocab_size=168, target_modules=["embed_tokens"])
    with pytest.raises(ShapeMismatch, match=r"'lm_head\.weight' has 160 rows, 'model\.embed_tokens\.weight' has 168"):
        merge(base, adapter, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()
