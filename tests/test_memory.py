"""Peak memory is flat in model size: a model 4x larger (more layers and wider tensors) costs no more RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tiny_checkpoints import llama_checkpoint


def llama_shaped(directory: Path, hidden: int, intermediate: int, layers: int, vocab: int) -> int:
    """A llama-shaped bf16 checkpoint in two shards and an r=16 adapter on every projection; returns the base bytes."""
    base, _ = llama_checkpoint(
        directory, hidden=hidden, intermediate=intermediate, layers=layers, vocab=vocab, rank=16, shards=2
    )
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
