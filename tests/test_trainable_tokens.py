"""trainable_token_indices: the trained rows replace the embedding's (and a tied or targeted head's) rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from factories import assert_same_tensors, logits, make_adapter, make_base, peft_merge, read_config, read_tensors
from safetensors.torch import load_file

from qlora_merge import merge
from qlora_merge.merging import stream

EMBED = "model.embed_tokens.weight"
PROMPT = [1, 3, 9, 150, 7, 5, 2, 101]  # trained tokens 3, 150 and 5 included

CASES: dict[str, tuple[str, dict[str, Any], bool]] = {
    # name: (arch, trainable_token_indices, output stays tied)
    "untied-list": ("llama", {"trainable_token_indices": [3, 7, 150]}, False),
    "untied-embedding-and-head": (
        "llama",
        {"trainable_token_indices": {"embed_tokens": [3, 7], "lm_head": [5]}},
        False,
    ),
    "tied-list": ("qwen2", {"trainable_token_indices": [3, 7, 150]}, True),
    "resized-vocabulary": ("qwen2", {"trainable_token_indices": [3, 165], "vocab_size": 168}, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_trainable_tokens_bit_identical_to_peft(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 32 rows, so the trained rows fall in different chunks."""
    arch, options, stays_tied = CASES[case]
    monkeypatch.setattr(stream, "CONVERT_CHUNK_BYTES", 32 * 64 * 2)
    base = make_base(arch, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", arch, target_modules=["q_proj"], **options)
    assert any(k.endswith("trainable_tokens_delta") for k in load_file(adapter / "adapter_model.safetensors"))

    result = merge(base, adapter, tmp_path / "ours")

    ours = read_tensors(tmp_path / "ours")
    reference = peft_merge(base, adapter, tmp_path / "peft", torch.bfloat16, vocab_size=options.get("vocab_size"))
    assert_same_tensors(ours, reference)
    base_embed = read_tensors(base)[EMBED]
    rows = options["trainable_token_indices"]
    rows = rows if isinstance(rows, list) else rows["embed_tokens"]
    changed = {i for i in range(base_embed.shape[0]) if not torch.equal(ours[EMBED][i], base_embed[i])}
    assert changed == {i for i in rows if i < base_embed.shape[0]}, "exactly the trained rows change"
    assert (
        ("lm_head.weight" not in ours)
        == stays_tied
        == (read_config(tmp_path / "ours").get("tie_word_embeddings") is True)
    )
    assert any("token rows replaced" in row.action for row in result.coverage)


def test_tokens_on_a_tied_head_alone_untie_it(tmp_path: Path) -> None:
    """Only lm_head's rows trained in a tied model: PEFT's merge writes them into the shared tensor, so the
    embedding changes too; the unmerged model's embedding does not. We untie."""
    base = make_base("qwen2", tmp_path / "base", dtype=torch.float32)
    adapter = make_adapter(
        base, tmp_path / "adapter", "qwen2", target_modules=["q_proj"], trainable_token_indices={"lm_head": [5, 9]}
    )
    merge(base, adapter, tmp_path / "ours", dtype="f32")
    ours = read_tensors(tmp_path / "ours")
    assert torch.equal(ours[EMBED], read_tensors(base)[EMBED])
    assert read_config(tmp_path / "ours")["tie_word_embeddings"] is False
    expected = logits(base, adapter, ids=PROMPT)
    assert not torch.allclose(expected, logits(base, ids=PROMPT), atol=1e-3)
    torch.testing.assert_close(logits(tmp_path / "ours", ids=PROMPT), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_trainable_tokens_reproduce_adapter_logits(arch: str, tmp_path: Path) -> None:
    base = make_base(arch, tmp_path / "base", dtype=torch.float32)
    adapter = make_adapter(
        base, tmp_path / "adapter", arch, target_modules=["q_proj"], trainable_token_indices=[3, 150]
    )
    merge(base, adapter, tmp_path / "ours", dtype="f32")
    expected = logits(base, adapter, ids=PROMPT)
    torch.testing.assert_close(logits(tmp_path / "ours", ids=PROMPT), expected, rtol=1e-5, atol=1e-5)
