"""NaN and infinities in merged or converted tensors, and float16 overflow: an error naming the tensor and the count,
or with --allow-nonfinite a warning and the values written as they are."""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoints import PEFT_PREFIX, llama_checkpoint

from qlora_merge import NonFiniteValues, merge
from qlora_merge.cli import main
from qlora_merge.merging.checks import count_nonfinite

Q_PROJ = "model.layers.0.self_attn.q_proj"
HIDDEN = 32
TOKEN_DELTA = "model.embed_tokens.token_adapter.trainable_tokens_delta"


def edit(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def nan_in_lora_b(tensors: dict[str, torch.Tensor]) -> None:
    tensors[f"{PEFT_PREFIX}{Q_PROJ}.lora_B.weight"][0, 0] = math.nan  # row 0 of the delta: HIDDEN NaN


def inf_in_lora_a(tensors: dict[str, torch.Tensor]) -> None:
    tensors[f"{PEFT_PREFIX}{Q_PROJ}.lora_A.weight"][0, 3] = math.inf  # column 3 of the delta: HIDDEN +-inf


def big_base_weight(tensors: dict[str, torch.Tensor]) -> None:
    tensors[f"{Q_PROJ}.weight"][1, 1] = 70000.0  # fits bfloat16, not float16


def big_norm(tensors: dict[str, torch.Tensor]) -> None:
    tensors["model.norm.weight"][:3] = -1e5  # not adapted: only converted to float16


CASES = [
    # (name, adapter edit, base edit, dtype, tensor named, what the message says)
    ("nan", nan_in_lora_b, None, "bf16", f"{Q_PROJ}.weight", f"{HIDDEN} NaN of {HIDDEN * HIDDEN} values"),
    ("inf", inf_in_lora_a, None, "bf16", f"{Q_PROJ}.weight", f"{HIDDEN} infinite of"),
    ("f16-overflow-merged", None, big_base_weight, "f16", f"{Q_PROJ}.weight", "1 beyond float16's range"),
    ("f16-overflow-converted", None, big_norm, "f16", "model.norm.weight", "3 beyond float16's range"),
]


@pytest.fixture()
def inputs(tmp_path: Path) -> tuple[Path, Path]:
    return llama_checkpoint(tmp_path / "in")


@pytest.mark.parametrize(
    ("adapter_edit", "base_edit", "dtype", "tensor", "what"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_nonfinite_values_fail_by_default_and_pass_when_allowed(
    inputs: tuple[Path, Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    adapter_edit: Callable | None,
    base_edit: Callable | None,
    dtype: str,
    tensor: str,
    what: str,
) -> None:
    base, adapter = inputs
    if adapter_edit:
        edit(adapter / "adapter_model.safetensors", adapter_edit)
    if base_edit:
        edit(base / "model.safetensors", base_edit)
    output = tmp_path / "out"

    with pytest.raises(NonFiniteValues) as raised:
        merge(base, adapter, output, dtype=dtype)
    message = str(raised.value)
    assert f"'{tensor}'" in message and what in message and "--allow-nonfinite" in message, message
    assert str(base / "model.safetensors") in message, "the file the tensor comes from is named"
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in"]

    err = io.StringIO()
    argv = ["--base", str(base), "--adapter", str(adapter), "--output", str(output), "--dtype", dtype]
    assert main(argv, out=io.StringIO(), err=err) == 2
    assert err.getvalue().splitlines() == [f"qlora-merge: error: {message}"]

    with caplog.at_level(logging.WARNING):
        result = merge(base, adapter, output, dtype=dtype, allow_nonfinite=True)
    assert len(result.nonfinite) == 1 and f"'{tensor}'" in result.nonfinite[0] and what in result.nonfinite[0]
    assert any(f"'{tensor}'" in r.getMessage() and "--allow-nonfinite" in r.getMessage() for r in caplog.records)
    written = load_file(output / "model.safetensors")[tensor]
    assert int((~torch.isfinite(written)).sum()) == int(what.split()[0])


def test_bf16_holds_what_f16_cannot(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    """The near miss of the overflow cases: the same values written as bfloat16 are finite, so no error."""
    base, adapter = inputs
    edit(base / "model.safetensors", lambda t: (big_base_weight(t), big_norm(t)))
    result = merge(base, adapter, tmp_path / "out", dtype="bf16")
    assert result.nonfinite == ()
    assert torch.isfinite(load_file(tmp_path / "out" / "model.safetensors")[f"{Q_PROJ}.weight"]).all()


def test_count_nonfinite() -> None:
    out = torch.tensor([1.0, math.nan, math.inf, -math.inf, math.inf, 2.0], dtype=torch.float16)
    wide = torch.tensor([1.0, math.nan, math.inf, -7e4, 1e5, 2.0])
    assert count_nonfinite(out, wide) == (1, 1, 2)
    assert count_nonfinite(out) == (1, 3, 0)
    assert count_nonfinite(torch.ones(4, dtype=torch.bfloat16)) == (0, 0, 0)
    # Finite values whose sum overflows take the exact path and are still found finite.
    huge = torch.full((4,), 3e38, dtype=torch.bfloat16)
    assert count_nonfinite(huge) == (0, 0, 0)
    assert count_nonfinite(torch.full((100,), 1000.0, dtype=torch.float16)) == (0, 0, 0)  # sums to 1e5 in float16
    assert count_nonfinite(torch.tensor([1, 2], dtype=torch.int64)) == (0, 0, 0)


def test_nan_in_trainable_token_rows(inputs: tuple[Path, Path], tmp_path: Path) -> None:
    """Trainable tokens put the adapter's rows into the embedding: a NaN there is caught like a merged one."""
    base, adapter = inputs
    delta = torch.zeros(2, HIDDEN)
    delta[1, :5] = math.nan
    edit(adapter / "adapter_model.safetensors", lambda t: t.update({f"{PEFT_PREFIX}{TOKEN_DELTA}": delta}))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"trainable_token_indices": [3, 7]}))
    with pytest.raises(NonFiniteValues, match=r"'model.embed_tokens.weight' \(BF16\): 5 NaN of 2048 values"):
        merge(base, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
