"""Tiny real models and real PEFT adapters for tests, plus PEFT's own merge as the oracle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

TINY = {"hidden_size": 64, "intermediate_size": 112, "num_hidden_layers": 2, "vocab_size": 160}


def tiny_config(arch: str) -> Any:
    import transformers

    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=160)
    common = dict(TINY, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "mistral":
        return transformers.MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
    if arch == "gemma":
        return transformers.GemmaConfig(**common, head_dim=16, tie_word_embeddings=True)
    if arch == "phi3":
        return transformers.Phi3Config(**common, tie_word_embeddings=False, pad_token_id=0)
    # MoE: four experts, two per token; transformers v5 fuses them into 3-D parameters in memory
    moe = dict(num_experts_per_tok=2, tie_word_embeddings=False)
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, **moe, head_dim=16, moe_intermediate_size=48, num_experts=4)
    if arch == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **common, **moe, moe_intermediate_size=48, shared_expert_intermediate_size=96, num_experts=4
        )
    if arch == "mixtral":
        return transformers.MixtralConfig(**common, **moe, num_local_experts=4)
    if arch == "gpt_oss":
        return transformers.GptOssConfig(
            **common, **moe, head_dim=16, num_local_experts=4, rope_parameters={"rope_type": "default"}
        )
    raise ValueError(arch)


# The fused 3-D expert parameters of transformers v5 MoE models, adapted with target_parameters.
MOE_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "default": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def targets(arch: str) -> list[str]:
    return TARGETS.get(arch, TARGETS["default"])


def make_base(
    arch: str, directory: Path, dtype: torch.dtype = torch.bfloat16, max_shard_size: str | None = "60KB"
) -> Path:
    """A randomly initialised model of `arch` saved as transformers saves it (sharded unless max_shard_size=None)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch)).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {"max_shard_size": "10GB"}
    model.save_pretrained(directory, **kwargs)
    return directory


def make_adapter(
    base_dir: Path,
    directory: Path,
    arch: str,
    seed: int = 1,
    vocab_size: int | None = None,
    save_embedding_layers: bool | str = "auto",
    **lora_kwargs: Any,
) -> Path:
    """A real PEFT LoRA adapter on `base_dir`, every trained tensor random and different from the base (saved in
    float32, as PEFT does): A and B, DoRA magnitudes (the initial norms times 1 +- 10%), modules_to_save copies
    and trained biases (the base's values plus noise). `vocab_size` resizes the embeddings first, as trainers do
    after adding tokens."""
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if vocab_size is not None:
        model.resize_token_embeddings(vocab_size)
    options: dict[str, Any] = {"r": 4, "lora_alpha": 8, "target_modules": targets(arch), "lora_dropout": 0.0}
    options.update(lora_kwargs)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + torch.randn(param.shape, generator=generator) * 0.1)
            elif "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            elif param.requires_grad:  # modules_to_save copies, trained biases
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(directory, save_embedding_layers=save_embedding_layers)
    return directory


def peft_merge(
    base_dir: Path, adapter_dir: Path, out_dir: Path, dtype: torch.dtype, vocab_size: int | None = None
) -> dict[str, torch.Tensor]:
    """The seeds' way: load base in `dtype`, PeftModel, merge_and_unload(), save_pretrained(); return the tensors.
    `vocab_size` resizes the embeddings before the adapter is loaded, as PEFT requires for a resized adapter."""
    import transformers
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    if vocab_size is not None:
        model.resize_token_embeddings(vocab_size)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    merged.save_pretrained(out_dir)
    return read_tensors(out_dir)


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def read_config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text())


def assert_same_tensors(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bit-identical values, tensor by tensor."""
    assert sorted(ours) == sorted(reference)
    for name, expected in reference.items():
        got = ours[name]
        assert got.dtype == expected.dtype, name
        assert got.shape == expected.shape, name
        if not torch.equal(got, expected):
            differing = (got != expected).sum().item()
            raise AssertionError(f"{name}: {differing} of {got.numel()} elements differ from PEFT's merge")


def logits(
    model_dir: Path,
    adapter_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
    vocab_size: int | None = None,
    ids: list[int] | None = None,
) -> torch.Tensor:
    """Logits on a fixed prompt of the saved model, or of base + unmerged adapter when `adapter_dir` is given
    (`vocab_size` resizes the base first)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    if vocab_size is not None:
        model.resize_token_embeddings(vocab_size)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    prompt = torch.tensor([ids or [1, 5, 9, 33, 70, 2, 101, 7]])
    with torch.no_grad():
        return model(input_ids=prompt).logits
