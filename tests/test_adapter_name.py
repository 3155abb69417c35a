"""Several named adapters saved in one directory (PEFT keeps "default" at the top, the others in sub-folders):
--adapter-name picks one, locally and from the hub cache, and the merge equals PEFT's merge of that adapter."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import assert_same_tensors, make_base, peft_merge, read_tensors, targets
from test_resolve import COMMIT, add_to_cache, hub_cache  # noqa: F401 (hub_cache is a fixture)

from qlora_merge import InputNotFound, merge, verify
from qlora_merge.cli import main


def two_adapters(base: Path, directory: Path, default_name: str = "default") -> Path:
    """One PEFT model holding two LoRA adapters with different random factors and ranks, saved together."""
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    options: dict[str, Any] = {"target_modules": targets("llama"), "lora_dropout": 0.0}
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **options), adapter_name=default_name)
    peft_model.add_adapter("other", LoraConfig(r=2, lora_alpha=5, **options))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("named")
    base = make_base("llama", root / "base")
    return base, two_adapters(base, root / "adapters")


def test_peft_layout_default_at_the_top_others_in_sub_folders(saved: tuple[Path, Path]) -> None:
    _, adapters = saved
    assert (adapters / "adapter_config.json").is_file() and (adapters / "other" / "adapter_config.json").is_file()


@pytest.mark.parametrize("name", [None, "default", "other"])
def test_each_named_adapter_merges_like_peft(name: str | None, saved: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapters = saved
    result = merge(base, adapters, tmp_path / "ours", adapter_name=name)
    chosen = adapters / "other" if name == "other" else adapters
    assert result.adapter == chosen
    assert_same_tensors(read_tensors(tmp_path / "ours"), peft_merge(base, chosen, tmp_path / "peft", torch.bfloat16))
    assert verify(base, adapters, tmp_path / "ours", adapter_name=name).ok


def test_the_two_adapters_differ(saved: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapters = saved
    merge(base, adapters, tmp_path / "default")
    merge(base, adapters, tmp_path / "other", adapter_name="other")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(read_tensors(tmp_path / "default")[name], read_tensors(tmp_path / "other")[name])


def test_unknown_name_lists_the_adapters_found(saved: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapters = saved
    with pytest.raises(InputNotFound, match=r"no adapter named 'nope' \(found: 'default', 'other'\)"):
        merge(base, adapters, tmp_path / "out", adapter_name="nope")
    assert not (tmp_path / "out").exists()


def test_only_named_adapters_needs_a_name(tmp_path: Path) -> None:
    base = make_base("llama", tmp_path / "base")
    adapters = two_adapters(base, tmp_path / "adapters", default_name="first")
    assert not (adapters / "adapter_config.json").exists()
    err = io.StringIO()
    argv = ["--base", str(base), "--adapter", str(adapters), "--output", str(tmp_path / "out")]
    assert main(argv, out=io.StringIO(), err=err) == 2
    assert err.getvalue().splitlines() == [
        f"qlora-merge: error: {adapters}: holds adapters 'first', 'other' in sub-folders and none at the top: "
        "pick one with --adapter-name"
    ]
    assert main([*argv, "--adapter-name", "first"], out=io.StringIO(), err=io.StringIO()) == 0
    assert_same_tensors(
        read_tensors(tmp_path / "out"), peft_merge(base, adapters / "first", tmp_path / "peft", torch.bfloat16)
    )


def test_named_adapter_from_the_hub_cache(saved: tuple[Path, Path], hub_cache: Path, tmp_path: Path) -> None:  # noqa: F811
    base, adapters = saved
    files = {p.name: p for p in adapters.iterdir() if p.is_file()}
    files |= {f"other/{p.name}": p for p in (adapters / "other").iterdir()}
    add_to_cache(hub_cache, "org/two-loras", files, COMMIT, "main", symlinks=True)
    merge(base, "org/two-loras", tmp_path / "hub", adapter_name="other")
    merge(base, adapters, tmp_path / "local", adapter_name="other")
    assert_same_tensors(read_tensors(tmp_path / "hub"), read_tensors(tmp_path / "local"))
