"""GGUF out (qlora_merge.gguf), checked by llama.cpp itself.

A tiny llama with a SentencePiece tokenizer (trained here, reproducibly) gets a real PEFT adapter, is merged by
`qlora_merge.merge` in float32, and converted by llama.cpp's converter (and its quantizer, for K-quants). Each GGUF
is loaded by llama.cpp (llama-cpp-python) and its logits for a few tokens are compared with transformers' logits of
the merged Hugging Face model. The tests that need llama.cpp's runtime skip, saying so, only when llama_cpp is not
importable; the converter is taken from QLORA_MERGE_LLAMA_CPP or the cache `qlora-merge setup-gguf` fills, else
unpacked from llama-cpp-python's sdist (pip download) into a temporary directory.

Tolerances, relative to the largest |logit| of the transformers model (about 1.1 here):
- f32: 1e-4 (measured ~1.3e-6): the same float32 weights; only the order of float32 sums differs. llama.cpp's
  KV cache is float16 by default, so the comparison asks it for a float32 cache.
- f16: 1e-2 (measured ~2.5e-3): weights rounded to float16 (unit roundoff 2^-11 = 4.9e-4), and llama.cpp's CPU
  matmul rounds the activations to float16 too; some 15 matmuls in series on a random model whose logits are
  small sums with much cancellation.
- bf16: 8e-2 (measured ~1.4e-2): the same with bfloat16's 8-bit mantissa (unit roundoff 2^-8, 8x float16's).
- q8_0: 0.15 (measured ~0.06), and a root-mean-square error under 0.08 of the logits' (measured ~0.034): each block
  of 32 weights shares one scale (max/127), so a weight may be off by 1/254 of its block's largest, and llama.cpp
  quantizes the activations to q8_0 as well for every dot product.
- q4_k_m and other K-quants: llama.cpp loads them and reports their file type; their logits are only finite (4-bit
  weights move a random model's logits by tens of percent: measured ~0.47 of the scale).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import random
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import make_adapter
from safetensors.torch import load_file, save_file

from qlora_merge import merge
from qlora_merge.errors import InputNotFound, MergeError, MissingDependency, NonFiniteValues, OutputError
from qlora_merge.gguf import (
    ConversionError,
    Converter,
    GGUFTypeError,
    convert,
    converter_reason,
    f16_overflow,
    find_converter,
    parse_types,
    preflight,
    preflight_files,
    setup_converter,
    stored_float_type,
    tools,
)
from qlora_merge.gguf import export as convert_module
from qlora_merge.gguf.staged import export_staged, gguf_bytes, preflight_merge

DEMO = Path(__file__).parent.parent / "examples" / "tiny-llama"
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(
    not HAVE_LLAMA_CPP,
    reason="llama-cpp-python is not installed (pip install 'qlora-merge[gguf]'): llama.cpp's runtime and quantizer "
    "check the GGUF files",
)

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_k_m")
# gguf type -> (largest |difference| allowed, root-mean-square difference allowed), both relative to max |logit|
TOLERANCES = {"f32": (1e-4, 1e-4), "f16": (1e-2, 1e-2), "bf16": (8e-2, 5e-2), "q8_0": (0.15, 0.08)}
FILE_TYPES = {"f32": "all F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_k_m": "Q4_K - Medium"}
TOKENS = [1, 282, 293, 263, 319, 312, 275, 265, 305]
TEXT = "the lazy llamas merged seven adapters over a brown dog"
CORPUS = (
    "the quick brown fox jumps over a lazy dog while seven merry llamas sing about weights adapters and merged models"
)
WORDS = CORPUS.split()
# K-quants work on rows of 256 values: hidden and intermediate sizes that are multiples of 256 make llama.cpp use
# the K-quant types themselves, not its fallbacks for short rows.
LLAMA = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=320, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)  # fmt: skip


def train_sentencepiece(vocab_size: int = 320) -> bytes:
    """A SentencePiece BPE model (byte fallback, <unk>/<s>/</s> = 0/1/2) trained on fixed text: the same bytes on
    every run (one thread, seeded)."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, num_threads=1, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def write_tokenizer(directory: Path, model: bytes) -> None:
    """tokenizer.model and the tokenizer_config.json a Llama checkpoint ships (transformers v5 writes no
    tokenizer.model on save, so the original file is kept and copied as is)."""
    (directory / "tokenizer.model").write_bytes(model)
    config = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
    }  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def make_llama(directory: Path, tokenizer: bytes) -> Path:
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**LLAMA)).to(torch.float32)
    model.save_pretrained(directory)
    write_tokenizer(directory, tokenizer)
    return directory


@pytest.fixture(scope="module")
def converter(tmp_path_factory: pytest.TempPathFactory) -> Converter:
    """llama.cpp's converter: the one set up for this user (QLORA_MERGE_LLAMA_CPP, or the cache that
    `qlora-merge setup-gguf` fills), else unpacked from llama-cpp-python's sdist into a temporary directory."""
    try:
        return find_converter()
    except MissingDependency:
        return setup_converter(destination=tmp_path_factory.mktemp("llama-cpp") / "converter")


@pytest.fixture(scope="module")
def tokenizer_model() -> bytes:
    pytest.importorskip("sentencepiece", reason="sentencepiece (a test dependency) trains the test's tokenizer")
    return train_sentencepiece()


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory, tokenizer_model: bytes) -> Path:
    """base + a real PEFT adapter, merged by qlora-merge in float32; the tokenizer copied through as a companion."""
    root = tmp_path_factory.mktemp("gguf")
    base = make_llama(root / "base", tokenizer_model)
    adapter = make_adapter(base, root / "adapter", "llama")
    merge(base, adapter, root / "tiny-llama", dtype="f32")
    return root / "tiny-llama"


@pytest.fixture(scope="module")
def converted(merged: Path, converter: Converter, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not HAVE_LLAMA_CPP:
        pytest.skip("llama-cpp-python is not installed (pip install 'qlora-merge[gguf]')")
    out = tmp_path_factory.mktemp("gguf-out")
    files = convert(merged, ",".join(TYPES), out, converter=converter, threads=2)
    return {f.gguf_type: f.path for f in files}


@pytest.fixture(scope="module")
def reference_logits(merged: Path) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].double()


def llama_cpp_model(path: Path, **settings: Any) -> Any:
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path), logits_all=True, verbose=False, n_ctx=64, n_threads=2, seed=0,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **settings,
    )  # fmt: skip


def llama_cpp_logits(path: Path, **settings: Any) -> torch.Tensor:
    """llama.cpp's logits for TOKENS (float32 KV cache); `settings` go to llama_cpp.Llama (e.g. lora_path)."""
    import numpy as np

    model = llama_cpp_model(path, **settings)
    model.eval(TOKENS)
    return torch.from_numpy(np.array(model.scores[: len(TOKENS)], dtype=np.float64))


def file_type(path: Path) -> str:
    import llama_cpp

    model = llama_cpp_model(path)
    return llama_cpp.llama_ftype_name(int(model.metadata["general.file_type"])).decode()


# -- llama.cpp's own check of each GGUF ------------------------------------------------------------------------------


@needs_llama_cpp
@pytest.mark.parametrize("gguf_type", list(TOLERANCES))
def test_gguf_logits_match_transformers(
    gguf_type: str, converted: dict[str, Path], reference_logits: torch.Tensor
) -> None:
    got = llama_cpp_logits(converted[gguf_type])
    assert got.shape == reference_logits.shape
    scale = reference_logits.abs().max()
    worst = float((got - reference_logits).abs().max() / scale)
    rms = float((got - reference_logits).pow(2).mean().sqrt() / reference_logits.pow(2).mean().sqrt())
    largest, root_mean_square = TOLERANCES[gguf_type]
    print(f"{gguf_type}: max |d| / max |logit| = {worst:.3g}, rms(d) / rms(logits) = {rms:.3g}")
    assert worst <= largest, f"{gguf_type}: logits differ by {worst:.3g} of their scale (allowed {largest})"
    assert rms <= root_mean_square, f"{gguf_type}: rms difference {rms:.3g} (allowed {root_mean_square})"
    assert file_type(converted[gguf_type]) == FILE_TYPES[gguf_type]


@needs_llama_cpp
def test_k_quant_loads_and_reports_its_file_type(converted: dict[str, Path], reference_logits: torch.Tensor) -> None:
    path = converted["q4_k_m"]
    assert file_type(path) == "Q4_K - Medium"
    got = llama_cpp_logits(path)
    assert torch.isfinite(got).all()
    worst = float((got - reference_logits).abs().max() / reference_logits.abs().max())
    print(f"q4_k_m: max |d| / max |logit| = {worst:.3g}")
    assert path.stat().st_size < converted["q8_0"].stat().st_size


@needs_llama_cpp
def test_verify_gguf_passes_a_k_quant_on_finite_logits_and_reports_its_difference(
    converted: dict[str, Path], merged: Path
) -> None:
    """K-quants have no tolerance of their own (their error depends on the weights): verify --gguf passes one whose
    logits are all finite and reports the difference; the line names the file type."""
    from qlora_merge.verification.gguf import verify_gguf

    report = verify_gguf(converted["q4_k_m"], merged=merged)
    assert report.ok
    line = report.line()
    assert line.startswith("GGUF ok: Q4_K - Medium") and "max logit difference" in line, line
    assert line.endswith("(finite logits only)")


@needs_llama_cpp
def test_llama_cpp_tokenizes_as_sentencepiece(converted: dict[str, Path], merged: Path) -> None:
    """The vocabulary went through: llama.cpp's tokenizer of the GGUF gives SentencePiece's own ids."""
    import sentencepiece as spm

    reference = spm.SentencePieceProcessor(model_file=str(merged / "tokenizer.model"))
    model = llama_cpp_model(converted["f16"])
    assert model.tokenize(TEXT.encode(), add_bos=True) == [1, *reference.encode(TEXT)]


@needs_llama_cpp
def test_files_are_named_by_type_and_nothing_else_is_left(converted: dict[str, Path]) -> None:
    out = converted["f32"].parent
    assert sorted(p.name for p in out.iterdir()) == sorted(f"tiny-llama-{t}.gguf" for t in TYPES)


@needs_llama_cpp
def test_quantizing_alone_removes_its_intermediate(merged: Path, converter: Converter, tmp_path: Path) -> None:
    """Asked for a K-quant only, the float GGUF it is quantized from (the merge's own type: f32 here) is a hidden
    temporary that is gone afterwards."""
    (written,) = convert(merged, "q6_k", tmp_path, name="solo", converter=converter, threads=2, check=False)
    assert written.path == tmp_path / "solo-q6_k.gguf" and written.bytes == written.path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["solo-q6_k.gguf"]
    assert file_type(written.path) == "Q6_K"


@needs_llama_cpp
def test_quantizing_from_the_merges_own_float_type_loses_nothing(
    merged: Path, converter: Converter, tmp_path: Path
) -> None:
    """A bf16 merge quantized from a bf16 GGUF gives the very bytes that an f32 intermediate gives: the stored
    type holds the weights exactly, at half the disk of f32."""
    root = merged.parent
    half = merge(root / "base", root / "adapter", tmp_path / "half", dtype="bf16").output
    assert stored_float_type(half) == "bf16"
    quantized = {}
    for intermediate in ("f32", "bf16"):
        source = tmp_path / f"i-{intermediate}.gguf"
        convert_module._run_converter(converter, half, source, ["--outtype", intermediate])
        quantized[intermediate] = tmp_path / f"q-{intermediate}.gguf"
        convert_module._quantize(source, quantized[intermediate], "q4_k_m", 2)
    assert quantized["f32"].read_bytes() == quantized["bf16"].read_bytes()


@needs_llama_cpp
def test_existing_file_refused_unless_overwrite(converted: dict[str, Path], merged: Path, converter: Converter) -> None:
    out = converted["f32"].parent
    with pytest.raises(OutputError, match=r"tiny-llama-q8_0\.gguf: exists"):
        convert(merged, "q8_0", out, converter=converter, check=False)


@needs_llama_cpp
def test_quantizer_refusal_is_one_line(tmp_path: Path) -> None:
    bogus = tmp_path / "not-a.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 60)
    with pytest.raises(ConversionError) as caught:
        convert_module._quantize(bogus, tmp_path / "out.gguf", "q4_k_m", 1)
    message = str(caught.value)
    assert "\n" not in message and "quantizer refused q4_k_m" in message


# -- refusals before any weight is converted -------------------------------------------------------------------------


def test_preflight_accepts_the_merge_inputs(merged: Path, converter: Converter) -> None:
    """The check a merge runs before writing: config.json and the tokenizer files, no weights."""
    config = json.loads((merged / "config.json").read_text())
    companions = [merged / "tokenizer.model", merged / "tokenizer_config.json"]
    assert preflight_files(config, companions, "f16", converter=converter) == converter


def test_merge_preflight_checks_what_the_merge_will_write(merged: Path, converter: Converter) -> None:
    """`--gguf` on a merge: the check runs on the planned inputs (the config.json and tokenizer files the merge
    will write), before a weight is merged."""
    from qlora_merge.options import MergeOptions
    from qlora_merge.preparation import prepare
    from qlora_merge.progress import ignore_progress

    root = merged.parent
    inputs = prepare(str(root / "base"), [(str(root / "adapter"), 1.0)], None, MergeOptions(), ignore_progress, {})
    assert preflight_merge(inputs, "bf16", "q8_0", converter=converter) == converter


def test_export_staged_can_leave_only_the_gguf(merged: Path, converter: Converter, tmp_path: Path) -> None:
    staging = tmp_path / ".staging"
    shutil.copytree(merged, staging)
    (written,) = export_staged(staging, "tiny-llama", "q8_0", converter=converter, keep_safetensors=False)
    assert written.path == staging / "tiny-llama-q8_0.gguf"
    assert not list(staging.glob("*.safetensors"))
    assert (staging / "config.json").is_file() and (staging / "tokenizer.model").is_file()
    weights = (merged / "model.safetensors").stat().st_size
    assert written.bytes <= gguf_bytes(weights, "f32", "q8_0")
    # a quantization's float intermediate is counted, once: asking for that float type too costs no more disk
    assert gguf_bytes(weights, "bf16", "q4_k_m") == gguf_bytes(weights, "bf16", "q4_k_m,bf16") - (1 << 20)


def home_made_bpe(directory: Path) -> Path:
    """A byte-level BPE tokenizer trained here, as the bundled demo's: llama.cpp does not know its pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    directory.mkdir()
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "config.json").write_text(json.dumps({**llama_config(), "vocab_size": tokenizer.get_vocab_size()}))
    return directory


def llama_config() -> dict[str, Any]:
    import transformers

    return transformers.LlamaConfig(**LLAMA).to_dict() | {"architectures": ["LlamaForCausalLM"]}


def test_preflight_refuses_an_unknown_bpe_pre_tokenizer_in_one_line(tmp_path: Path, converter: Converter) -> None:
    model = home_made_bpe(tmp_path / "bpe")
    with pytest.raises(ConversionError) as caught:
        preflight(model, "q8_0", converter=converter)
    message = str(caught.value)
    assert "\n" not in message
    assert "BPE pre-tokenizer is not one llama.cpp knows (chkhsh " in message
    assert message.startswith(f"{model}: llama.cpp's converter refused it")


def test_preflight_refuses_an_unknown_architecture(
    tmp_path: Path, converter: Converter, tokenizer_model: bytes
) -> None:
    model = tmp_path / "odd"
    model.mkdir()
    write_tokenizer(model, tokenizer_model)
    (model / "config.json").write_text(json.dumps({**llama_config(), "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(ConversionError, match=r"architecture NoSuchForCausalLM is not one this llama.cpp converter"):
        preflight(model, "f16", converter=converter)


def test_preflight_needs_a_tokenizer(tmp_path: Path, converter: Converter) -> None:
    (tmp_path / "config.json").write_text(json.dumps(llama_config()))
    with pytest.raises(InputNotFound, match="no tokenizer"):
        preflight(tmp_path, "f16", converter=converter)


def test_f16_overflow_refused_before_conversion(tmp_path: Path, merged: Path, converter: Converter) -> None:
    model = tmp_path / "big"
    shutil.copytree(merged, model)
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"][3, 5] = 1e5
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    assert f16_overflow(model) == ("model.layers.0.mlp.down_proj.weight", 1e5)
    assert f16_overflow(merged) is None
    with pytest.raises(NonFiniteValues, match=r"down_proj.weight has values up to 100000, beyond float16's range"):
        convert(model, "f16", tmp_path, converter=converter, check=False)


def test_stored_float_type_is_the_lossless_intermediate(merged: Path, tmp_path: Path) -> None:
    assert stored_float_type(merged) == "f32"
    half = tmp_path / "half"
    half.mkdir()
    tensors = {name: t.to(torch.bfloat16) for name, t in load_file(merged / "model.safetensors").items()}
    save_file(tensors, half / "model.safetensors")
    assert stored_float_type(half) == "bf16"


# -- finding and setting up the tools --------------------------------------------------------------------------------


def test_missing_converter_says_how_to_set_it_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tools.ENV_DIR, raising=False)
    monkeypatch.delenv(tools.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(MissingDependency) as caught:
        find_converter()
    message = str(caught.value)
    assert "\n" not in message and "qlora-merge setup-gguf" in message and "llama.cpp-0.3.36" in message
    with pytest.raises(MissingDependency, match=r"--llama-cpp .*: not a llama.cpp converter"):
        find_converter(tmp_path)


def test_missing_llama_cpp_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def refuse(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)
    with pytest.raises(MissingDependency, match=r'pip install "qlora-merge\[gguf\]" \(llama-cpp-python==0.3.36\)'):
        tools.llama_cpp_module()


def fake_sdist(path: Path, version: str = "0.3.36", *, complete: bool = True) -> Path:
    top = f"llama_cpp_python-{version}/vendor/llama.cpp"
    members = {
        f"{top}/convert_hf_to_gguf.py": b"print('converter')\n",
        f"{top}/conversion/__init__.py": b"",
        f"{top}/conversion/llama.py": b"",
        f"{top}/gguf-py/gguf/__init__.py": b"",
        f"{top}/ggml/src/ggml.c": b"int main;\n",  # not wanted: C sources stay out
    }
    if not complete:
        del members[f"{top}/gguf-py/gguf/__init__.py"]
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_setup_unpacks_only_the_converter_from_the_sdist(tmp_path: Path) -> None:
    sdist = fake_sdist(tmp_path / "llama_cpp_python-0.3.36.tar.gz")
    found = setup_converter(sdist, tmp_path / "tools")
    assert found.version == "0.3.36" and found.script.is_file() and (found.gguf_py / "gguf").is_dir()
    assert not (found.root / "ggml").exists()
    assert find_converter(tmp_path / "tools") == found
    again = setup_converter(sdist, tmp_path / "tools")  # already there: kept
    assert again == found
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".setup-")]
    assert leftovers == []


def test_setup_refuses_an_incomplete_sdist(tmp_path: Path) -> None:
    sdist = fake_sdist(tmp_path / "llama_cpp_python-0.3.36.tar.gz", complete=False)
    with pytest.raises(MissingDependency, match="lacks conversion/ or gguf-py/"):
        setup_converter(sdist, tmp_path / "tools")
    assert not (tmp_path / "tools").exists()
    with pytest.raises(MissingDependency, match="no such file"):
        setup_converter(tmp_path / "missing.tar.gz", tmp_path / "tools")


def test_converter_gets_its_own_gguf_py_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PyPI `gguf` wheel (or the one some converter wheels ship) must not shadow the converter's gguf-py."""
    monkeypatch.setenv("PYTHONPATH", "/somewhere/else")
    monkeypatch.setenv("NO_LOCAL_GGUF", "1")
    env = convert_module._converter_env(Converter(tmp_path, "0.3.36"))
    assert env["PYTHONPATH"].split(os.pathsep) == [str(tmp_path / "gguf-py"), "/somewhere/else"]
    assert "NO_LOCAL_GGUF" not in env


# -- types and messages ---------------------------------------------------------------------------------------------


def test_types_parse_with_llama_quantize_names() -> None:
    assert parse_types("F16, Q4_K,q8_0,f16,q5_k_m") == ("f16", "q4_k_m", "q8_0", "q5_k_m")
    assert parse_types(["bf16", "q6_k"]) == ("bf16", "q6_k")
    with pytest.raises(GGUFTypeError, match="needs an importance matrix"):
        parse_types("iq2_xxs")
    with pytest.raises(GGUFTypeError, match="ternary"):
        parse_types("tq1_0")
    with pytest.raises(GGUFTypeError, match="unknown GGUF type 'q9'"):
        parse_types("f16,q9")
    with pytest.raises(GGUFTypeError, match="no GGUF type given"):
        parse_types(" , ")


def test_converter_reasons_are_one_line() -> None:
    traceback = (
        'INFO:hf-to-gguf:Loading model: x\nTraceback (most recent call last):\n  File "a.py", line 1\n'
        "    raise ValueError('bad')\nValueError: Can't load 'weight_map' from 'model.safetensors.index.json'\n"
    )
    assert converter_reason(traceback) == "ValueError: Can't load 'weight_map' from 'model.safetensors.index.json'"
    missing = "Traceback (most recent call last):\nModuleNotFoundError: No module named 'sentencepiece'\n"
    needs = "it needs the Python package 'sentencepiece' for this model: pip install sentencepiece"
    assert converter_reason(missing) == needs
    assert converter_reason("ERROR:hf-to-gguf:Model FooForCausalLM is not supported\n") == (
        "architecture FooForCausalLM is not one this llama.cpp converter supports"
    )
    assert converter_reason("") == "it exited with an error and said nothing"


# -- `qlora-merge ... --gguf TYPES` and `qlora-merge gguf`: the whole path through the CLI --------------------------


@needs_llama_cpp
def test_merge_with_gguf_writes_the_files_beside_the_merge(
    tmp_path: Path, tokenizer_model: bytes, converter: Converter, reference_logits: torch.Tensor, merged: Path
) -> None:
    """The merge and its q8_0 GGUF appear together; llama.cpp's logits of it match transformers' on the merge.
    --gguf-only leaves just the GGUF (and the files beside the weights)."""
    from qlora_merge.cli import main

    base, adapter = merged.parent / "base", merged.parent / "adapter"
    out = tmp_path / "tiny-llama"
    flags = ["--base", str(base), "--adapter", str(adapter), "--dtype", "f32", "--llama-cpp", str(converter.root)]
    stdout, stderr = io.StringIO(), io.StringIO()
    assert main([*flags, "--output", str(out), "--gguf", "q8_0"], out=stdout, err=stderr) == 0, stderr.getvalue()
    assert (out / "tiny-llama-q8_0.gguf").is_file() and (out / "model.safetensors").is_file()
    assert f"GGUF: {out / 'tiny-llama-q8_0.gguf'}" in stdout.getvalue()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no staging left"
    scale = reference_logits.abs().max()
    worst = (llama_cpp_logits(out / "tiny-llama-q8_0.gguf") - reference_logits).abs().max() / scale
    assert worst < TOLERANCES["q8_0"][0], worst

    only = tmp_path / "only"
    assert main([*flags, "--output", str(only), "--gguf", "f16", "--gguf-only"], out=io.StringIO(), err=stderr) == 0
    assert (only / "only-f16.gguf").is_file()
    assert not list(only.glob("*.safetensors")) and not (only / "model.safetensors.index.json").exists()

    code = main(["gguf", str(out), "--types", "f32", "--llama-cpp", str(converter.root)], out=stdout, err=stderr)
    assert code == 0 and (out / "tiny-llama-f32.gguf").is_file()


@needs_llama_cpp
def test_the_bundled_demo_merges_straight_to_q8_0(tmp_path: Path, converter: Converter) -> None:
    """The README's demo with --gguf q8_0, offline: its SentencePiece tokenizer converts, llama.cpp tokenizes as
    the merged model's tokenizer does, and its logits pass verify --gguf against PEFT's unmerged model."""
    from transformers import AutoTokenizer

    from qlora_merge.cli import main

    out = tmp_path / "tiny-llama"
    argv = ["--base", str(DEMO / "base"), "--adapter", str(DEMO / "adapter"), "--output", str(out)]
    stderr = io.StringIO()
    code = main([*argv, "--gguf", "q8_0", "--llama-cpp", str(converter.root)], out=io.StringIO(), err=stderr)
    assert code == 0, stderr.getvalue()
    gguf = out / "tiny-llama-q8_0.gguf"
    assert file_type(gguf) == "Q8_0"
    assert (out / "tokenizer.model").read_bytes() == (DEMO / "base" / "tokenizer.model").read_bytes()

    prompt = "Why do rivers bend? The lighthouse keeper climbed 1234 stairs."
    expected = AutoTokenizer.from_pretrained(out)(prompt)["input_ids"]
    assert llama_cpp_model(gguf).tokenize(prompt.encode(), add_bos=True) == expected

    stdout = io.StringIO()
    against_peft = ["--base", str(DEMO / "base"), "--adapter", str(DEMO / "adapter")]
    assert main(["verify", "--gguf", str(gguf), *against_peft], out=stdout, err=stderr) == 0, stderr.getvalue()
    assert stdout.getvalue().startswith("GGUF ok: Q8_0")


def test_merge_with_gguf_refuses_an_unknown_tokenizer_before_merging(tmp_path: Path, converter: Converter) -> None:
    """A base whose byte-level BPE tokenizer llama.cpp has no pre-tokenizer hash for (as the demo had before it got
    a SentencePiece one): refused by the vocab-only preflight, one line, nothing written."""
    from qlora_merge.cli import main

    base = tmp_path / "base"
    shutil.copytree(DEMO / "base", base)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        (base / name).unlink()
    bpe = home_made_bpe(tmp_path / "bpe")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bpe / name, base / name)
    out = tmp_path / "out"
    argv = ["--base", str(base), "--adapter", str(DEMO / "adapter"), "--output", str(out)]
    stderr = io.StringIO()
    code = main([*argv, "--gguf", "q8_0", "--llama-cpp", str(converter.root)], out=io.StringIO(), err=stderr)
    assert code == 2, stderr.getvalue()
    assert stderr.getvalue().count("\n") == 1 and "BPE pre-tokenizer is not one llama.cpp knows" in stderr.getvalue()
    assert str(base) in stderr.getvalue()
    assert not out.exists()


# -- the adapter itself as a GGUF LoRA (llama.cpp's runtime --lora) --------------------------------------------------


@needs_llama_cpp
def test_the_adapter_as_a_gguf_lora_on_the_base_gguf_gives_the_merges_logits(
    merged: Path, converter: Converter, reference_logits: torch.Tensor, tmp_path: Path
) -> None:
    """`qlora-merge gguf-lora`: llama.cpp loads the base's f32 GGUF with the adapter's f32 GGUF LoRA applied at run
    time, and its logits match transformers' on our merge as closely as the merge's own f32 GGUF does."""
    from qlora_merge.cli import main

    base, adapter = merged.parent / "base", merged.parent / "adapter"
    (base_gguf,) = convert(base, "f32", tmp_path, name="base", converter=converter)
    lora = tmp_path / "adapter-f32.gguf"
    argv = ["gguf-lora", "--adapter", str(adapter), "--base", str(base), "--output", str(lora), "--type", "f32"]
    stdout, stderr = io.StringIO(), io.StringIO()
    assert main([*argv, "--llama-cpp", str(converter.root)], out=stdout, err=stderr) == 0, stderr.getvalue()
    assert stdout.getvalue().startswith(f"{lora}  (LoRA, f32,")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary file left"
    got = llama_cpp_logits(base_gguf.path, lora_path=str(lora))
    worst = float((got - reference_logits).abs().max() / reference_logits.abs().max())
    without = llama_cpp_logits(base_gguf.path)
    print(f"base + GGUF LoRA vs merge: {worst:.3g}; base alone: {float((without - reference_logits).abs().max()):.3g}")
    assert worst <= TOLERANCES["f32"][0]
    assert (without - reference_logits).abs().max() > 100 * (got - reference_logits).abs().max(), "the LoRA applied"

    code = main([*argv, "--llama-cpp", str(converter.root)], out=io.StringIO(), err=stderr)
    assert code == 2 and "exists" in stderr.getvalue()


def test_gguf_lora_refuses_a_pickled_adapter_before_running_anything(tmp_path: Path) -> None:
    from qlora_merge.gguf import export_lora

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "someone/model"}))
    (adapter / "adapter_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(MergeError, match=r"adapter_model\.bin is not converted"):
        export_lora(adapter, tmp_path / "a.gguf", converter=tmp_path / "nowhere")
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(MergeError, match="pass --base DIR"):
        export_lora(adapter, tmp_path / "a.gguf", converter=tmp_path / "nowhere")
    with pytest.raises(MergeError, match="a GGUF LoRA is one of"):
        export_lora(adapter, tmp_path / "a.gguf", gguf_type="q4_k_m")


def test_gguf_flags_are_checked(tmp_path: Path) -> None:
    from qlora_merge import MergeError
    from qlora_merge.options import MergeOptions

    assert MergeOptions(gguf="Q8_0,q4_k").gguf == ("q8_0", "q4_k_m")
    with pytest.raises(MergeError, match="pick one"):
        MergeOptions(gguf="q8_0", requantize="nf4")
    with pytest.raises(MergeError, match="--gguf-only needs --gguf"):
        MergeOptions(keep_safetensors=False)
