"""More architectures through merge(..., gguf=...): llama.cpp's logits against transformers' on the merged model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from factories import make_adapter
from test_gguf import (
    HAVE_LLAMA_CPP,
    TOKENS,
    TOLERANCES,
    llama_cpp_logits,
    llama_cpp_model,
    train_sentencepiece,
    write_tokenizer,
)

from qlora_merge import merge

pytestmark = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed")

COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=320, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
MODELS = {
    "qwen2-tied": ("Qwen2Config", "qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "qwen3", dict(tie_word_embeddings=False, head_dim=16)),
    "gemma": ("GemmaConfig", "gemma", dict(head_dim=16)),
    "llama-resized": ("LlamaConfig", "llama", dict(tie_word_embeddings=False)),
}


def tensor_names(path: Path) -> set[str]:
    """The tensor names in a GGUF, read by the gguf-py of the converter's own commit."""
    import subprocess
    import sys

    from qlora_merge.gguf.tools import find_converter

    converter = find_converter()
    code = "import sys, gguf; print('\\n'.join(t.name for t in gguf.GGUFReader(sys.argv[1]).tensors))"
    env = {**__import__("os").environ, "PYTHONPATH": str(converter.gguf_py)}
    out = subprocess.run([sys.executable, "-c", code, str(path)], env=env, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def reference(merged: Path) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].double()


@pytest.mark.parametrize("name", list(MODELS))
def test_architecture_logits_match(name: str, tmp_path: Path) -> None:
    check(name, "f32", tmp_path)


def test_tied_qwen2_q8_0(tmp_path: Path) -> None:
    check("qwen2-tied", "q8_0", tmp_path)


def check(name: str, gguf_type: str, tmp_path: Path) -> None:
    import transformers

    pytest.importorskip("sentencepiece")
    config_class, arch, extra = MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**COMMON, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.float32)
    model.save_pretrained(tmp_path / "base")
    write_tokenizer(tmp_path / "base", train_sentencepiece())
    vocab = 336 if name == "llama-resized" else None
    adapter = make_adapter(tmp_path / "base", tmp_path / "adapter", arch, vocab_size=vocab)
    merge(tmp_path / "base", adapter, tmp_path / "out", dtype="f32", gguf=gguf_type)
    ggufs = sorted((tmp_path / "out").rglob("*.gguf")) + sorted(tmp_path.glob("*.gguf"))
    assert ggufs, sorted(p.name for p in tmp_path.rglob("*"))
    expected = reference(tmp_path / "out")
    got = llama_cpp_logits(ggufs[0])
    scale = expected.abs().max()
    diff = ((got - expected).abs().max() / scale).item()
    print(f"{name} {gguf_type} max diff / max logit = {diff:.3g}")
    assert diff <= TOLERANCES[gguf_type][0]
    assert llama_cpp_model(ggufs[0]).n_vocab() == transformers.AutoConfig.from_pretrained(tmp_path / "out").vocab_size
    tied = transformers.AutoConfig.from_pretrained(tmp_path / "out").tie_word_embeddings
    assert ("output.weight" in tensor_names(ggufs[0])) != tied


def test_verify_gguf_cli_passes_and_fails_on_another_merge(tmp_path: Path) -> None:
    import io

    import transformers

    from qlora_merge.cli.commands import verify_command

    torch.manual_seed(0)
    config = transformers.Qwen2Config(**COMMON, tie_word_embeddings=True)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    write_tokenizer(tmp_path / "base", train_sentencepiece())
    for seed in (1, 2):
        adapter = make_adapter(tmp_path / "base", tmp_path / f"adapter{seed}", "qwen2", seed=seed)
        merge(tmp_path / "base", adapter, tmp_path / f"out{seed}", dtype="f32", gguf="f32")
    one, two = (sorted((tmp_path / f"out{s}").rglob("*.gguf"))[0] for s in (1, 2))
    out, err = io.StringIO(), io.StringIO()
    assert verify_command(["--gguf", str(one), "--merged", str(tmp_path / "out1")], out, err) == 0, err.getvalue()
    print(out.getvalue())
    assert "ok" in out.getvalue()
    args = ["--gguf", str(one), "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter1")]
    assert verify_command(args, out, err) == 0
    out = io.StringIO()
    assert verify_command(["--gguf", str(two), "--merged", str(tmp_path / "out1")], out, err) == 3
    print(out.getvalue())
    assert "FAILED" in out.getvalue()


# -- a BPE tokenizer the converter recognises by its hash: GPT-2's, rebuilt from llama.cpp's own vocabulary file ---


def gpt2_vocabulary(directory: Path) -> Path:
    """llama.cpp's vocab-only GGUF of GPT-2's tokenizer (models/ggml-vocab-gpt-2.gguf) and its test texts and token
    ids (.inp/.out), from the llama-cpp-python sdist setup-gguf unpacks (cached by scripts/setup_llama_cpp.sh, else
    downloaded from PyPI): a real tokenizer no registry package ships on its own."""
    import os
    import tarfile

    from qlora_merge.gguf.tools import LLAMA_CPP_PYTHON_VERSION, _download_sdist

    cache = Path(
        os.environ.get("QLORA_MERGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "qlora-merge"
    )
    sdist = cache.expanduser() / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if not sdist.is_file():
        sdist = _download_sdist(directory)
    wanted = {f"ggml-vocab-gpt-2.gguf{suffix}" for suffix in ("", ".inp", ".out")}
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            name = member.name.rsplit("/", 1)[-1]
            if "/vendor/llama.cpp/models/" in member.name and name in wanted and member.isfile():
                source = tar.extractfile(member)
                assert source is not None
                (directory / name).write_bytes(source.read())
    return directory / "ggml-vocab-gpt-2.gguf"


def gpt2_tokenizer(vocabulary: Path, directory: Path) -> Any:
    """GPT-2's byte-level BPE tokenizer (tokenizer.json) rebuilt from the tokens and merges in `vocabulary`, read by
    the converter's own gguf-py (in a child, so that it does not shadow anything here); saved into `directory`."""
    import json
    import os
    import subprocess
    import sys

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from qlora_merge.gguf.tools import find_converter

    code = (
        "import sys, json, gguf; r = gguf.GGUFReader(sys.argv[1]); "
        "print(json.dumps({k: r.fields['tokenizer.ggml.' + k].contents() for k in ('tokens', 'merges', 'pre')}))"
    )
    env = {**os.environ, "PYTHONPATH": str(find_converter().gguf_py)}
    done = subprocess.run([sys.executable, "-c", code, str(vocabulary)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    fields = json.loads(done.stdout)
    assert fields["pre"] == "gpt-2"
    vocab = {token: i for i, token in enumerate(fields["tokens"])}
    merges = [tuple(merge.split(" ")) for merge in fields["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    special = "<|endoftext|>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=special, eos_token=special, unk_token=special)
    fast.save_pretrained(directory)
    return fast


def test_a_bpe_tokenizer_the_converter_knows_converts_and_tokenizes_as_llama_cpp(tmp_path: Path) -> None:
    """GPT-2's tokenizer on a tiny llama: the rebuilt tokenizer gives llama.cpp's expected ids on all of its own
    test texts, the converter recognises its pre-tokenizer by hash ("gpt-2"), and the merged GGUF's logits and
    tokenization match transformers'."""
    import transformers

    vocabulary = gpt2_vocabulary(tmp_path)
    base = tmp_path / "base"
    base.mkdir()
    tokenizer = gpt2_tokenizer(vocabulary, base)
    texts = (tmp_path / "ggml-vocab-gpt-2.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected_ids = (tmp_path / "ggml-vocab-gpt-2.gguf.out").read_text().split("\n")
    cases = list(zip(texts, expected_ids, strict=False))
    assert len(cases) > 40
    for text, ids in cases:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == [int(i) for i in ids.split()], repr(text)

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**(COMMON | dict(vocab_size=50257, bos_token_id=50256, eos_token_id=50256)))
    transformers.AutoModelForCausalLM.from_config(config).to(torch.float32).save_pretrained(base)
    adapter = make_adapter(base, tmp_path / "adapter", "llama")
    merge(base, adapter, tmp_path / "out", dtype="f32", gguf="f32")
    (gguf,) = sorted((tmp_path / "out").glob("*.gguf"))
    model = llama_cpp_model(gguf)
    assert model.metadata["tokenizer.ggml.pre"] == "gpt-2"
    text = "The lazy llamas merged 1234 adapters, didn't they? Äpfel 🦙"
    assert model.tokenize(text.encode(), add_bos=False, special=False) == tokenizer(text)["input_ids"]
    expected = reference(tmp_path / "out")
    diff = ((llama_cpp_logits(gguf) - expected).abs().max() / expected.abs().max()).item()
    print(f"gpt-2 tokenizer on llama: f32 max diff / max logit = {diff:.3g}")
    assert diff <= TOLERANCES["f32"][0]
