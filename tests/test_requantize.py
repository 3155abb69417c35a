"""`--requantize nf4|fp4`: the merge written as a bitsandbytes 4-bit checkpoint (double quantization, blocks of 64).

The oracle is transformers + bitsandbytes on CPU: our own 16-bit merge of the same inputs, loaded with
`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=..., bnb_4bit_use_double_quant=True,
bnb_4bit_compute_dtype=<the merge dtype>)` and saved. Our files must hold the same tensors, byte for byte (the
quant state's JSON, which we pad to a width fixed before the data, compared parsed), and config.json the same
`quantization_config`; transformers loads ours with no arguments and gives the oracle's logits; and our output read
back as a bitsandbytes base (inputs/bnb.py) gives bitsandbytes' round trip of the merged weights.

The tiny models' MLP rows (112) are not a multiple of 64, so blocks span rows and weights end in partial blocks
only where the element count says so; the sink test cuts the values at arbitrary bytes, values included.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import make_adapter, make_base, read_config, read_tensors

from qlora_merge import fourbit, merge, verify
from qlora_merge.errors import MergeError
from qlora_merge.inputs.bnb import logical_index
from qlora_merge.inputs.index import open_checkpoint
from qlora_merge.inputs.reader import TensorReader
from qlora_merge.inputs.sources import source_for
from qlora_merge.outputs.requantize import QuantizedLayout, RequantizeSink
from qlora_merge.plan.tasks import OutputTensor

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

TORCH_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
# (architecture, quant type, dtype, max_shard_size): llama's head is its own; qwen2's is tied to the embeddings
CASES = [
    ("llama", "nf4", "bf16", "40KB"),
    ("qwen2", "fp4", "bf16", "5GB"),
    ("qwen2", "nf4", "f16", "5GB"),
    ("llama", "fp4", "f32", "5GB"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """arch -> (base, adapter). qwen2's adapter leaves most Linear weights alone: those are copied from the base
    as raw bytes (the sink's copy_from), and quantized all the same."""
    root = tmp_path_factory.mktemp("requantize")
    out = {}
    for arch, targets in (("llama", None), ("qwen2", ["q_proj", "v_proj"])):
        base = make_base(arch, root / f"{arch}-base")
        options = {} if targets is None else {"target_modules": targets}
        out[arch] = (base, make_adapter(base, root / f"{arch}-adapter", arch, **options))
    return out


def oracle(merged_16bit: Path, quant_type: str, dtype: str, out: Path) -> Any:
    """transformers' 4-bit quantization of a 16-bit checkpoint, saved to `out`; returns the loaded model."""
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=TORCH_DTYPES[dtype],
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(merged_16bit, quantization_config=config)
    model.save_pretrained(out)
    return model


def assert_same_checkpoint(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same tensor names, dtypes, shapes and bytes; quant states compared as the JSON they hold."""
    assert sorted(ours) == sorted(expected)
    for name, want in expected.items():
        got = ours[name]
        if ".quant_state.bitsandbytes__" in name:
            assert json.loads(bytes(got.numpy())) == json.loads(bytes(want.numpy())), name
            continue
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name


def logits(model: Any) -> torch.Tensor:
    """Logits on a fixed prompt. bitsandbytes' AVX512-bf16 CPU path (repacking weights) needs rows a multiple of
    its block, which the tiny models' are not: it is turned off, on every machine alike."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 5, 9, 33, 70, 2, 101, 7]])).logits.float()


@pytest.mark.parametrize(("arch", "quant_type", "dtype", "shard"), CASES)
def test_equals_transformers_quantization(
    arch: str, quant_type: str, dtype: str, shard: str, models: dict[str, tuple[Path, Path]], tmp_path: Path
) -> None:
    base, adapter = models[arch]
    merge(base, adapter, tmp_path / "plain", dtype=dtype, max_shard_size="5GB")
    result = merge(base, adapter, tmp_path / "ours", dtype=dtype, requantize=quant_type, max_shard_size=shard)
    expected_model = oracle(tmp_path / "plain", quant_type, dtype, tmp_path / "oracle")

    if arch == "qwen2" and dtype == "bf16":  # the base's dtype: untouched weights come as raw bytes (copy_from)
        assert result.tensors_copied > 10
    ours, expected = read_tensors(tmp_path / "ours"), read_tensors(tmp_path / "oracle")
    assert_same_checkpoint(ours, expected)
    quantized = {name for name in ours if name + ".quant_state.bitsandbytes__" + quant_type in ours}
    assert len(quantized) == 7 * 2  # every Linear of the layers; not the head, nor (qwen2) the tied embeddings
    assert not any(name.startswith(("lm_head", "model.embed_tokens")) for name in quantized)
    config, expected_config = read_config(tmp_path / "ours"), read_config(tmp_path / "oracle")
    assert config["quantization_config"] == expected_config["quantization_config"]
    assert config["dtype"] == expected_config["dtype"]
    if shard == "40KB":
        assert len(result.shards) > 1 and (tmp_path / "ours" / "model.safetensors.index.json").is_file()
    assert result.bytes_written == sum(t.numel() * t.element_size() for t in ours.values())

    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")  # no arguments
    assert torch.equal(logits(loaded), logits(expected_model))


def test_reads_back_as_a_bitsandbytes_base(models: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """Our output as --base: every quantized weight reads back as bitsandbytes' round trip of the merged weight,
    every other tensor as merged; and it merges."""
    base, adapter = models["llama"]
    merge(base, adapter, tmp_path / "plain", dtype="bf16")
    merge(base, adapter, tmp_path / "ours", dtype="bf16", requantize="nf4")
    plain = read_tensors(tmp_path / "plain")
    config = read_config(tmp_path / "ours")
    index = logical_index(open_checkpoint(tmp_path / "ours"), config)
    source = source_for(index)
    assert sorted(index.tensors) == sorted(plain)
    with TensorReader() as reader:
        for name, entry in index.tensors.items():
            got = source.read(entry, reader)
            quantized = f"{name}.quant_state.bitsandbytes__nf4" in open_checkpoint(tmp_path / "ours").tensors
            want = fourbit.roundtrip(plain[name], "nf4") if quantized else plain[name]
            assert torch.equal(got, want), name
    merge(tmp_path / "ours", adapter, tmp_path / "again", dtype="bf16")
    assert "quantization_config" not in read_config(tmp_path / "again")
    # dequantize, merge, quantize again: the chain of PEFT's merge guide, from a 4-bit base to a 4-bit output
    merge(tmp_path / "ours", adapter, tmp_path / "again-4bit", dtype="bf16", requantize="nf4")
    assert read_config(tmp_path / "again-4bit")["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


class RecordingSink:
    """A sink that keeps every tensor's bytes, to look at what RequantizeSink hands on."""

    def __init__(self) -> None:
        self.tensors: dict[str, bytearray] = {}
        self.layout: list[OutputTensor] = []
        self.bytes_written = 0
        self._name = ""

    def start(self, tensors: list[OutputTensor]) -> None:
        self.layout = list(tensors)

    def begin(self, name: str) -> None:
        self._name = name
        self.tensors[name] = bytearray()

    def write(self, data: memoryview | bytes) -> None:
        self.tensors[self._name] += bytes(data)
        self.bytes_written += len(data)

    def copy_from(self, fd: int, offset: int, count: int, source: Path) -> None:
        self.write(os.pread(fd, count, offset))

    def end(self) -> None:
        pass

    def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass


@pytest.mark.parametrize("quant_type", fourbit.QUANT_TYPES)
def test_sink_streams_any_cut_of_the_bytes(quant_type: str, tmp_path: Path) -> None:
    """Values cut at arbitrary bytes (inside a value too), some copied from a file: the sink's tensors equal
    bitsandbytes' quantize_4bit of the whole weight, and the layout it announced holds their sizes."""
    generator = torch.Generator().manual_seed(3)
    weights = {
        "a.weight": torch.randn(70, 33, generator=generator).to(torch.bfloat16),  # odd count, a partial block
        "b.weight": (torch.randn(300, 256, generator=generator) * 1e-3).to(torch.float16),  # > 256 absmax
        "c.bias": torch.randn(33, generator=generator).to(torch.bfloat16),
    }
    names = {torch.bfloat16: "BF16", torch.float16: "F16"}
    plan = [OutputTensor(name, names[t.dtype], tuple(t.shape)) for name, t in weights.items()]
    inner = RecordingSink()
    sink = RequantizeSink(inner, frozenset({"a.weight", "b.weight"}), quant_type)
    sink.start(plan)
    cuts = random.Random(5)
    for name, tensor in weights.items():
        data = tensor.view(torch.uint8).numpy().tobytes()
        sink.begin(name)
        if name == "b.weight":  # the copy path: raw bytes of a file
            path = tmp_path / "b.bin"
            path.write_bytes(data)
            fd = os.open(path, os.O_RDONLY)
            try:
                sink.copy_from(fd, 0, 1000, path)
                sink.copy_from(fd, 1000, len(data) - 1000, path)
            finally:
                os.close(fd)
        else:
            position = 0
            while position < len(data):
                step = cuts.randint(1, 150)
                sink.write(data[position : position + step])
                position += step
        sink.end()
    sink.finish()

    assert [t.name for t in inner.layout] == list(inner.tensors)
    for tensor in inner.layout:
        assert len(inner.tensors[tensor.name]) == tensor.nbytes, tensor.name
    assert bytes(inner.tensors["c.bias"]) == weights["c.bias"].view(torch.uint8).numpy().tobytes()
    for name in ("a.weight", "b.weight"):
        packed, state = bnb.functional.quantize_4bit(
            weights[name], blocksize=64, compress_statistics=True, quant_type=quant_type
        )
        expected = {name: packed} | {f"{name}.{k}": v for k, v in state.as_dict(packed=True).items()}
        ours = {
            key: torch.frombuffer(bytearray(value), dtype=torch.uint8)
            for key, value in inner.tensors.items()
            if key.startswith(name)
        }
        assert sorted(ours) == sorted(expected)
        for key, want in expected.items():
            if "quant_state" in key:
                assert json.loads(bytes(ours[key].numpy())) == json.loads(bytes(want.numpy()))
            else:
                assert torch.equal(ours[key], want.contiguous().view(torch.uint8).reshape(-1)), key


def test_quant_state_width_holds_any_offset() -> None:
    """The quant state's width is fixed before the mean is known: the longest float32 means fit."""
    layout = QuantizedLayout(OutputTensor("w.weight", "BF16", (11008, 4096)), "nf4")
    for offset in (-1.1754943508222875e-38, -3.4028234663852886e38, -1.401298464324817e-45, float("nan"), 0.1):
        text = layout.state_json(offset)
        assert len(text) == layout.state_width
        assert json.loads(text)["nested_offset"] == offset or offset != offset


def test_verify_checks_a_requantized_output(models: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """verify() quantizes what it derives as the merge did and compares bytes: a requantized merge verifies, and
    one changed byte of packed codes, or another dtype's merge, does not."""
    base, adapter = models["llama"]
    merge(base, adapter, tmp_path / "ours", dtype="f16", requantize="nf4", max_shard_size="40KB")
    report = verify(base, adapter, tmp_path / "ours")
    assert report.ok, report
    assert report.tensors_checked == len(read_tensors(tmp_path / "ours"))

    name = "model.layers.1.mlp.down_proj.weight"
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    path = tmp_path / "ours" / index["weight_map"][name]
    data = bytearray(path.read_bytes())
    header_size = int.from_bytes(data[:8], "little")
    data[8 + header_size + json.loads(data[8 : 8 + header_size])[name]["data_offsets"][0] + 5] ^= 0x10
    path.write_bytes(bytes(data))
    report = verify(base, adapter, tmp_path / "ours")
    assert not report.ok and report.mismatched == (name,)

    merge(base, adapter, tmp_path / "other", dtype="bf16", requantize="fp4")
    config = read_config(tmp_path / "other")
    config["quantization_config"]["bnb_4bit_quant_type"] = "nf4"  # claims nf4, holds fp4 codes
    (tmp_path / "other" / "config.json").write_text(json.dumps(config))
    report = verify(base, adapter, tmp_path / "other")
    assert not report.ok and len(report.mismatched) >= 14
    config["quantization_config"]["bnb_4bit_use_double_quant"] = False
    (tmp_path / "other" / "config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match="not the one --requantize writes"):
        verify(base, adapter, tmp_path / "other")


def test_dry_run_plans_the_quantized_bytes(models: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    base, adapter = models["llama"]
    planned = merge(base, adapter, tmp_path / "planned", requantize="fp4", dry_run=True)
    written = merge(base, adapter, tmp_path / "ours", requantize="fp4")
    assert planned.bytes_written == written.bytes_written
    assert planned.shards == written.shards


def test_conv1d_models_are_refused(tmp_path: Path) -> None:
    """transformers quantizes a GPT-2 Conv1D weight transposed, which a stream of rows cannot give: refused while
    planning, nothing written."""
    base = make_base("gpt2", tmp_path / "base", max_shard_size=None)
    adapter = make_adapter(base, tmp_path / "adapter", "gpt2")
    with pytest.raises(MergeError, match="Conv1D"):
        merge(base, adapter, tmp_path / "out", requantize="nf4")
    assert not (tmp_path / "out").exists()
