"""An FP8 block-scaled base (quant_method "fp8", as DeepSeek-V3 and Qwen3-*-FP8 releases ship) as --base.

The checkpoints are made here as an FP8 release is: a tiny llama's Linear weights quantized per (bo x bi) block
(scale = block amax / 448, weight / scale cast to float8_e4m3fn, the scale saved as `X.weight_scale_inv`), the
embeddings, norms and lm_head left in full precision. Block sizes that tile the weights exactly, and [32, 32] on
weights of 112 rows or columns (partial blocks at the edges), and per-tensor scales.

Two oracles for the dequantized values: the documented definition (element (r, c) is float32(weight) times
scale_inv[r // bo, c // bi], rounded once; DeepSeek's `weight_dequant`), written here block by block; and
transformers' own loader with `FineGrainedFP8Config(dequantize=True)` on CPU, wherever the blocks tile the weight
(transformers derives the block size from the scale grid, which is wrong for partial blocks). Then the merge must
equal PEFT's merge_and_unload() on a full-precision copy of the dequantized base, bit for bit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import assert_same_tensors, make_adapter, make_base, peft_merge, read_config, read_tensors
from safetensors.torch import load_file, save_file

from qlora_merge import merge, verify
from qlora_merge.errors import CheckpointFormatError
from qlora_merge.inputs.format import TensorEntry
from qlora_merge.inputs.fp8 import Fp8Entry, Fp8Source
from qlora_merge.inputs.index import open_checkpoint
from qlora_merge.inputs.quantized import logical_index
from qlora_merge.inputs.reader import TensorReader
from qlora_merge.inputs.sources import source_for

transformers = pytest.importorskip("transformers")

FP8_MAX = 448.0
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}
# name -> (weight_block_size, the config's dtype, the weights in two shards with the scales in the second)
VARIANTS: dict[str, tuple[list[int] | None, torch.dtype, bool]] = {
    "128x128": ([128, 128], torch.bfloat16, False),
    "32x32-partial": ([32, 32], torch.float16, True),
    "16x16": ([16, 16], torch.bfloat16, False),
    "per-tensor": (None, torch.float32, False),
}
# the adapter leaves o_proj, gate_proj and up_proj alone: they must come out dequantized
ADAPTED = ["q_proj", "v_proj", "down_proj"]


def quantize(weight: torch.Tensor, block: list[int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` as an FP8 release stores it: float8_e4m3fn codes and float32 scale_inv (block amax / 448), per
    (bo x bi) block, edge blocks partial; one scalar scale with `block` None."""
    values = weight.float()
    if block is None:
        scale = values.abs().amax() / FP8_MAX
        return (values / scale).to(torch.float8_e4m3fn), scale.reshape(())
    rows, cols = values.shape
    bo, bi = block
    scale = torch.empty(-(-rows // bo), -(-cols // bi))
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = values[i * bo : (i + 1) * bo, j * bi : (j + 1) * bi]
            scale[i, j] = tile.abs().amax() / FP8_MAX
            codes[i * bo : (i + 1) * bo, j * bi : (j + 1) * bi] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
    return codes, scale


def documented(codes: torch.Tensor, scale: torch.Tensor, block: list[int] | None, dtype: torch.dtype) -> torch.Tensor:
    """The documented dequantization, block by block: float32 codes times their block's scale, rounded once."""
    values = codes.to(torch.float32)
    if block is None:
        return (values * scale).to(dtype)
    out = torch.empty_like(values)
    bo, bi = block
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * bo, (i + 1) * bo), slice(j * bi, (j + 1) * bi)
            out[rows, cols] = values[rows, cols] * scale[i, j]
    return out.to(dtype)


def is_fp8_linear(name: str) -> bool:
    return name.endswith(".weight") and any(f".{linear}." in name for linear in LINEARS)


@pytest.fixture(scope="module")
def full_precision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base("llama", tmp_path_factory.mktemp("fp8") / "base", max_shard_size=None)


@pytest.fixture(scope="module")
def adapter(full_precision: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fp8") / "adapter"
    return make_adapter(full_precision, directory, "llama", r=4, lora_alpha=8, target_modules=ADAPTED)


_made: dict[str, Path] = {}


@pytest.fixture(scope="module")
def made(full_precision: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The FP8 checkpoint of a variant, written once a module."""
    root = tmp_path_factory.mktemp("fp8-bases")

    def make(variant: str) -> Path:
        if variant not in _made:
            _made[variant] = write_fp8(full_precision, root / variant, *VARIANTS[variant])
        return _made[variant]

    return make


def write_fp8(full_precision: Path, out: Path, block: list[int] | None, dtype: torch.dtype, sharded: bool) -> Path:
    out.mkdir()
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, tensor in read_tensors(full_precision).items():
        if is_fp8_linear(name):
            weights[name], scales[f"{name}_scale_inv"] = quantize(tensor, block)
        else:
            weights[name] = tensor.to(dtype)
    if sharded:
        files = {"model-00001-of-00002.safetensors": weights, "model-00002-of-00002.safetensors": scales}
        for file_name, tensors in files.items():
            save_file(tensors, out / file_name, metadata={"format": "pt"})
        weight_map = {name: file_name for file_name, tensors in files.items() for name in tensors}
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file(weights | scales, out / "model.safetensors", metadata={"format": "pt"})
    config = read_config(full_precision)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": block,
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def dequantized(directory: Path, variant: str) -> dict[str, torch.Tensor]:
    """Every tensor of the FP8 checkpoint as the documented dequantization gives it, the scales gone."""
    block, dtype, _ = VARIANTS[variant]
    tensors = read_tensors(directory)
    out = {}
    for name, tensor in tensors.items():
        if tensor.dtype == torch.float8_e4m3fn:
            out[name] = documented(tensor, tensors[f"{name}_scale_inv"], block, dtype)
        elif not name.endswith("_scale_inv"):
            out[name] = tensor
    return out


def transformers_tiles(variant: str) -> bool:
    """Whether transformers' loader dequantizes this variant right: blocks that tile every weight exactly (or one
    block covering each weight whole)."""
    block = VARIANTS[variant][0]
    return block is None or block[0] >= 112 or all(d % b == 0 for d in (32, 64, 112) for b in block)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if transformers_tiles(v)])
def test_documented_dequantization_is_transformers(variant: str, made: Callable[[str], Path]) -> None:
    """The oracle checked against transformers' own loader (FineGrainedFP8Config(dequantize=True), CPU)."""
    base = made(variant)
    dtype = VARIANTS[variant][1]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        base, quantization_config=transformers.FineGrainedFP8Config(dequantize=True), dtype=dtype
    )
    theirs = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    assert_same_tensors(theirs, dequantized(base, variant))


def _decode(source: Any, entry: TensorEntry, start: int, stop: int, reader: TensorReader) -> torch.Tensor:
    """Elements [start, stop) as the merge gets them: the source's reads, read in order, then decoded."""
    data = []
    for byte_range in source.reads(entry, start, stop):
        raw = torch.empty(byte_range.nbytes, dtype=torch.uint8)
        reader.read_bytes_into(byte_range.path, byte_range.offset, raw)
        data.append(raw)
    return source.decode(entry, start, stop, data)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_equals_the_documented_dequantization(variant: str, made: Callable[[str], Path]) -> None:
    """Every tensor, whole and in runs that start and stop inside a block or a row."""
    base = made(variant)
    index = logical_index(open_checkpoint(base), read_config(base))
    assert index.quantization == "fp8"
    source = source_for(index)
    assert isinstance(source, Fp8Source)
    expected = dequantized(base, variant)
    assert sorted(index.tensors) == sorted(expected)
    fp8_entries = [e for e in index.tensors.values() if isinstance(e, Fp8Entry)]
    assert len(fp8_entries) == 7 * 2
    with TensorReader() as reader:
        for entry in index.tensors.values():
            want = expected[entry.name]
            assert (entry.torch_dtype, entry.shape) == (want.dtype, tuple(want.shape)), entry.name
            assert torch.equal(source.read(entry, reader), want), entry.name
        for entry in fp8_entries:
            assert source.raw(entry) is None
            flat = expected[entry.name].reshape(-1)
            numel = math.prod(entry.shape)
            for start, stop in ((0, numel), (1, 2), (31, 33), (63, 129), (100, 2000), (numel - 77, numel - 1)):
                assert torch.equal(_decode(source, entry, start, stop, reader), flat[start:stop]), (entry.name, start)
            buffer = torch.empty(100 * flat.element_size(), dtype=torch.uint8)
            assert torch.equal(source.read_elements(entry, 31, 131, reader, buffer), flat[31:131])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bit_identical_to_peft_on_the_dequantized_base(
    variant: str, made: Callable[[str], Path], full_precision: Path, adapter: Path, tmp_path: Path
) -> None:
    base = made(variant)
    dtype = VARIANTS[variant][1]
    copy = tmp_path / "dequantized"
    copy.mkdir()
    expected_base = dequantized(base, variant)
    save_file(expected_base, copy / "model.safetensors", metadata={"format": "pt"})
    config = read_config(base)
    del config["quantization_config"]
    (copy / "config.json").write_text(json.dumps(config))
    reference = peft_merge(copy, adapter, tmp_path / "peft", dtype)

    result = merge(base, adapter, tmp_path / "ours", dtype=DTYPE_NAMES[dtype])

    ours = read_tensors(tmp_path / "ours")
    assert_same_tensors(ours, reference)
    assert result.tensors_merged == len(ADAPTED) * 2
    # the weights no adapter touched come out dequantized, as the oracle gives them
    for name in (n for n in ours if is_fp8_linear(n) and not any(a in n for a in ADAPTED)):
        assert torch.equal(ours[name], expected_base[name].to(dtype)), name
    config = read_config(tmp_path / "ours")
    assert "quantization_config" not in config
    assert config["dtype"] == str(dtype).removeprefix("torch.")
    assert verify(base, adapter, tmp_path / "ours").ok
    block = VARIANTS[variant][0]
    summary = f"FP8 e4m3, {block[0]}x{block[1]} block scales" if block else "FP8 e4m3, per-tensor scales"
    assert f"| base quantization | {summary}" in (tmp_path / "ours" / "README.md").read_text()


def _in_memory(codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> tuple[Fp8Entry, dict]:
    """An Fp8Entry over bytes held in memory (one fake file each for the codes and the scales)."""
    files = {Path("codes"): codes.reshape(-1).view(torch.uint8), Path("scale"): scale.reshape(-1).view(torch.uint8)}
    scale_entry = TensorEntry("w_scale_inv", "F32", tuple(scale.shape), Path("scale"), 0, scale.numel() * 4)
    code_dtype = "F8_E4M3" if codes.dtype == torch.float8_e4m3fn else "F8_E5M2"
    entry = Fp8Entry("w", "BF16", tuple(codes.shape), Path("codes"), 0, codes.numel(), code_dtype, scale_entry, block)
    return entry, files


def test_fused_experts_and_e5m2_in_any_run() -> None:
    """A 3-D weight (one scale grid per expert, partial blocks both ways) and e5m2 codes, against the documented
    dequantization expert by expert, for runs that cross rows, blocks and experts."""
    torch.manual_seed(5)
    block = [5, 7]
    experts = [quantize(torch.randn(13, 20), block) for _ in range(3)]
    codes = torch.stack([c for c, _ in experts]).to(torch.float8_e5m2)
    scale = torch.stack([s for _, s in experts])
    want = torch.stack([documented(codes[e], scale[e], block, torch.bfloat16) for e in range(3)]).reshape(-1)
    entry, files = _in_memory(codes, scale, (5, 7))
    source = Fp8Source()
    numel = codes.numel()
    for start, stop in ((0, numel), (1, numel - 1), (250, 270), (259, 261), (19, 121), (numel - 1, numel)):
        data = [files[r.path][r.offset : r.offset + r.nbytes].clone() for r in source.reads(entry, start, stop)]
        assert torch.equal(source.decode(entry, start, stop, data), want[start:stop]), (start, stop)


def _rewrite(directory: Path, out: Path, change: Callable[[dict[str, torch.Tensor], dict[str, Any]], None]) -> Path:
    out.mkdir()
    tensors = load_file(directory / "model.safetensors")
    config = read_config(directory)
    change(tensors, config)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return out


DOWN = "model.layers.0.mlp.down_proj.weight"


def _set(key: str, value: Any) -> Callable[[dict[str, torch.Tensor], dict[str, Any]], None]:
    def change(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        if key == "weight_block_size":
            config["quantization_config"][key] = value
        elif value is None:
            del tensors[key]
        else:
            tensors[key] = value(tensors)

    return change


BROKEN = {
    "no scale": (_set(f"{DOWN}_scale_inv", None), f"FP8 weight '{DOWN}' has no '{DOWN}_scale_inv'"),
    "scale shape": (
        _set(f"{DOWN}_scale_inv", lambda t: torch.ones(4, 4)),
        rf"'{DOWN}_scale_inv' is F32\[4, 4\]; the FP8 weight '{DOWN}' \[64, 112\] in 32x32 blocks needs F32\[2, 4\]",
    ),
    "scale dtype": (
        _set(f"{DOWN}_scale_inv", lambda t: t[f"{DOWN}_scale_inv"].to(torch.bfloat16)),
        f"'{DOWN}_scale_inv' is BF16; FP8 scales are read as F32 only",
    ),
    "block size one int": (_set("weight_block_size", [32]), r"weight_block_size is \[32\]; expected two positive"),
    "block size zero": (_set("weight_block_size", [0, 32]), r"weight_block_size is \[0, 32\]"),
    "block size text": (_set("weight_block_size", "32x32"), "weight_block_size is '32x32'"),
    "block size bools": (_set("weight_block_size", [True, True]), r"weight_block_size is \[True, True\]"),
    "unquantized weight's scale": (
        _set("lm_head.weight_scale_inv", lambda t: torch.ones(5, 2)),
        r"'lm_head.weight_scale_inv' is an FP8 scale of no FP8 weight \('lm_head.weight' is F16, not FP8\)",
    ),
    "F8 weight without scale": (
        _set("lm_head.weight", lambda t: t["lm_head.weight"].to(torch.float8_e4m3fn)),
        "FP8 weight 'lm_head.weight' has no 'lm_head.weight_scale_inv'",
    ),
}


@pytest.fixture(scope="module")
def unsharded_32(full_precision: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The [32, 32] variant in one file, for the broken copies."""
    return write_fp8(full_precision, tmp_path_factory.mktemp("fp8") / "32x32", [32, 32], torch.float16, False)


@pytest.mark.parametrize("case", list(BROKEN))
def test_malformed_fp8_checkpoint_is_refused(case: str, unsharded_32: Path, adapter: Path, tmp_path: Path) -> None:
    """One line naming the file and the tensor; nothing written."""
    change, message = BROKEN[case]
    broken = _rewrite(unsharded_32, tmp_path / "broken", change)
    with pytest.raises(CheckpointFormatError, match=message) as caught:
        merge(broken, adapter, tmp_path / "out", dtype="f16")
    text = str(caught.value)
    assert "\n" not in text
    assert str(broken) in text
    assert not (tmp_path / "out").exists()


def test_static_activation_scales_are_dropped(unsharded_32: Path, adapter: Path, tmp_path: Path) -> None:
    """`activation_scheme: "static"` adds `X.activation_scale` beside each FP8 weight: only FP8 matmuls use it, so
    the merge leaves it out; one beside a full-precision weight is refused."""

    def static(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        config["quantization_config"]["activation_scheme"] = "static"
        for name in [n for n in tensors if tensors[n].dtype == torch.float8_e4m3fn]:
            tensors[f"{name.removesuffix('.weight')}.activation_scale"] = torch.tensor(0.5)

    base = _rewrite(unsharded_32, tmp_path / "static", static)
    index = logical_index(open_checkpoint(base), read_config(base))
    assert not any(name.endswith(("activation_scale", "_scale_inv")) for name in index.tensors)
    merge(base, adapter, tmp_path / "ours", dtype="f16")
    assert not any("scale" in name for name in read_tensors(tmp_path / "ours"))

    def stray(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        tensors["lm_head.activation_scale"] = torch.tensor(0.5)

    broken = _rewrite(unsharded_32, tmp_path / "stray", stray)
    with pytest.raises(CheckpointFormatError, match=r"'lm_head.activation_scale' is an FP8 scale of no FP8 weight"):
        merge(broken, adapter, tmp_path / "out", dtype="f16")
    assert not (tmp_path / "out").exists()


# compressed-tensors "float-quantized" FP8 (llm-compressor's *-FP8, *-FP8-dynamic, *-FP8-block releases):
# name -> (weights strategy arguments, (block rows, block columns) of its scale grid or None, scale dtype, model dtype)
CT_VARIANTS: dict[str, tuple[dict[str, Any], tuple[int, int] | None, torch.dtype, torch.dtype]] = {
    "channel": ({"strategy": "channel"}, (1, 0), torch.bfloat16, torch.bfloat16),
    "block-partial": ({"strategy": "block", "block_structure": [32, 32]}, (32, 32), torch.bfloat16, torch.float16),
    "tensor": ({"strategy": "tensor"}, None, torch.float32, torch.float32),
    "group": ({"strategy": "group", "group_size": 16}, (1, 16), torch.float16, torch.bfloat16),
}


def ct_quantize(
    weight: torch.Tensor, block: tuple[int, int] | None, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` as llm-compressor stores it: float8_e4m3fn codes and a weight_scale in `scale_dtype` (block amax /
    448), [1] per tensor, [out, 1] per channel, the block grid otherwise."""
    if block is None:
        scale = (weight.float().abs().amax() / FP8_MAX).to(scale_dtype).reshape(1)
        return (weight.float() / scale.float()).to(torch.float8_e4m3fn), scale
    rows, cols = block[0], block[1] or weight.shape[1]
    codes, scale = quantize(weight, [rows, cols])
    scale = scale.to(scale_dtype)
    codes = (weight.float() / _expand(scale.float(), (rows, cols), weight.shape)).to(torch.float8_e4m3fn)
    return codes, scale


def _expand(scale: torch.Tensor, block: tuple[int, int], shape: torch.Size) -> torch.Tensor:
    rows, cols = shape
    return scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def ct_documented(codes: torch.Tensor, scale: torch.Tensor, variant: str) -> torch.Tensor:
    """compressed-tensors' `_dequantize`: codes.to(scale.dtype) * scale, in the scale's dtype; then the model's
    dtype, as transformers casts it."""
    _, block, _, dtype = CT_VARIANTS[variant]
    values = codes.to(scale.dtype)
    if block is None:
        return (values * scale).to(dtype)
    return (values * _expand(scale, (block[0], block[1] or codes.shape[1]), codes.shape)).to(dtype)


def write_ct(full_precision: Path, out: Path, variant: str) -> Path:
    strategy, block, scale_dtype, dtype = CT_VARIANTS[variant]
    out.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in read_tensors(full_precision).items():
        if is_fp8_linear(name):
            tensors[name], tensors[f"{name}_scale"] = ct_quantize(tensor, block, scale_dtype)
        else:
            tensors[name] = tensor.to(dtype)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "group_size": None}
    weights |= {"block_structure": None, "observer": "minmax", "actorder": None} | strategy
    activations = {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True, "dynamic": True}
    config = read_config(full_precision)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": activations}},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "sparsity_config": {},
        "global_compression_ratio": None,
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def ct_dequantized(directory: Path, variant: str) -> dict[str, torch.Tensor]:
    tensors = read_tensors(directory)
    out = {}
    for name, tensor in tensors.items():
        if tensor.dtype == torch.float8_e4m3fn:
            out[name] = ct_documented(tensor, tensors[f"{name}_scale"], variant)
        elif not name.endswith("_scale"):
            out[name] = tensor
    return out


@pytest.mark.parametrize("variant", list(CT_VARIANTS))
def test_compressed_tensors_fp8_base(variant: str, full_precision: Path, adapter: Path, tmp_path: Path) -> None:
    """Every tensor decoded as compressed-tensors dequantizes it (whole and in runs), and the merge equal to PEFT's
    on the dequantized base, bit for bit."""
    base = write_ct(full_precision, tmp_path / "base", variant)
    dtype = CT_VARIANTS[variant][3]
    expected = ct_dequantized(base, variant)
    index = logical_index(open_checkpoint(base), read_config(base))
    source = source_for(index)
    assert sorted(index.tensors) == sorted(expected)
    fp8_entries = [e for e in index.tensors.values() if isinstance(e, Fp8Entry)]
    assert len(fp8_entries) == 7 * 2
    with TensorReader() as reader:
        for entry in index.tensors.values():
            assert torch.equal(source.read(entry, reader), expected[entry.name]), entry.name
        for entry in fp8_entries:
            flat = expected[entry.name].reshape(-1)
            for start, stop in ((1, 2), (31, 33), (63, 129), (100, 2000)):
                assert torch.equal(_decode(source, entry, start, stop, reader), flat[start:stop]), (entry.name, start)

    copy = tmp_path / "dequantized"
    copy.mkdir()
    save_file(expected, copy / "model.safetensors", metadata={"format": "pt"})
    config = read_config(base)
    del config["quantization_config"]
    (copy / "config.json").write_text(json.dumps(config))
    reference = peft_merge(copy, adapter, tmp_path / "peft", dtype)
    merge(base, adapter, tmp_path / "ours", dtype=DTYPE_NAMES[dtype])
    assert_same_tensors(read_tensors(tmp_path / "ours"), reference)
    assert "quantization_config" not in read_config(tmp_path / "ours")
    assert verify(base, adapter, tmp_path / "ours").ok
    card = (tmp_path / "ours" / "README.md").read_text()
    assert "| base quantization | compressed-tensors float-quantized FP8" in card


@pytest.mark.parametrize("variant", list(CT_VARIANTS))
def test_compressed_tensors_own_dequantize_agrees(variant: str) -> None:
    """The oracle above against compressed-tensors' own `dequantize`, where the library is installed."""
    ct = pytest.importorskip("compressed_tensors.quantization.lifecycle.forward")
    from compressed_tensors.quantization import QuantizationArgs

    strategy, block, scale_dtype, dtype = CT_VARIANTS[variant]
    torch.manual_seed(6)
    weight = torch.randn(112, 80, dtype=dtype)
    codes, scale = ct_quantize(weight, block, scale_dtype)
    args = QuantizationArgs(num_bits=8, type="float", symmetric=True, **strategy)
    theirs = ct.dequantize(codes, scale, args=args).to(dtype)
    assert torch.equal(theirs, ct_documented(codes, scale, variant))


@pytest.fixture(scope="module")
def ct_channel(full_precision: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ct(full_precision, tmp_path_factory.mktemp("ct") / "channel", "channel")


def _groups(key: str, value: Any) -> Callable[[dict[str, torch.Tensor], dict[str, Any]], None]:
    def change(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        config["quantization_config"]["config_groups"]["group_0"]["weights"][key] = value

    return change


def _quantization(key: str, value: Any) -> Callable[[dict[str, torch.Tensor], dict[str, Any]], None]:
    def change(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        config["quantization_config"][key] = value

    return change


CT_BROKEN = {
    "no scale": (_set(f"{DOWN}_scale", None), f"FP8 weight '{DOWN}' has no '{DOWN}_scale'"),
    "scale shape": (
        _set(f"{DOWN}_scale", lambda t: torch.ones(64, 2, dtype=torch.bfloat16)),
        rf"'{DOWN}_scale' is BF16\[64, 2\]; the FP8 weight '{DOWN}' \[64, 112\] needs \[64, 1\]",
    ),
    "scale dtype": (
        _set(f"{DOWN}_scale", lambda t: torch.ones(64, 1, dtype=torch.int32)),
        f"'{DOWN}_scale' is I32; FP8 scales are F32, BF16 or F16",
    ),
    "zero point": (
        _set(f"{DOWN}_zero_point", lambda t: torch.zeros(64, 1, dtype=torch.bfloat16)),
        f"'{DOWN}_zero_point': asymmetric FP8 weights are not read",
    ),
    "stray scale": (
        _set("lm_head.weight_scale", lambda t: torch.ones(160, 1)),
        r"'lm_head.weight_scale' is a compressed-tensors scale of no FP8 weight \('lm_head.weight' is BF16",
    ),
    "pack-quantized": (_quantization("format", "pack-quantized"), "format 'pack-quantized' is not read"),
    "kv cache": (_quantization("kv_cache_scheme", {"num_bits": 8}), "kv_cache_scheme is not read"),
    "int weights": (_groups("type", "int"), "weights of type 'int' with 8 bits are not read"),
    "asymmetric": (_groups("symmetric", False), "asymmetric weights"),
    "strategy": (_groups("strategy", "tensor_group"), "weight strategy 'tensor_group' is not read"),
    "block structure": (_groups("block_structure", [0, 128]), r"block_structure \[0, 128\] is not two positive"),
    "group size": (_groups("group_size", -1), "group_size -1 is not a positive integer"),
}


@pytest.mark.parametrize("case", list(CT_BROKEN))
def test_malformed_compressed_tensors_checkpoint_is_refused(
    case: str, ct_channel: Path, adapter: Path, tmp_path: Path
) -> None:
    """One line naming the file and the tensor (or config.json); nothing written."""
    change, message = CT_BROKEN[case]
    if case == "block structure":
        base = _rewrite(ct_channel, tmp_path / "block", _groups("strategy", "block"))
    elif case == "group size":
        base = _rewrite(ct_channel, tmp_path / "group", _groups("strategy", "group"))
    else:
        base = ct_channel
    broken = _rewrite(base, tmp_path / "broken", change)
    with pytest.raises(CheckpointFormatError, match=message) as caught:
        merge(broken, adapter, tmp_path / "out", dtype="bf16")
    text = str(caught.value)
    assert "\n" not in text
    assert str(broken) in text
    assert not (tmp_path / "out").exists()


def test_compressed_tensors_input_scales_are_dropped(ct_channel: Path, adapter: Path, tmp_path: Path) -> None:
    """Static activations add `X.input_scale` beside each FP8 weight: the merge leaves it out."""

    def static(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        for name in [n for n in tensors if tensors[n].dtype == torch.float8_e4m3fn]:
            tensors[f"{name.removesuffix('.weight')}.input_scale"] = torch.ones(1, dtype=torch.bfloat16)

    base = _rewrite(ct_channel, tmp_path / "static", static)
    merge(base, adapter, tmp_path / "ours", dtype="bf16")
    assert not any("scale" in name for name in read_tensors(tmp_path / "ours"))
