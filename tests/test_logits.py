"""compare_logits: the merged model's logits against PEFT's base + unmerged adapter; a right merge agrees within
the dtype's rounding, a wrong one is reported, and missing transformers/peft is one clear error."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from factories import make_adapter, make_base, read_tensors
from safetensors.torch import save_file

from qlora_merge import merge
from qlora_merge.errors import InputNotFound, MergeError
from qlora_merge.verification.logits import MISSING_DEPENDENCIES, MissingDependency, compare_logits, default_tolerance

DOWN = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """base, adapter, a second adapter, and merges of the first in f32 and bf16, under one directory."""
    root = tmp_path_factory.mktemp("logits")
    base = make_base("llama", root / "base")
    make_adapter(base, root / "adapter", "llama")
    make_adapter(base, root / "other", "llama", seed=5)
    merge(base, root / "adapter", root / "f32", dtype="f32")
    merge(base, root / "adapter", root / "bf16", dtype="bf16")
    return root


def rewritten(source: Path, directory: Path, name: str, value: torch.Tensor) -> Path:
    """A copy of a merged checkpoint with tensor `name` replaced, saved as one file."""
    shutil.copytree(source, directory)
    tensors = read_tensors(directory)
    tensors[name] = value.to(tensors[name].dtype).contiguous()
    for path in directory.glob("model*.safetensors*"):
        path.unlink()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def test_f32_and_bf16_merges_agree_with_base_plus_adapter(llama: Path) -> None:
    f32 = compare_logits(llama / "base", llama / "adapter", llama / "f32")
    bf16 = compare_logits(llama / "base", llama / "adapter", llama / "bf16")
    assert f32.ok and bf16.ok, (f32.reason, bf16.reason)
    assert (f32.dtype, bf16.dtype) == ("F32", "BF16")
    assert (f32.tolerance, bf16.tolerance) == (1e-4, 2.0**-4)
    assert f32.relative_diff < 1e-5, "an f32 merge differs only in summation order"
    assert 1e-5 < bf16.relative_diff < 4 * 2.0**-8, "a bf16 merge differs by the rounding of its weights, no more"
    assert f32.top1_agreement == 1.0
    assert f32.tokens == bf16.tokens == 16 and f32.prompt_source == "token ids"
    assert f32.model_class == "LlamaForCausalLM"
    assert f32.adapter_effect > 100 * f32.tolerance * f32.scale, "this adapter is visible in the logits"
    assert "agree" in f32.reason
    as_json = json.loads(json.dumps(bf16.to_dict()))
    assert as_json["ok"] is True and as_json["merged"] == str(llama / "bf16") and as_json["relative_diff"] > 0


def test_the_merge_of_another_adapter_is_not_ok(llama: Path, tmp_path: Path) -> None:
    merge(llama / "base", llama / "other", tmp_path / "other", dtype="bf16")
    report = compare_logits(llama / "base", llama / "adapter", tmp_path / "other")
    assert not report.ok
    assert report.relative_diff > 10 * report.tolerance
    assert "more than the tolerance" in report.reason


def test_the_bare_base_is_not_ok(llama: Path) -> None:
    """A "merged" checkpoint that is the base itself differs by exactly what the adapter does to the logits."""
    report = compare_logits(llama / "base", llama / "adapter", llama / "base")
    assert not report.ok
    assert report.max_abs_diff == pytest.approx(report.adapter_effect, rel=1e-3)


def test_one_tensor_left_unmerged_is_not_ok(llama: Path, tmp_path: Path) -> None:
    original = read_tensors(llama / "base")[DOWN]
    bad = rewritten(llama / "bf16", tmp_path / "bad", DOWN, original)
    report = compare_logits(llama / "base", llama / "adapter", bad)
    assert not report.ok and report.relative_diff > report.tolerance


def test_nan_in_the_merged_model_is_not_ok(llama: Path, tmp_path: Path) -> None:
    value = read_tensors(llama / "f32")[DOWN].clone()
    value[0, 0] = float("nan")
    report = compare_logits(llama / "base", llama / "adapter", rewritten(llama / "f32", tmp_path / "nan", DOWN, value))
    assert not report.ok and report.max_abs_diff == float("inf")


def test_an_explicit_tolerance_is_used(llama: Path) -> None:
    report = compare_logits(llama / "base", llama / "adapter", llama / "bf16", tolerance=1e-6)
    assert not report.ok and report.tolerance == 1e-6


def test_tied_qwen2_bf16_merge_agrees(tmp_path: Path) -> None:
    base = make_base("qwen2", tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", "qwen2")
    merge(base, adapter, tmp_path / "merged", dtype="bf16")
    report = compare_logits(base, adapter, tmp_path / "merged")
    assert report.ok and report.model_class == "Qwen2ForCausalLM", report.reason
    assert report.relative_diff < 4 * 2.0**-8


def test_a_resized_vocabulary_is_compared_on_new_tokens_too(tmp_path: Path) -> None:
    """Tokens added before training (160 -> 168): the base is resized as PEFT needs before the adapter loads."""
    base = make_base("llama", tmp_path / "base")
    adapter = make_adapter(
        base, tmp_path / "adapter", "llama", vocab_size=168, target_modules=["q_proj"], modules_to_save=["embed_tokens"]
    )
    merge(base, adapter, tmp_path / "merged", dtype="f32")
    report = compare_logits(base, adapter, tmp_path / "merged")
    assert report.ok, report.reason
    assert report.relative_diff < 1e-5


def test_the_merged_tokenizer_is_used_when_there_is_one(llama: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    merged = tmp_path / "merged"
    shutil.copytree(llama / "f32", merged)
    words = ["[UNK]", "merging", "must", "not", "change", "the", "answer"]
    inner = Tokenizer(WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]"))
    inner.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="[UNK]").save_pretrained(merged)

    report = compare_logits(llama / "base", llama / "adapter", merged, prompt="merging must not change the answer")
    assert report.ok and report.prompt_source == "tokenizer" and report.tokens == 6


def test_missing_transformers_is_one_clear_error(llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependency) as caught:
        compare_logits(llama / "base", llama / "adapter", llama / "f32")
    assert isinstance(caught.value, MergeError)
    assert (
        str(caught.value)
        == MISSING_DEPENDENCIES
        == ("the logits check needs transformers and peft (pip install 'qlora-merge[verify]')")
    )


def test_missing_peft_is_the_same_error(llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(MissingDependency, match="needs transformers and peft"):
        compare_logits(llama / "base", llama / "adapter", llama / "f32")


def test_a_missing_merged_dir_is_refused(llama: Path, tmp_path: Path) -> None:
    with pytest.raises(InputNotFound, match="merged model directory not found"):
        compare_logits(llama / "base", llama / "adapter", tmp_path / "nowhere")


def test_a_model_without_token_input_is_refused_naming_the_merged_dir(tmp_path: Path) -> None:
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], num_labels=2)
    transformers.ResNetForImageClassification(config).save_pretrained(tmp_path / "base")
    model = transformers.ResNetForImageClassification.from_pretrained(tmp_path / "base")
    get_peft_model(model, LoraConfig(r=2, target_modules=["convolution"])).save_pretrained(tmp_path / "adapter")
    merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", dtype="f32")
    with pytest.raises(MergeError, match=r"merged: ResNetForImageClassification takes pixel_values, not token ids"):
        compare_logits(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")


def test_default_tolerance_follows_the_unit_roundoff() -> None:
    assert default_tolerance("BF16") == 16 * 2.0**-8
    assert default_tolerance("F16") == 16 * 2.0**-11
    assert default_tolerance("F32") == 1e-4
