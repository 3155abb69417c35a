"""Llama-shaped checkpoints and LoRA adapters written with safetensors directly (no transformers, no PEFT: fast), and
an independent reference merge to check outputs against."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


def llama_checkpoint(
    directory: Path,
    hidden: int = 32,
    intermediate: int = 48,
    layers: int = 1,
    vocab: int = 64,
    rank: int = 4,
    shards: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> tuple[Path, Path]:
    """`directory/base` (a llama checkpoint in `shards` files, with an index when more than one) and
    `directory/adapter` (r=`rank`, alpha=2*rank, on every projection); returns both paths."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden // 4, hidden),
        "v_proj": (hidden // 4, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (intermediate, hidden),
        "up_proj": (intermediate, hidden),
        "down_proj": (hidden, intermediate),
    }
    base, adapter = directory / "base", directory / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    weights: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    lora = {}
    for layer in range(layers):
        for name, shape in shapes.items():
            group = "self_attn" if name in PROJECTIONS[:4] else "mlp"
            module = f"model.layers.{layer}.{group}.{name}"
            weights[f"{module}.weight"] = shape
            lora[f"{PEFT_PREFIX}{module}.lora_A.weight"] = torch.randn(rank, shape[1], generator=generator) * 0.1
            lora[f"{PEFT_PREFIX}{module}.lora_B.weight"] = torch.randn(shape[0], rank, generator=generator) * 0.1
        weights[f"model.layers.{layer}.input_layernorm.weight"] = (hidden,)
    weights["model.norm.weight"] = (hidden,)
    weights["lm_head.weight"] = (vocab, hidden)
    names = list(weights)
    per_shard = math.ceil(len(names) / shards)
    weight_map = {}
    for index in range(shards):
        part = names[index * per_shard : (index + 1) * per_shard]
        file_name = "model.safetensors" if shards == 1 else f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {n: torch.randn(weights[n], generator=generator).to(dtype) for n in part}
        save_file(tensors, base / file_name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file_name)
    if shards > 1:
        index_json = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (base / "model.safetensors.index.json").write_text(json.dumps(index_json))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16"}
    (base / "config.json").write_text(json.dumps(config))
    save_file(lora, adapter / "adapter_model.safetensors")
    adapter_config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(PROJECTIONS)}
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))
    return base, adapter


def base_tensors(base: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(base.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def reference_merge(base: Path, adapter: Path, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """W + scale * (B @ A) in float32, rounded once, for every base tensor an adapter module names; the rest as they
    are (floating-point ones converted to `dtype`). Reads the files with the safetensors library, not with
    qlora-merge's reader."""
    from qlora_merge.merging.variants import lora_scaling, module_rank_alpha

    config: dict[str, Any] = json.loads((adapter / "adapter_config.json").read_text())
    lora = load_file(adapter / "adapter_model.safetensors")
    merged = {}
    for name, weight in base_tensors(base).items():
        module = name.removesuffix(".weight")
        a = lora.get(f"{PEFT_PREFIX}{module}.lora_A.weight")
        if a is None:
            merged[name] = weight.to(dtype) if weight.is_floating_point() else weight
            continue
        b = lora[f"{PEFT_PREFIX}{module}.lora_B.weight"]
        r, alpha = module_rank_alpha(
            module,
            config.get("r", 8),
            config.get("lora_alpha", 8),
            config.get("rank_pattern") or {},
            config.get("alpha_pattern") or {},
        )
        scale = lora_scaling(alpha, r, config.get("use_rslora", False))
        delta = (b.float() @ a.float()).mul_(scale)
        merged[name] = delta.add_(weight.float()).to(dtype)
    return merged
