"""Multimodal checkpoints: LoRA on a VLM's language model (Qwen2-VL), and seed 001's case, a text-only adapter
merged into the multimodal checkpoint (Qwen3.5), checked tensor by tensor against PEFT's merge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from factories import assert_same_tensors, read_config, read_tensors
from safetensors.torch import save_file

from qlora_merge import merge

LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QWEN35_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 112,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 160,
    "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}


def randomised_adapter(model: Any, directory: Path, **lora: Any) -> Path:
    """A real PEFT LoRA adapter on `model` with random, non-zero factors."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, **lora))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(directory)
    return directory


def peft_merged(model_class: Any, base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    model = model_class.from_pretrained(base, dtype=torch.bfloat16)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    return read_tensors(out)


def test_lora_on_a_vlm_language_model_equals_peft(tmp_path: Path) -> None:
    import transformers

    config = transformers.Qwen2VLConfig(
        text_config={
            "hidden_size": 64,
            "intermediate_size": 112,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 160,
            "max_position_embeddings": 64,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]},
            "tie_word_embeddings": False,
        },
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2, "patch_size": 4},
    )
    torch.manual_seed(0)
    model_class = transformers.Qwen2VLForConditionalGeneration
    model_class(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    model = model_class.from_pretrained(tmp_path / "base", dtype=torch.float32)
    adapter = randomised_adapter(model, tmp_path / "adapter", target_modules=LM_TARGETS)

    result = merge(tmp_path / "base", adapter, tmp_path / "ours")

    reference = peft_merged(model_class, tmp_path / "base", adapter, tmp_path / "peft")
    ours = read_tensors(tmp_path / "ours")
    assert_same_tensors(ours, reference)
    assert result.tensors_merged == 2 * len(LM_TARGETS)
    base = read_tensors(tmp_path / "base")
    assert all(torch.equal(ours[k], v) for k, v in base.items() if ".visual." in k), "the vision tower is untouched"


@pytest.mark.parametrize("loader", ["qwen3.5", "auto"])
def test_text_adapter_into_the_qwen35_multimodal_checkpoint(loader: str, tmp_path: Path) -> None:
    """Seed 001: an adapter trained on the text-only Qwen3.5 (keys `model.layers...`) merged into the multimodal
    checkpoint (`model.language_model.layers...`, a vision tower, and `mtp.*` tensors no model class loads)."""
    import transformers

    torch.manual_seed(0)
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "out_hidden_size": 64}
    vlm = transformers.Qwen3_5ForConditionalGeneration(
        transformers.Qwen3_5Config(text_config=QWEN35_TEXT, vision_config=vision | {"patch_size": 4})
    ).to(torch.bfloat16)
    vlm.save_pretrained(tmp_path / "vlm")
    # Multi-token-prediction weights ship in Qwen3.5 checkpoints but load into no class; layer 0's names end like
    # the language model's, which the key matcher has to see through.
    vlm_tensors = read_tensors(tmp_path / "vlm")
    mtp = {
        f"mtp.layers.0.mlp.{name}.weight": torch.randn(shape).to(torch.bfloat16)
        for name, shape in {"gate_proj": (112, 64), "up_proj": (112, 64), "down_proj": (64, 112)}.items()
    }
    for path in (tmp_path / "vlm").glob("*.safetensors"):
        path.unlink()
    save_file(vlm_tensors | mtp, tmp_path / "vlm" / "model.safetensors", metadata={"format": "pt"})

    text = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**QWEN35_TEXT)).to(torch.bfloat16)
    to_vlm = {name: _vlm_name(name) for name in text.state_dict()}
    text.load_state_dict({name: vlm_tensors[to_vlm[name]] for name in to_vlm})
    text.save_pretrained(tmp_path / "text")
    text32 = transformers.Qwen3_5ForCausalLM.from_pretrained(tmp_path / "text", dtype=torch.float32)
    adapter = randomised_adapter(text32, tmp_path / "adapter", target_modules="all-linear")

    result = merge(tmp_path / "vlm", adapter, tmp_path / "ours", loader=loader)

    reference = peft_merged(transformers.Qwen3_5ForCausalLM, tmp_path / "text", adapter, tmp_path / "peft")
    ours = read_tensors(tmp_path / "ours")
    expected = vlm_tensors | mtp | {to_vlm[name]: value for name, value in reference.items()}
    assert_same_tensors(ours, expected)
    changed = [name for name, value in ours.items() if not torch.equal(value, (vlm_tensors | mtp)[name])]
    assert len(changed) == result.tensors_merged > 4 * 4, "linear and full attention layers both merged"
    assert not [name for name in changed if not name.startswith("model.language_model.")]
    assert read_config(tmp_path / "ours")["architectures"] == ["Qwen3_5ForConditionalGeneration"]


def _vlm_name(text_name: str) -> str:
    """The multimodal checkpoint's name for a text-only Qwen3.5 tensor."""
    return text_name if text_name.startswith("lm_head") else text_name.replace("model.", "model.language_model.", 1)
