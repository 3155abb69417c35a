"""Tied input embedding and output head (qwen2, gemma, gpt2 here): tying survives while the adapter leaves both
alone, or adapts both the same way (ensure_weight_tying); otherwise both are written and
`tie_word_embeddings: false`, so the merged model computes what the unmerged PeftModel computes.

PEFT's own merge is wrong in these cases (it adds the delta to the one shared tensor, so the other side gets it
too, or gets it twice), so the oracle is the unmerged model's logits; tensors PEFT does get right are still
compared bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import assert_same_tensors, logits, make_adapter, make_base, peft_merge, read_config, read_tensors
from safetensors.torch import load_file, save_file

from qlora_merge import UnsupportedAdapter, merge, preparation
from qlora_merge.inputs.format import read_safetensors_header
from qlora_merge.inputs.reader import TensorReader
from qlora_merge.outputs.companions import write_config

EMBED = {"qwen2": "model.embed_tokens.weight", "gemma": "model.embed_tokens.weight", "gpt2": "transformer.wte.weight"}


@pytest.mark.parametrize("arch", ["qwen2", "gemma", "gpt2"])
def test_tying_survives_when_embeddings_are_not_adapted(arch: str, tmp_path: Path) -> None:
    base = make_base(arch, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", arch)
    result = merge(base, adapter, tmp_path / "ours")
    ours = read_tensors(tmp_path / "ours")
    assert_same_tensors(ours, peft_merge(base, adapter, tmp_path / "peft", torch.bfloat16))
    assert "lm_head.weight" not in ours
    assert read_config(tmp_path / "ours").get("tie_word_embeddings") is not False
    assert result.config_changes == {}


CASES: dict[str, tuple[str, dict[str, Any], bool]] = {
    # name: (arch, adapter options, tying survives)
    "lora-on-embedding": ("qwen2", {"target_modules": ["embed_tokens", "q_proj"]}, False),
    "lora-on-head": ("qwen2", {"target_modules": ["lm_head", "q_proj"]}, False),
    "lora-on-both": ("gemma", {"target_modules": ["embed_tokens", "lm_head", "q_proj"]}, False),
    "dora-on-embedding": ("qwen2", {"target_modules": ["embed_tokens"], "use_dora": True}, False),
    "head-in-modules-to-save": ("qwen2", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, False),
    "embedding-in-modules-to-save": (
        "gemma",
        {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]},
        False,
    ),
    "gpt2-head-in-modules-to-save": ("gpt2", {"modules_to_save": ["lm_head"]}, False),
    "ensure-weight-tying-lora": (
        "qwen2",
        {"target_modules": ["embed_tokens", "q_proj"], "ensure_weight_tying": True},
        True,
    ),
    "ensure-weight-tying-modules-to-save": (
        "gemma",
        {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"], "ensure_weight_tying": True},
        True,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_adapted_tied_embeddings_reproduce_the_unmerged_model(case: str, tmp_path: Path) -> None:
    arch, options, stays_tied = CASES[case]
    base = make_base(arch, tmp_path / "base", dtype=torch.float32)
    adapter = make_adapter(base, tmp_path / "adapter", arch, **options)

    result = merge(base, adapter, tmp_path / "ours", dtype="f32")

    expected = logits(base, adapter)
    assert not torch.allclose(expected, logits(base), atol=1e-3), "the adapter must change the logits"
    torch.testing.assert_close(logits(tmp_path / "ours"), expected, rtol=1e-5, atol=1e-5)
    ours = read_tensors(tmp_path / "ours")
    config = read_config(tmp_path / "ours")
    if stays_tied:
        assert "lm_head.weight" not in ours
        assert config.get("tie_word_embeddings") is not False
        assert result.coverage and any(row.action.startswith("tied copy") for row in result.coverage)
    else:
        assert "lm_head.weight" in ours
        assert config["tie_word_embeddings"] is False
        assert result.config_changes == {"tie_word_embeddings": False}
    # Every tensor but the two embeddings is PEFT's, bit for bit.
    reference = peft_merge(base, adapter, tmp_path / "peft", torch.float32)
    shared = sorted(set(reference) - {EMBED[arch], "lm_head.weight"})
    assert_same_tensors({n: ours[n] for n in shared}, {n: reference[n] for n in shared})


def test_peft_merge_is_wrong_where_we_differ(tmp_path: Path) -> None:
    """The reason for the logits oracle: with a LoRA on a tied lm_head, PEFT's merged model does not reproduce
    its own unmerged model (the embedding receives the head's delta)."""
    base = make_base("qwen2", tmp_path / "base", dtype=torch.float32)
    adapter = make_adapter(base, tmp_path / "adapter", "qwen2", target_modules=["lm_head"])
    peft_merge(base, adapter, tmp_path / "peft", torch.float32)
    assert not torch.allclose(logits(tmp_path / "peft"), logits(base, adapter), atol=1e-3)


@pytest.mark.parametrize("arch", ["qwen2", "llama"], ids=["tied", "untied"])
def test_a_lora_bias_on_a_head_without_bias_is_refused_tied_or_not(arch: str, tmp_path: Path) -> None:
    """The unmerged model adds lm_head.lora_B.bias to the logits, but the merged model's head has no bias to hold it
    (PEFT cannot merge it either): refused by name, whether the head is tied to the embedding or not, never dropped."""
    base = make_base(arch, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", arch, target_modules=["lm_head"], lora_bias=True)
    assert "base_model.model.lm_head.lora_B.bias" in load_file(adapter / "adapter_model.safetensors")
    with pytest.raises(UnsupportedAdapter, match=r"lm_head\.lora_B\.bias' is a LoRA bias but .* has no bias to add it"):
        merge(base, adapter, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_tied_copies_are_compared_a_chunk_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whole tensors (a saved embedding against a saved head) are compared in chunks, from the file or from memory
    (a .bin adapter); a difference in the last chunk, or another dtype, still counts."""
    monkeypatch.setattr(preparation, "COMPARE_CHUNK_BYTES", 100)
    values = torch.randn(40, 16)
    changed = values.clone()
    changed[-1, -1] += 1
    path = tmp_path / "t.safetensors"
    save_file({"a": values, "b": values.clone(), "c": changed, "d": values.to(torch.bfloat16)}, path)
    entries = {entry.name: entry for entry in read_safetensors_header(path).tensors}
    with TensorReader() as reader:

        def same(first: Any, second: Any, transpose: bool = False) -> bool:
            return preparation._same_values(first, second, transpose, reader)

        assert same(entries["a"], entries["b"]) and same(entries["a"], values) and same(values, entries["b"])
        assert not same(entries["a"], entries["c"]) and not same(changed, entries["a"])
        assert not same(entries["a"], entries["d"])
        assert same(entries["a"], values.T.contiguous(), True) and not same(entries["a"], values, True)


def test_untying_edits_nested_text_config(tmp_path: Path) -> None:
    """Multimodal configs keep the language model's fields in text_config: both places change."""
    base_config = {
        "model_type": "qwen2_vl",
        "tie_word_embeddings": True,
        "vocab_size": 160,
        "text_config": {"tie_word_embeddings": True, "vocab_size": 160, "dtype": "bfloat16"},
    }
    write_config(base_config, "float16", tmp_path, {"tie_word_embeddings": False, "vocab_size": 168})
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["tie_word_embeddings"] is False and written["vocab_size"] == 168
    assert written["text_config"] == {"tie_word_embeddings": False, "vocab_size": 168, "dtype": "float16"}
