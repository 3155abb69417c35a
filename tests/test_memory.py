"""Peak memory is flat in model size: a model 4x larger (more layers and wider tensors) costs no more RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

RANK = 16
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_shaped(directory: Path, hidden: int, intermediate: int, layers: int, vocab: int) -> int:
    """A llama-shaped bf16 checkpoint (two shards) and an r=16 adapter on every projection; returns the base bytes."""
    generator = torch.Generator().manual_seed(hidden)
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
    weights = {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)}
    lora = {}
    for layer in range(layers):
        for name, shape in shapes.items():
            group = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            module = f"model.layers.{layer}.{group}.{name}"
            weights[f"{module}.weight"] = shape
            lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(RANK, shape[1], generator=generator)
            lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(shape[0], RANK, generator=generator)
    names = list(weights)
    half = len(names) // 2
    for index, part in enumerate((names[:half], names[half:]), 1):
        tensors = {n: torch.randn(weights[n], generator=generator).to(torch.bfloat16) for n in part}
        save_file(tensors, base / f"model-{index:05d}-of-00002.safetensors", metadata={"format": "pt"})
    (base / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    save_file(lora, adapter / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 32, "target_modules": list(PROJECTIONS)}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return sum(p.stat().st_size for p in base.glob("*.safetensors"))


def merge_peak_rss(directory: Path) -> float:
    """Peak RSS in bytes of a CLI merge in its own process, as it reports it (VmHWM)."""
    out = directory / "merged"
    command = [sys.executable, "-m", "qlora_merge", "--base", str(directory / "base")]
    command += ["--adapter", str(directory / "adapter"), "--output", str(out), "--json"]
    done = subprocess.run(
        command, capture_output=True, text=True, check=True, env=os.environ | {"OMP_NUM_THREADS": "2"}
    )
    result = json.loads(done.stdout)
    assert result["tensors_merged"] > 0
    return result["peak_rss_gb"] * 1e9


def test_peak_rss_does_not_grow_with_a_4x_larger_model(tmp_path: Path) -> None:
    # Both models are past every fixed-size buffer (shards above the writer's 32 MiB pieces, tensors above the
    # 1M-element merge blocks), so what is measured is growth with the model, not buffers short of their cap.
    small_bytes = llama_shaped(tmp_path / "small", hidden=1024, intermediate=2048, layers=2, vocab=8192)
    large_bytes = llama_shaped(tmp_path / "large", hidden=2048, intermediate=4096, layers=3, vocab=8192)
    assert large_bytes >= 4 * small_bytes
    small_peak = merge_peak_rss(tmp_path / "small")
    large_peak = merge_peak_rss(tmp_path / "large")
    # A whole-model tool grows by the model's size (here 212 MB), a whole-tensor fp32 buffer by ~25 MB; we measure ~5 MB
    # (the larger adapter and headers).
    growth = large_peak - small_peak
    assert growth < 16e6, (small_peak, large_peak, small_bytes, large_bytes)
