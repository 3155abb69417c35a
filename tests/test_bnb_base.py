"""A bitsandbytes-quantized base (4-bit nf4/fp4, with and without double quantization; 8-bit LLM.int8) as --base.

The checkpoints are real: a tiny llama quantized and saved by transformers + bitsandbytes on CPU. The oracle is
bitsandbytes' own dequantization of every weight, then PEFT's merge_and_unload() on a float model holding those
values: our merge must equal it tensor for tensor, bit for bit.

For 4-bit weights the oracle is bitsandbytes' reference dequantization (`backends/default/ops.py`,
`_dequantize_4bit_compute`, which its comment says "matches C++ / CUDA behavior"), not its CPU C kernel: on AVX512
machines that kernel (bitsandbytes 0.50) gives wrong values when a row's length is not a multiple of the blocksize
(blocks spanning rows, e.g. a 64 x 112 weight in blocks of 64; errors up to 4x the quantization step). Where the CPU
kernel is right (rows a multiple of the blocksize) the public `dequantize_4bit` is checked against ours too.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import assert_same_tensors, make_adapter, make_base, peft_merge, read_config, read_tensors
from safetensors.torch import load_file, save_file

from qlora_merge import merge, verify
from qlora_merge.errors import CheckpointFormatError, MergeError, UnsupportedAdapter
from qlora_merge.inputs.bnb import Bnb4bitEntry, BnbSource, Int8Entry, Nested, logical_index
from qlora_merge.inputs.format import TensorEntry
from qlora_merge.inputs.index import open_checkpoint
from qlora_merge.inputs.reader import TensorReader
from qlora_merge.inputs.sources import source_for

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}
# name -> (BitsAndBytesConfig arguments, the dtype transformers loads and quantizes the model in)
VARIANTS: dict[str, tuple[dict[str, Any], torch.dtype]] = {
    "nf4-double": (
        {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
        torch.bfloat16,
    ),
    "nf4": ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, torch.float16),
    "fp4-double": (
        {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True},
        torch.float32,
    ),
    "fp4": ({"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, torch.bfloat16),
    "int8": ({"load_in_8bit": True}, torch.bfloat16),
}


@pytest.fixture(scope="module")
def full_precision(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base("llama", tmp_path_factory.mktemp("bnb") / "base", max_shard_size=None)


@pytest.fixture(scope="module")
def adapter(full_precision: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(full_precision, tmp_path_factory.mktemp("bnb") / "adapter", "llama", r=4, lora_alpha=8)


_quantized: dict[str, Path] = {}


def quantized(variant: str, full_precision: Path, root: Path) -> Path:
    """`full_precision` quantized by transformers + bitsandbytes on CPU and saved, as a *-bnb-4bit repo holds it."""
    if variant not in _quantized:
        arguments, dtype = VARIANTS[variant]
        config = transformers.BitsAndBytesConfig(**arguments, bnb_4bit_compute_dtype=dtype)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            full_precision, quantization_config=config, device_map="cpu", dtype=dtype
        )
        model.save_pretrained(root / variant)
        _quantized[variant] = root / variant
    return _quantized[variant]


def reference_4bit(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """bitsandbytes' dequantization of the 4-bit weight `name` (its reference kernel, uncompiled)."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    prefix = f"{name}."
    state = bnb.functional.QuantState.from_dict(
        {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}, device="cpu"
    )
    absmax = state.absmax
    if state.nested:  # as bitsandbytes.functional.dequantize_4bit does
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2)
        absmax += state.offset
    code = _get_4bit_code(state.quant_type, "cpu")
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return compute(tensors[name].reshape(-1), absmax, code, state.blocksize, state.shape, state.dtype)


def dequantized_tensors(directory: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of a bitsandbytes checkpoint as transformers' dequantize() gives it: quantized weights through
    bitsandbytes' dequantization, the rest as stored."""
    tensors = load_file(directory / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        module = name.removesuffix(".weight")
        if any(key.startswith(f"{name}.quant_state.") for key in tensors):
            out[name] = reference_4bit(tensors, name)
        elif name.endswith(".weight") and f"{module}.SCB" in tensors:
            out[name] = bnb.functional.int8_vectorwise_dequant(tensor, tensors[f"{module}.SCB"]).to(dtype)
        elif not name.endswith((".SCB", ".weight_format")) and ".weight." not in name:
            out[name] = tensor
    return out


def write_dequantized(directory: Path, full_precision: Path, dtype: torch.dtype, out: Path) -> Path:
    out.mkdir()
    save_file(dequantized_tensors(directory, dtype), out / "model.safetensors", metadata={"format": "pt"})
    config = read_config(full_precision)
    config["dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bit_identical_to_peft_on_the_dequantized_base(
    variant: str, full_precision: Path, adapter: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    base = quantized(variant, full_precision, tmp_path_factory.mktemp("quantized"))
    dtype = VARIANTS[variant][1]
    assert read_config(base)["quantization_config"]["quant_method"] == "bitsandbytes"
    reference = peft_merge(
        write_dequantized(base, full_precision, dtype, tmp_path / "deq"), adapter, tmp_path / "peft", dtype
    )

    result = merge(base, adapter, tmp_path / "ours", dtype=DTYPE_NAMES[dtype])

    ours = read_tensors(tmp_path / "ours")
    assert_same_tensors(ours, reference)
    assert result.tensors_merged == 7 * 2
    config = read_config(tmp_path / "ours")
    assert "quantization_config" not in config
    assert config["dtype"] == str(dtype).removeprefix("torch.")
    assert verify(base, adapter, tmp_path / "ours").ok
    summary = "bitsandbytes 8-bit (LLM.int8)" if variant == "int8" else f"bitsandbytes 4-bit {variant[:3]}"
    assert f"| base quantization | {summary}" in (tmp_path / "ours" / "README.md").read_text()


def _decode(source: Any, entry: Any, start: int, stop: int, reader: TensorReader) -> torch.Tensor:
    """Elements [start, stop) as the merge gets them: the source's reads, read in order, then decoded."""
    data = []
    for byte_range in source.reads(entry, start, stop):
        raw = torch.empty(byte_range.nbytes, dtype=torch.uint8)
        reader.read_bytes_into(byte_range.path, byte_range.offset, raw)
        data.append(raw)
    return source.decode(entry, start, stop, data)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_equals_bitsandbytes_for_any_run(
    variant: str, full_precision: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Runs of elements that start and stop inside a block (and inside a byte of two 4-bit codes) or a row."""
    base = quantized(variant, full_precision, tmp_path_factory.mktemp("quantized"))
    dtype = VARIANTS[variant][1]
    index = logical_index(open_checkpoint(base), read_config(base))
    source = source_for(index)
    expected = dequantized_tensors(base, dtype)
    assert sorted(index.tensors) == sorted(expected)
    quantized_entries = [e for e in index.tensors.values() if isinstance(e, Bnb4bitEntry | Int8Entry)]
    assert len(quantized_entries) == 7 * 2
    with TensorReader() as reader:
        for entry in quantized_entries:
            want = expected[entry.name]
            assert (entry.torch_dtype, entry.shape) == (want.dtype, tuple(want.shape))
            assert torch.equal(source.read(entry, reader), want)
            flat = want.reshape(-1)
            numel = math.prod(entry.shape)
            for start, stop in ((0, numel), (1, 2), (63, 65), (3, 200), (65, 129), (numel - 77, numel - 1)):
                assert torch.equal(_decode(source, entry, start, stop, reader), flat[start:stop]), (entry.name, start)
            buffer = torch.empty(100 * want.element_size(), dtype=torch.uint8)
            got = source.read_elements(entry, 31, 131, reader, buffer)
            assert torch.equal(got, flat[31:131])


def _in_memory_entry(packed: torch.Tensor, state: Any, dtype: str) -> tuple[Bnb4bitEntry, dict[Path, torch.Tensor]]:
    """A Bnb4bitEntry over bytes held in memory (one fake file each for the codes, absmax and nested absmax)."""
    files = {Path("codes"): packed.reshape(-1).view(torch.uint8)}
    absmax = state.absmax
    files[Path("absmax")] = absmax.reshape(-1).view(torch.uint8)
    absmax_entry = TensorEntry("absmax", "U8" if state.nested else "F32", tuple(absmax.shape), Path("absmax"), 0, 0)
    nested = None
    if state.nested:
        files[Path("nested")] = state.state2.absmax.view(torch.uint8)
        nested_entry = TensorEntry("nested", "F32", tuple(state.state2.absmax.shape), Path("nested"), 0, 0)
        nested = Nested(nested_entry, tuple(state.state2.code.tolist()), state.state2.blocksize, state.offset.item())
    numel = math.prod(state.shape)
    entry = Bnb4bitEntry(
        "w",
        dtype,
        tuple(state.shape),
        Path("codes"),
        0,
        (numel + 1) // 2,
        state.quant_type,
        state.blocksize,
        absmax_entry,
        nested,
    )
    return entry, files


def _decode_in_memory(entry: Bnb4bitEntry, files: dict[Path, torch.Tensor], start: int, stop: int) -> torch.Tensor:
    source = BnbSource()
    data = [files[r.path][r.offset : r.offset + r.nbytes].clone() for r in source.reads(entry, start, stop)]
    return source.decode(entry, start, stop, data)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double", [False, True])
def test_public_dequantize_4bit_agrees_where_its_cpu_kernel_is_right(quant_type: str, double: bool) -> None:
    """bitsandbytes.functional.dequantize_4bit itself, on a weight whose rows are whole blocks."""
    torch.manual_seed(3)
    weight = torch.randn(48, 128, dtype=torch.bfloat16)
    packed, state = bnb.functional.quantize_4bit(
        weight, blocksize=64, quant_type=quant_type, compress_statistics=double
    )
    want = bnb.functional.dequantize_4bit(packed, state).reshape(-1)
    entry, files = _in_memory_entry(packed, state, "BF16")
    assert torch.equal(_decode_in_memory(entry, files, 0, weight.numel()), want)
    assert torch.equal(_decode_in_memory(entry, files, 77, 3001), want[77:3001])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(("shape", "blocksize"), [((160, 600), 64), ((3, 201), 64), ((130, 300), 128)])
def test_runs_across_blocks_and_nested_blocks(quant_type: str, shape: tuple[int, int], blocksize: int) -> None:
    """Double quantization with several nested blocks (256 absmax each), an odd number of elements, runs that
    start and stop anywhere: against bitsandbytes' reference dequantization."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    torch.manual_seed(4)
    weight = torch.randn(*shape, dtype=torch.float16)
    packed, state = bnb.functional.quantize_4bit(
        weight, blocksize=blocksize, quant_type=quant_type, compress_statistics=True
    )
    absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    code = _get_4bit_code(quant_type, "cpu")
    want = compute(packed.reshape(-1), absmax, code, blocksize, state.shape, torch.float16).reshape(-1)
    entry, files = _in_memory_entry(packed, state, "F16")
    numel = weight.numel()
    runs = [(0, numel), (1, numel - 1), (blocksize * 255 - 3, blocksize * 257 + 5), (5, 6), (numel - 1, numel)]
    for start, stop in runs:
        start, stop = min(start, numel - 1), min(stop, numel)
        assert torch.equal(_decode_in_memory(entry, files, start, stop), want[start:stop]), (start, stop)


def _rewrite(directory: Path, out: Path, change: Any) -> Path:
    out.mkdir()
    for path in directory.iterdir():
        if path.name == "model.safetensors":
            tensors = load_file(path)
            change(tensors)
            save_file(tensors, out / path.name, metadata={"format": "pt"})
        elif path.is_file():
            (out / path.name).write_bytes(path.read_bytes())
    return out


@pytest.mark.parametrize(
    ("what", "message"),
    [("absmax", "has no 'model.layers.0.mlp.down_proj.weight.absmax'"), ("state", "quantization data of no")],
)
def test_broken_4bit_checkpoint_is_refused(
    what: str,
    message: str,
    full_precision: Path,
    adapter: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
) -> None:
    base = quantized("nf4-double", full_precision, tmp_path_factory.mktemp("quantized"))
    name = "model.layers.0.mlp.down_proj.weight"
    suffix = ".absmax" if what == "absmax" else ".quant_state.bitsandbytes__nf4"
    broken = _rewrite(base, tmp_path / "broken", lambda tensors: tensors.pop(name + suffix))
    with pytest.raises(MergeError, match=message) as caught:
        merge(broken, adapter, tmp_path / "out", dtype="bf16")
    assert isinstance(caught.value, CheckpointFormatError)
    assert not (tmp_path / "out").exists()


def test_unknown_quant_type_is_refused(
    full_precision: Path, adapter: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    base = quantized("nf4", full_precision, tmp_path_factory.mktemp("quantized"))
    name = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"

    def change(tensors: dict[str, torch.Tensor]) -> None:
        state = json.loads(tensors[name].numpy().tobytes())
        state["quant_type"] = "nf3"
        tensors[name] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)

    broken = _rewrite(base, tmp_path / "broken", change)
    with pytest.raises(CheckpointFormatError, match="unknown quant_type 'nf3'"):
        merge(broken, adapter, tmp_path / "out", dtype="bf16")


def test_without_its_quantization_config_a_4bit_weight_is_refused(
    full_precision: Path, adapter: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
) -> None:
    """The packed U8 codes are not read as a weight unless config.json says bitsandbytes."""
    base = quantized("nf4", full_precision, tmp_path_factory.mktemp("quantized"))
    broken = _rewrite(base, tmp_path / "broken", lambda tensors: None)
    config = read_config(broken)
    del config["quantization_config"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedAdapter, match="is stored as U8; merging into quantized weights is not supported"):
        merge(broken, adapter, tmp_path / "out", dtype="bf16")


def test_gptq_base_is_still_refused(full_precision: Path, adapter: Path, tmp_path: Path) -> None:
    """A GPTQ base is refused by name, from its config, before anything is planned; nothing written."""
    name = "model.layers.0.self_attn.q_proj"

    def to_gptq(tensors: dict[str, torch.Tensor]) -> None:
        del tensors[f"{name}.weight"]
        tensors[f"{name}.qweight"] = torch.zeros(8, 64, dtype=torch.int32)

    base = _rewrite(full_precision, tmp_path / "gptq", to_gptq)
    config = read_config(base)
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointFormatError, match=r"config.json: the base is GPTQ, which qlora-merge does not read"):
        merge(base, adapter, tmp_path / "out", dtype="bf16")
    assert not (tmp_path / "out").exists()
