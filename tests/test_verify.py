"""verify: a merged checkpoint is proven to be base + adapter, and every way it can fail to be one is reported."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from factories import make_adapter, make_base, peft_merge, read_tensors
from safetensors.torch import save_file

from qlora_merge import merge, verify
from qlora_merge.cli import main

Tensors = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("verify")
    base = make_base("llama", root / "base")
    adapter = make_adapter(base, root / "adapter", "llama")
    merge(base, adapter, root / "merged", max_shard_size="60KB")
    return base, adapter, root / "merged"


def rewritten(source: Path, directory: Path, change: Callable[[Tensors], Tensors]) -> Path:
    """A copy of the merged checkpoint with its tensors passed through `change`, saved as one file."""
    shutil.copytree(source, directory)
    tensors = change(read_tensors(directory))
    for path in directory.glob("model*.safetensors*"):
        path.unlink()
    (directory / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def test_our_merge_and_peft_merge_both_verify(merged: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, adapter, out = merged
    report = verify(base, adapter, out)
    assert report.ok and report.tensors_merged == 14 and report.tensors_checked == len(read_tensors(out))
    peft_merge(base, adapter, tmp_path / "peft", torch.bfloat16)
    assert verify(base, adapter, tmp_path / "peft").ok, "PEFT's own merge is byte-identical to what we derive"


def test_an_f16_gpt2_merge_verifies_in_its_own_dtype(tmp_path: Path) -> None:
    base = make_base("gpt2", tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", "gpt2")
    merge(base, adapter, tmp_path / "out", dtype="f16")
    assert verify(base, adapter, tmp_path / "out").ok


def test_a_changed_value_is_found(merged: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, adapter, out = merged
    name = "model.layers.1.mlp.down_proj.weight"

    def nudge(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors[name] = tensors[name].clone()
        tensors[name].view(torch.int16)[3, 5] ^= 1  # the last bit of one bf16 value
        return tensors

    report = verify(base, adapter, rewritten(out, tmp_path / "bad", nudge))
    assert not report.ok
    assert report.mismatched == (name,) and "values differ" in report.details[name]


def test_another_adapter_is_found(merged: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, _, out = merged
    other = make_adapter(base, tmp_path / "other", "llama", seed=5)
    report = verify(base, other, out)
    assert len(report.mismatched) == 14 and not report.missing and not report.unexpected


def test_missing_extra_retyped_and_lora_tensors_are_found(merged: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, adapter, out = merged
    gone, retyped = "model.layers.0.self_attn.k_proj.weight", "model.norm.weight"
    lora_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def damage(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        del tensors[gone]
        tensors[retyped] = tensors[retyped].float()
        return tensors | {lora_key: torch.zeros(4, 64), "stale.weight": torch.zeros(2)}

    report = verify(base, adapter, rewritten(out, tmp_path / "bad", damage))
    assert report.missing == (gone,)
    assert (
        report.mismatched == (retyped,) and "F32[64] in the merged file, BF16[64] expected" in report.details[retyped]
    )
    assert report.lora_keys == (lora_key,) and report.unexpected == ("stale.weight",)


def test_cli_exit_codes(merged: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, adapter, out = merged
    args = ["verify", "--base", str(base), "--adapter", str(adapter), "--merged"]
    stdout, stderr = io.StringIO(), io.StringIO()
    assert main([*args, str(out)], out=stdout, err=stderr) == 0
    assert "Verified: " in stdout.getvalue() and stderr.getvalue() == ""

    bad = rewritten(out, tmp_path / "bad", lambda t: {k: v for k, v in t.items() if "q_proj" not in k})
    stdout, stderr = io.StringIO(), io.StringIO()
    assert main([*args, str(bad)], out=stdout, err=stderr) == 3
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qlora-merge: verification failed: 2 missing: ")

    stdout, stderr = io.StringIO(), io.StringIO()
    assert main([*args, str(tmp_path / "nowhere")], out=stdout, err=stderr) == 2
    assert "merged model directory not found" in stderr.getvalue()


def test_merge_with_verify_flag(merged: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, adapter, _ = merged
    stdout = io.StringIO()
    argv = ["--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "out"), "--verify"]
    assert main(argv, out=stdout, err=io.StringIO()) == 0
    lines = stdout.getvalue().splitlines()
    count = len(read_tensors(base))
    assert lines[-2].endswith(
        f"Verified: {count} tensors byte-identical to base + adapter (14 merged), no LoRA keys left"
    )
    assert lines[-1].endswith(f"Done. Merged model: {tmp_path / 'out'}")


def test_verify_logits_on_the_command_line(merged: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """`verify --logits` adds the model-level check (verification.logits, tested there) after the tensor check: a
    merge that passes both exits 0; a model whose weights are another adapter's merge fails both (exit 3)."""
    base, adapter, out = merged
    stdout, err = io.StringIO(), io.StringIO()
    flags = ["verify", "--base", str(base), "--adapter", str(adapter), "--logits"]
    assert main([*flags, "--merged", str(out)], stdout, err) == 0, err.getvalue()
    assert "Verified:" in stdout.getvalue() and "Logits: max difference" in stdout.getvalue()
    other = make_adapter(base, tmp_path / "other", "llama", seed=7)
    merge(base, other, tmp_path / "wrong")
    stdout, err = io.StringIO(), io.StringIO()
    assert main([*flags, "--merged", str(tmp_path / "wrong"), "--json"], stdout, err) == 3
    assert '"tensors_ok": false' in stdout.getvalue() and '"ok": false' in stdout.getvalue()
    assert "logits check failed" in err.getvalue()
    with pytest.raises(SystemExit) as usage:  # a combination has no PEFT model to compare against
        main([*flags, "--merged", str(out), "--adapter", f"{other}:0.5"], io.StringIO(), io.StringIO())
    assert usage.value.code == 2
