"""Every adapter tensor is used or named: unused tensors fail the merge unless --allow-unused, --dry-run shows
what each tensor does; adapter_config.json from other PEFT versions (unknown fields, missing fields)."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import torch
from factories import assert_same_tensors, make_adapter, make_base, read_tensors
from safetensors.torch import load_file, save_file

from qlora_merge import KeyMatchError, merge
from qlora_merge.cli import main

STRAY = "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llama")
    base = make_base("llama", root / "base")
    return base, make_adapter(base, root / "adapter", "llama", modules_to_save=["lm_head"])


def with_stray_module(adapter: Path, tmp_path: Path) -> Path:
    """The adapter plus LoRA factors for a module the base does not have."""
    copy = tmp_path / "stray-adapter"
    copy.mkdir()
    (copy / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors[STRAY] = torch.ones(4, 64)
    tensors[STRAY.replace("lora_A", "lora_B")] = torch.ones(64, 4)
    save_file(tensors, copy / "adapter_model.safetensors")
    return copy


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_unused_tensors_fail_the_merge_unless_allowed(
    llama: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base, adapter = llama
    stray = with_stray_module(adapter, tmp_path)
    with pytest.raises(KeyMatchError, match=r"rotary' matches no tensor.*--allow-unused"):
        merge(base, stray, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()

    with caplog.at_level(logging.WARNING):
        result = merge(base, stray, tmp_path / "allowed", allow_unused=True)
    assert set(result.unused) == {STRAY, STRAY.replace("lora_A", "lora_B")}
    assert STRAY in caplog.text
    merge(base, adapter, tmp_path / "clean")
    assert_same_tensors(read_tensors(tmp_path / "allowed"), read_tensors(tmp_path / "clean"))

    code, _, err = run_cli("--base", str(base), "--adapter", str(stray), "--output", str(tmp_path / "cli"))
    assert code == 2 and "--allow-unused" in err and len(err.strip().splitlines()) == 1
    code, _, _ = run_cli(
        "--base", str(base), "--adapter", str(stray), "--output", str(tmp_path / "cli"), "--allow-unused"
    )
    assert code == 0 and (tmp_path / "cli" / "model.safetensors").is_file()


def test_dry_run_prints_coverage_and_writes_nothing(tmp_path: Path) -> None:
    """A tied base whose embedding is resized and adapted: the dry run names every adapter tensor, its target and
    shapes, the config.json changes, and the bytes a real run writes."""
    base = make_base("qwen2", tmp_path / "base")
    adapter = make_adapter(
        base, tmp_path / "adapter", "qwen2", vocab_size=168, target_modules=["embed_tokens", "q_proj"]
    )
    output = tmp_path / "out"

    code, out, err = run_cli("--base", str(base), "--adapter", str(adapter), "--output", str(output), "--dry-run")

    assert code == 0, err
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]
    for key in load_file(adapter / "adapter_model.safetensors"):
        assert key in out
    assert "base_model.model.model.embed_tokens.lora_embedding_A (4, 168) -> model.embed_tokens.weight (168, 64)" in out
    assert "output: lm_head.weight (168, 64): untied from model.embed_tokens.weight" in out
    assert "output: model.embed_tokens.weight (168, 64): resized from (160, 64)" in out
    assert "config.json: vocab_size -> 168" in out and "config.json: tie_word_embeddings -> false" in out
    assert "dry run: nothing was written" in out

    result = merge(base, adapter, output)
    assert f"would write {_human(result.bytes_written)}" in out

    code, out, _ = run_cli(
        "--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "o2"), "--dry-run", "--json"
    )
    report = json.loads(out)
    assert report["dry_run"] is True and report["config_changes"] == {"vocab_size": 168, "tie_word_embeddings": False}
    assert {row["adapter_key"] for row in report["coverage"]} == set(load_file(adapter / "adapter_model.safetensors"))
    assert not (tmp_path / "o2").exists()


def _human(n: int) -> str:
    from qlora_merge.progress import human_bytes

    return human_bytes(n)


def test_unknown_config_fields_warn_once_and_missing_ones_take_peft_defaults(
    llama: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base, adapter = llama
    config = json.loads((adapter / "adapter_config.json").read_text())
    edited = tmp_path / "adapter"
    edited.mkdir()
    (edited / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    # A newer PEFT's extra fields; and only what an old PEFT wrote (no use_rslora, use_dora, lora_bias, patterns ...).
    minimal = {k: config[k] for k in ("peft_type", "r", "lora_alpha", "target_modules", "modules_to_save")}
    (edited / "adapter_config.json").write_text(json.dumps(minimal | {"lora_shiny_new": 1, "future_mode": "x"}))

    with caplog.at_level(logging.WARNING):
        merge(base, edited, tmp_path / "ours")

    warnings = [r for r in caplog.records if "unknown adapter_config.json fields" in r.getMessage()]
    assert len(warnings) == 1 and "future_mode, lora_shiny_new" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()
    merge(base, adapter, tmp_path / "reference")
    assert_same_tensors(read_tensors(tmp_path / "ours"), read_tensors(tmp_path / "reference"))
