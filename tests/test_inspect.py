"""inspect: an adapter described from its config and headers, and checked against a base before any merge."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from factories import MOE_PARAMETERS, make_adapter, make_base
from tiny_checkpoints import llama_checkpoint

from qlora_merge import inspect_adapter
from qlora_merge.cli import main
from qlora_merge.inputs.reader import TensorReader

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["inspect", *argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any read of tensor data fails the test: inspect reads headers only."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(TensorReader, "read", refuse)
    monkeypatch.setattr(TensorReader, "read_bytes_into", refuse)


def test_plain_adapter_is_described_from_headers(tmp_path: Path, no_tensor_reads: None) -> None:
    _, adapter = llama_checkpoint(tmp_path, layers=3, rank=4, hidden=32, intermediate=48)
    report = inspect_adapter(adapter)
    assert (report.r, report.lora_alpha, report.scaling) == (4, 8, 2.0)
    assert report.variants == () and report.module_scaling == {}
    assert sorted(report.module_kinds) == sorted(PROJECTIONS)
    assert report.layers == (0, 2) and report.lora_modules == 21
    # per layer: A is (4, in), B is (out, 4) for each projection
    shapes = [(32, 32), (8, 32), (8, 32), (32, 32), (48, 32), (48, 32), (32, 48)]
    assert report.parameters == 3 * sum(4 * (out + inp) for out, inp in shapes)
    assert report.base is None and report.base_matches is None


def test_a_matching_base_is_planned_without_writing(tmp_path: Path, no_tensor_reads: None) -> None:
    base, adapter = llama_checkpoint(tmp_path, layers=2)
    report = inspect_adapter(adapter, base)
    assert report.base_matches is True and report.mismatches == ()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"], "nothing written"


def test_a_base_of_the_wrong_width_is_a_shape_mismatch(tmp_path: Path) -> None:
    _, adapter = llama_checkpoint(tmp_path / "small", hidden=32)
    other, _ = llama_checkpoint(tmp_path / "wide", hidden=64)
    report = inspect_adapter(adapter, other)
    assert report.base_matches is False
    assert len(report.mismatches) == 1 and "is (64, " in report.mismatches[0]


def test_modules_the_base_lacks_are_each_listed(tmp_path: Path) -> None:
    _, adapter = llama_checkpoint(tmp_path / "deep", layers=3)
    shallow, _ = llama_checkpoint(tmp_path / "shallow", layers=2)
    report = inspect_adapter(adapter, shallow)
    assert report.base_matches is False
    assert len(report.mismatches) == 14, "layer 2's seven modules, A and B each"
    assert all("layers.2." in line and "matches no tensor" in line for line in report.mismatches)


def test_variants_and_per_module_scaling_of_a_real_peft_adapter(tmp_path: Path) -> None:
    base = make_base("llama", tmp_path / "base")
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        "llama",
        r=8,
        lora_alpha=16,
        use_rslora=True,
        use_dora=True,
        rank_pattern={"v_proj": 2},
        alpha_pattern={"v_proj": 4},
        modules_to_save=["lm_head"],
    )
    report = inspect_adapter(adapter, base)
    assert report.base_model_name_or_path == str(base)
    assert report.scaling == pytest.approx(16 / 8**0.5)
    assert set(report.variants) >= {"rsLoRA", "DoRA", "rank_pattern", "alpha_pattern", "modules_to_save"}
    assert report.module_scaling == {f"model.layers.{i}.self_attn.v_proj": pytest.approx(4 / 2**0.5) for i in (0, 1)}
    assert report.modules_to_save == ("lm_head.weight",)
    assert report.base_matches is True


def test_cli_prints_the_report_and_exits_2_on_a_base_that_does_not_fit(tmp_path: Path) -> None:
    base, adapter = llama_checkpoint(tmp_path / "a", layers=2)
    wide, _ = llama_checkpoint(tmp_path / "b", hidden=64)
    code, out, err = run(str(adapter), "--base", str(base))
    assert code == 0, err
    assert "r=4, alpha=8, scaling=2" in out and "layers 0-1" in out and "14 LoRA modules" in out
    assert "matches: every adapter tensor fits" in out

    code, out, err = run(str(adapter), "--base", str(wide))
    assert code == 2 and "does NOT match" in out
    assert err.startswith("qlora-merge: error: ") and err.count("\n") == 1

    code, out, err = run(str(adapter), "--json")
    assert code == 0 and json.loads(out)["lora_modules"] == 14

    code, out, err = run(str(tmp_path / "missing"))
    assert code == 2 and "not found" in err


def test_moe_expert_parameters(tmp_path: Path) -> None:
    base = make_base("qwen3_moe", tmp_path / "base")
    adapter = make_adapter(
        base,
        tmp_path / "adapter",
        "qwen3_moe",
        target_modules=["q_proj"],
        target_parameters=MOE_PARAMETERS,
        rank_pattern={"layers.1.mlp.experts.down_proj": 2},
    )
    alone = inspect_adapter(adapter)
    assert set(alone.module_kinds) == {"q_proj", "experts"} and "target_parameters" in alone.variants
    assert sorted(alone.target_parameters) == sorted(MOE_PARAMETERS), "PEFT saves them in set order"
    report = inspect_adapter(adapter, base)
    assert report.base_matches is True
    assert list(report.module_scaling.values()) == [8 / 2], "only layer 1's down_proj experts: r=2 from the pattern"
    assert "layers.1.mlp.experts" in next(iter(report.module_scaling))


def test_quant_error_is_the_round_trip_error_over_the_delta(tmp_path: Path) -> None:
    """--quant-error: per weight ||W - dequant(Q(W))|| / ||scaling * B @ A||, the round trip by bitsandbytes itself
    and the delta from the adapter file; per layer and overall, the norms pooled."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from safetensors.torch import load_file

    base, adapter = llama_checkpoint(tmp_path, layers=2, rank=4, hidden=64, intermediate=96)
    report = inspect_adapter(adapter, base, quant_error="nf4")
    assert report.quant_error is not None
    base_tensors = {}
    for shard in base.glob("*.safetensors"):
        base_tensors.update(load_file(shard))
    factors = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    measured = {w.name: w for w in report.quant_error.weights}
    assert len(measured) == 2 * 7
    for name, found in measured.items():
        weight = base_tensors[name]
        packed, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        code = bnb.functional.get_4bit_type("nf4", device="cpu")
        rounded = compute(packed.reshape(-1), absmax, code, 64, weight.shape, weight.dtype)
        module = name.removesuffix(".weight").removeprefix("model.")
        a = next(t for k, t in factors.items() if k.endswith(f"{module}.lora_A.weight")).float()
        b = next(t for k, t in factors.items() if k.endswith(f"{module}.lora_B.weight")).float()
        error = (weight.float() - rounded.float()).norm().item()
        delta = (scaling * (b @ a)).norm().item()
        assert found.error_norm == pytest.approx(error, rel=1e-6)
        assert found.delta_norm == pytest.approx(delta, rel=1e-5)
    layer0 = [w for w in measured.values() if w.layer == 0]
    pooled = sum(w.error_norm**2 for w in layer0) ** 0.5 / sum(w.delta_norm**2 for w in layer0) ** 0.5
    assert report.quant_error.by_layer()[0] == pytest.approx(pooled)
    code, out, _ = run(str(adapter), "--base", str(base), "--quant-error", "--json")
    data = json.loads(out)["quant_error"]
    assert (
        code == 0 and set(data["layers"]) == {"0", "1"} and data["overall"] == pytest.approx(report.quant_error.overall)
    )
    code, out, _ = run(str(adapter), "--base", str(base), "--quant-error", "fp4")
    assert code == 0 and "fp4 error: ||W - fp4(W)|| / ||delta W|| = " in out


def test_quant_error_needs_a_full_precision_base(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, adapter = llama_checkpoint(tmp_path, layers=1)
    with pytest.raises(SystemExit) as exited:
        run(str(adapter), "--quant-error")
    assert exited.value.code == 2 and "--quant-error needs --base" in capsys.readouterr().err
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    code, _, err = run(str(adapter), "--base", str(base), "--quant-error")
    assert code == 2 and err.count("\n") == 1 and "this base is already quantized" in err, err
