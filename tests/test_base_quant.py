"""--base-quant nf4|fp4: merge into dequant(Q(W)), the base a QLoRA adapter trained on, as `axolotl merge-lora`
round-trips it (every floating-point tensor of two or more dimensions; see inputs/roundtrip.py).

The oracle: every such tensor of the base replaced by bitsandbytes' own round trip as axolotl's
`_simulate_nf4_roundtrip` makes it (flattened, float32, `quantize_4bit(compress_statistics=True)` in blocks of
64, dequantized, back to the dtype; dequantized by bitsandbytes' reference kernel, see tests/test_bnb_base.py for
why not its CPU C kernel), then PEFT's merge_and_unload() on that base. Ours must equal it tensor for tensor, bit
for bit. The tiny llama's rows are not multiples of 64 (blocks span row ends), most tensors end in a partial block,
and the embeddings hold more than 256 blocks (two nested blocks of double quantization).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import assert_same_tensors, make_adapter, peft_merge, read_tensors
from safetensors.torch import load_file, save_file

from qlora_merge import merge, verify
from qlora_merge.api import plan_merge
from qlora_merge.cli import main
from qlora_merge.errors import CheckpointFormatError, MergeError
from qlora_merge.fourbit import code_values, roundtrip
from qlora_merge.inputs import roundtrip as roundtrip_module
from qlora_merge.inputs.format import read_safetensors_header
from qlora_merge.inputs.reader import TensorReader
from qlora_merge.inputs.roundtrip import RoundTripSource, round_tripped
from qlora_merge.inputs.sources import SafetensorsSource
from qlora_merge.merging import blocking, stream
from qlora_merge.progress import ProgressEvent

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}
# hidden 72 (head_dim 18), intermediate 100, vocab 300: q_proj is 81 whole blocks; k/v_proj (36 x 72),
# gate/up_proj (100 x 72) and down_proj (72 x 100, rows of 100) end in half a block; the embeddings and the
# untied lm_head (300 x 72) are 338 blocks, more than one nested block of 256
SHAPES = dict(hidden_size=72, intermediate_size=100, vocab_size=300, num_hidden_layers=2)


def make_llama(directory: Path, dtype: torch.dtype) -> Path:
    config = transformers.LlamaConfig(
        **SHAPES, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(directory, max_shard_size="150KB")  # several shards
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("base_quant")
    base = make_llama(root / "base", torch.bfloat16)
    return {"base": base, "base_f32": make_llama(root / "base_f32", torch.float32), "adapter": root / "adapter"}


@pytest.fixture(scope="module")
def adapter(models: dict[str, Path]) -> Path:
    return make_adapter(models["base"], models["adapter"], "llama", r=4, lora_alpha=8)


def bnb_roundtrip(tensor: torch.Tensor, quant_type: str) -> torch.Tensor:
    """axolotl's _simulate_nf4_roundtrip on CPU: bitsandbytes quantizes, its reference kernel dequantizes."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    flat = tensor.reshape(-1).to(torch.float32).contiguous()
    packed, state = bnb.functional.quantize_4bit(flat, blocksize=64, compress_statistics=True, quant_type=quant_type)
    absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    values = compute(packed.reshape(-1), absmax, code_values(quant_type), 64, flat.shape, torch.float32)
    return values.reshape(tensor.shape).to(tensor.dtype)


def round_tripped_base(base: Path, quant_type: str, out: Path, everything: bool = False) -> Path:
    """`base` with the weights a 4-bit load quantizes (the llama's projections: not the embeddings nor lm_head)
    replaced by bitsandbytes' round trip, or with `everything`, every tensor of two or more dimensions, as axolotl
    merge-lora does; the rest as is."""
    out.mkdir()
    for path in sorted(base.glob("*.safetensors")):
        tensors = load_file(path)

        def picked(name: str, tensor: torch.Tensor) -> bool:
            return tensor.dim() >= 2 and (everything or name.endswith("_proj.weight"))

        changed = {name: bnb_roundtrip(t, quant_type) if picked(name, t) else t for name, t in tensors.items()}
        save_file(changed, out / path.name, metadata={"format": "pt"})
    for path in base.glob("*.json"):
        (out / path.name).write_bytes(path.read_bytes())
    return out


def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Merge and convert in runs that start and stop inside 4-bit blocks and rows, and read pass 1 in chunks."""
    monkeypatch.setattr(blocking, "BLOCK_ELEMENTS", 20 * 64)
    monkeypatch.setattr(stream, "CONVERT_CHUNK_BYTES", 1000)
    monkeypatch.setattr(roundtrip_module, "STATS_CHUNK_ELEMENTS", 128)


CASES = [
    ("nf4", "base", torch.bfloat16, False),
    ("nf4", "base", torch.float32, True),
    ("fp4", "base_f32", torch.float32, False),
]


@pytest.mark.parametrize(
    ("quant_type", "base_name", "dtype", "everything"), CASES, ids=[f"{q}-{b}-{d}-{e}" for q, b, d, e in CASES]
)
def test_merge_equals_peft_on_the_round_tripped_base(
    quant_type: str,
    base_name: str,
    dtype: torch.dtype,
    everything: bool,
    models: dict[str, Path],
    adapter: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = models[base_name]
    rounded = round_tripped_base(base, quant_type, tmp_path / "rt", everything)
    reference = peft_merge(rounded, adapter, tmp_path / "peft", dtype)
    small_blocks(monkeypatch)
    result = merge(
        base, adapter, tmp_path / "ours", dtype=DTYPE_NAMES[dtype], base_quant=quant_type, base_quant_all=everything
    )
    ours = read_tensors(tmp_path / "ours")
    assert_same_tensors(ours, reference)
    assert result.tensors_merged == 7 * 2

    # the round trip happened (the merge into W differs), and only where it is made: norms are untouched, and
    # embeddings and head only with `everything`
    plain = peft_merge(base, adapter, tmp_path / "plain", dtype)
    for name, tensor in plain.items():
        if tensor.dim() == 1 or not (everything or name.endswith("_proj.weight")):
            assert torch.equal(ours[name], tensor), name
        else:
            assert not torch.equal(ours[name], tensor), name
    card = (tmp_path / "ours" / "README.md").read_text()
    count = 16 if everything else 14
    assert f"| base weights | round-tripped through {quant_type} as QLoRA trained on it ({count} weights" in card
    assert verify(base, adapter, tmp_path / "ours", base_quant=quant_type, base_quant_all=everything).ok
    if everything:
        assert not verify(base, adapter, tmp_path / "ours", base_quant=quant_type).ok


def test_verify_needs_the_base_quant_and_the_cli_passes_it(
    models: dict[str, Path], adapter: Path, tmp_path: Path
) -> None:
    base, out = models["base"], tmp_path / "ours"
    flags = ["--base", str(base), "--adapter", str(adapter)]
    stdout, stderr = io.StringIO(), io.StringIO()
    code = main([*flags, "--output", str(out), "--base-quant", "nf4", "--verify"], out=stdout, err=stderr)
    assert code == 0, stderr.getvalue()
    assert "round-tripped through nf4 as QLoRA trained on it (14 weights" in stdout.getvalue()
    assert verify(base, adapter, out, base_quant="nf4").ok
    assert not verify(base, adapter, out).ok  # against W, the merge into dequant(Q(W)) differs
    assert not verify(base, adapter, out, base_quant="fp4").ok


def test_dry_run_and_plan_say_which_base(models: dict[str, Path], adapter: Path, tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    result = merge(models["base"], adapter, tmp_path / "dry", base_quant="fp4", dry_run=True, progress=events.append)
    assert result.dry_run and not (tmp_path / "dry").exists()
    base_done = next(e for e in events if e.stage == "base" and e.status == "done")
    assert "round-tripped through fp4 as QLoRA trained on it (14 weights" in base_done.detail
    inputs = plan_merge(models["base"], adapter, base_quant="nf4")
    assert isinstance(inputs.source, RoundTripSource) and inputs.base_roundtrip.startswith("round-tripped through nf4")
    for off in (None, "none"):
        plain = plan_merge(models["base"], adapter, base_quant=off)
        assert isinstance(plain.source, SafetensorsSource) and plain.base_roundtrip == ""


@pytest.fixture(scope="module")
def bnb_base(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        models["base"], quantization_config=config, device_map="cpu", dtype=torch.bfloat16
    )
    directory = tmp_path_factory.mktemp("bnb") / "base-bnb-4bit"
    model.save_pretrained(directory)
    return directory


def test_base_quant_on_a_quantized_base_is_refused(bnb_base: Path, adapter: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointFormatError) as error:
        merge(bnb_base, adapter, tmp_path / "out", base_quant="nf4")
    message = str(error.value)
    assert message.startswith(f"{bnb_base / 'config.json'}: --base-quant nf4 round-trips a full-precision base")
    assert "bitsandbytes 4-bit nf4" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["--base", str(bnb_base), "--adapter", str(adapter), "--output", str(tmp_path / "cli")]
    assert main([*argv, "--base-quant", "fp4"], out=stdout, err=stderr) == 2
    assert stderr.getvalue().count("\n") == 1 and "--base-quant fp4 round-trips" in stderr.getvalue()
    assert not (tmp_path / "cli").exists()
    assert main([*argv, "--base-quant", "none", "--dry-run"], out=stdout, err=stderr) == 0, stderr.getvalue()


def test_base_quant_with_subtract_is_refused(models: dict[str, Path], adapter: Path, tmp_path: Path) -> None:
    with pytest.raises(MergeError, match="--base-quant nf4 with --subtract: the base of a subtraction is a merged"):
        merge(models["base"], adapter, tmp_path / "out", base_quant="nf4", subtract=True)
    assert not (tmp_path / "out").exists()


def _decode(source: RoundTripSource, entry: Any, start: int, stop: int, reader: TensorReader) -> torch.Tensor:
    """Elements [start, stop) as the merge gets them: the source's reads, read in order, then decoded."""
    data = []
    for byte_range in source.reads(entry, start, stop):
        raw = torch.empty(byte_range.nbytes, dtype=torch.uint8)
        reader.read_bytes_into(byte_range.path, byte_range.offset, raw)
        data.append(raw)
    return source.decode(entry, start, stop, data)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_source_runs_equal_the_whole_round_trip_with_one_tensor_of_stats(
    quant_type: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any run of elements (inside a block, across blocks, rows and nested blocks, up to a partial last block),
    whole reads and read_elements all give what the round trip of the whole tensor gives; pass 1 runs once per
    tensor read in order, and only the current tensor's statistics are held."""
    monkeypatch.setattr(roundtrip_module, "STATS_CHUNK_ELEMENTS", 192)
    generator = torch.Generator().manual_seed(3)
    tensors = {
        "a": torch.randn(300, 72, generator=generator).to(torch.bfloat16),  # 337.5 blocks, two nested blocks
        "b": (torch.randn(72, 100, generator=generator) * 0.02).to(torch.float16),  # rows of 100
        "c": torch.randn(5, 3, generator=generator),  # less than one block
        "d": torch.randn(2, 3, 4, 16, generator=generator),  # a 4-D weight, 6 whole blocks
        "norm": torch.randn(72, generator=generator),  # 1-D: as stored
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, path)
    entries = {entry.name: entry for entry in read_safetensors_header(path).tensors}
    source = RoundTripSource(SafetensorsSource(), quant_type)
    assert sorted(name for name in entries if round_tripped(entries[name])) == ["a", "b", "c", "d"]
    assert source.raw(entries["norm"]) is not None and source.raw(entries["a"]) is None
    passes = 0
    with TensorReader() as reader:
        for name, tensor in tensors.items():
            entry = entries[name]
            flat = tensor.reshape(-1)
            want = bnb_roundtrip(tensor, quant_type).reshape(-1) if tensor.dim() >= 2 else flat
            if tensor.dim() >= 2:
                assert torch.equal(roundtrip(tensor, quant_type).reshape(-1), want)
            numel = flat.numel()
            runs = [(0, numel), (1, 2), (63, 65), (3, 200), (numel - 77, numel - 1), (numel - 5, numel)]
            runs += [(s, min(numel, s + 1000)) for s in range(0, numel, 1000)]
            for start, stop in runs:
                start, stop = max(0, min(start, numel - 1)), max(1, min(stop, numel))
                got = _decode(source, entry, start, stop, reader)
                assert got.dtype == tensor.dtype and torch.equal(got, want[start:stop]), (name, start, stop)
                assert source.cached_tensors <= 1
            assert torch.equal(source.read(entry, reader).reshape(-1), want)
            start, stop = min(31, numel - 1), min(numel, 131)
            buffer = torch.empty((stop - start) * tensor.element_size(), dtype=torch.uint8)
            assert torch.equal(source.read_elements(entry, start, stop, reader, buffer), want[start:stop])
            passes += tensor.dim() >= 2
            assert source.stats_passes == passes, name  # once per tensor, however many runs
    assert source.cached_tensors == 1  # "d"'s, the last round-tripped tensor read


def test_a_merge_holds_one_tensor_of_stats_and_reads_each_tensor_once_for_them(
    models: dict[str, Path], adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pass 1 runs once per round-tripped tensor over a whole merge (the read-ahead announces every range up front,
    the statistics come lazily in the merge's order) and drops the last tensor's statistics before it collects the
    next one's."""
    small_blocks(monkeypatch)
    seen: list[tuple[str, int]] = []
    original = RoundTripSource._statistics

    def spy(self: RoundTripSource, entry: Any) -> Any:
        before = self.stats_passes
        stats = original(self, entry)
        if self.stats_passes != before:
            seen.append((entry.name, math.prod(entry.shape)))
        assert self.cached_tensors == 1
        return stats

    monkeypatch.setattr(RoundTripSource, "_statistics", spy)
    merge(models["base"], adapter, tmp_path / "ours", base_quant="nf4")
    names = [name for name, _ in seen]
    assert len(names) == len(set(names)) == 14, names  # the 14 projections (embeddings and lm_head stay as stored)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"] == 300
