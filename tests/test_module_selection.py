"""PEFT's selection of the modules it adapts (exclude_modules, layers_to_transform with layers_pattern, a regex
target_modules, modules_to_save), and the layout of square weights by layer class: merged bit-identical to PEFT's
merge_and_unload() where PEFT merges, refused by name where the adapter's config and file disagree or the
layout of a weight cannot be known.

PEFT saves only the modules it selected, so an adapter whose file holds more (hand-edited, or written by another
tool) is made here by saving every module and then editing adapter_config.json: PeftModel.from_pretrained leaves
the extra factors out, which --allow-unused reproduces; without it the merge is refused naming the module.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import assert_same_tensors, make_adapter, make_base, peft_merge, read_tensors

from qlora_merge import inspect_adapter, merge
from qlora_merge.errors import AdapterFormatError, MergeError, UnsupportedAdapter


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_base("llama", tmp_path_factory.mktemp("llama") / "base", dtype=torch.float32)


@pytest.fixture(scope="module")
def full_adapter(llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every projection of both layers adapted."""
    return make_adapter(llama, tmp_path_factory.mktemp("full") / "adapter", "llama")


def edited(adapter: Path, tmp_path: Path, **fields: Any) -> Path:
    """A copy of `adapter` with adapter_config.json fields set (None removes one)."""
    copy = tmp_path / "edited"
    copy.mkdir(parents=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    for key, value in fields.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (copy / "adapter_config.json").write_text(json.dumps(config))
    (copy / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    return copy


SELECTIONS = {
    "exclude-list": {"exclude_modules": ["q_proj", "layers.1.mlp.down_proj"]},
    "exclude-regex": {"exclude_modules": r".*\.1\.self_attn\..*"},
    "layers-int": {"layers_to_transform": 1},
    "layers-list-pattern": {"layers_to_transform": [0], "layers_pattern": "layers"},
    "layers-pattern-list": {"layers_to_transform": [1], "layers_pattern": ["h", "layers"]},
    "target-regex": {"target_modules": r"model\.layers\.0\.(self_attn|mlp)\.[a-z]+_proj"},
}


@pytest.mark.parametrize("name", SELECTIONS)
def test_saved_by_peft_with_a_selection_equals_peft(name: str, llama: Path, tmp_path: Path) -> None:
    """A real PEFT adapter saved with the selection field: its file holds only what PEFT selected."""
    options = dict(SELECTIONS[name])
    adapter = make_adapter(llama, tmp_path / "adapter", "llama", **options)
    reference = peft_merge(llama, adapter, tmp_path / "peft", torch.float32)
    merge(llama, adapter, tmp_path / "ours", dtype="f32")
    assert_same_tensors(read_tensors(tmp_path / "ours"), reference)


@pytest.mark.parametrize("name", SELECTIONS)
def test_config_selecting_less_than_the_file_holds(name: str, llama: Path, full_adapter: Path, tmp_path: Path) -> None:
    """The file holds every module; the edited config selects some. Refused naming a module the config leaves
    out; with --allow-unused, equal to PEFT's merge, which leaves them out (before: merged, 4 to 21 tensors off)."""
    adapter = edited(full_adapter, tmp_path, **SELECTIONS[name])
    with pytest.raises(
        AdapterFormatError, match=r"module '[\w.]+' is not selected by adapter_config\.json.*--allow-unused"
    ):
        merge(llama, adapter, tmp_path / "refused", dtype="f32")
    assert not (tmp_path / "refused").exists()

    result = merge(llama, adapter, tmp_path / "ours", dtype="f32", allow_unused=True)
    reference = peft_merge(llama, adapter, tmp_path / "peft", torch.float32)
    assert_same_tensors(read_tensors(tmp_path / "ours"), reference)
    assert result.unused and all("lora_" in key for key in result.unused)
    assert 0 < result.tensors_merged < 14


def test_config_selecting_none_of_the_file_is_refused(
    llama: Path, full_adapter: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 16.4: target_modules that match none of the file's modules (PEFT refuses to load such an adapter)."""
    adapter = edited(full_adapter, tmp_path, target_modules=["query", "value"])
    with pytest.raises(AdapterFormatError, match=r"selects none of the 14 LoRA modules.*\['query', 'value'\]"):
        merge(llama, adapter, tmp_path / "refused", dtype="f32")
    with caplog.at_level(logging.WARNING):
        result = merge(llama, adapter, tmp_path / "allowed", dtype="f32", allow_unused=True)
    assert result.tensors_merged == 0 and len(result.unused) == 28
    assert (
        "and 13 more modules not selected by adapter_config.json ('model.layers.0.mlp.down_proj': not in "
        "target_modules)" in caplog.text
    )
    assert_same_tensors(read_tensors(tmp_path / "allowed"), read_tensors(llama))

    assert len(inspect_adapter(adapter).unselected) == 14
    report = inspect_adapter(adapter, llama)
    assert report.base_matches is False and "not selected by adapter_config.json" in report.mismatches[0]


def test_empty_target_modules_is_refused(full_adapter: Path, llama: Path, tmp_path: Path) -> None:
    """PEFT raises for `target_modules: []` (no target_parameters): nothing to adapt."""
    adapter = edited(full_adapter, tmp_path, target_modules=[])
    with pytest.raises(AdapterFormatError, match=r"'target_modules' is empty.*adapts nothing"):
        merge(llama, adapter, tmp_path / "out", dtype="f32", allow_unused=True)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"target_modules": "q_proj", "layers_to_transform": [0]}, "'layers_to_transform' cannot be used"),
        ({"layers_pattern": "layers"}, "'layers_to_transform' must be set too"),
        ({"layers_to_transform": ["0"]}, "'layers_to_transform' must be a layer number"),
        ({"layers_to_transform": [0], "layers_pattern": 3}, "'layers_pattern' must be a string"),
        ({"exclude_modules": [1]}, "'exclude_modules' must be a list of module names or a regex string"),
        ({"exclude_modules": "q_proj("}, "'exclude_modules' 'q_proj\\(' is not a usable regular expression"),
    ],
)
def test_selection_fields_peft_rejects(
    fields: dict[str, Any], message: str, full_adapter: Path, tmp_path: Path
) -> None:
    adapter = edited(full_adapter, tmp_path, **fields)
    with pytest.raises(AdapterFormatError, match=message):
        inspect_adapter(adapter)


# The oracle loads the adapter with PEFT, which warns of exactly the factors this test expects it to leave out.
@pytest.mark.filterwarnings("ignore:Found missing adapter keys while loading the checkpoint:UserWarning")
def test_all_linear_string_leaves_out_the_output_layer(llama: Path, tmp_path: Path) -> None:
    """target_modules='all-linear' unexpanded (PEFT expands it on save): the output layer is not selected."""
    adapter = make_adapter(llama, tmp_path / "adapter", "llama", target_modules=["q_proj", "lm_head"])
    adapter = edited(adapter, tmp_path, target_modules="all-linear")
    with pytest.raises(AdapterFormatError, match=r"'lm_head' is not selected.*output layer"):
        merge(llama, adapter, tmp_path / "refused", dtype="f32")
    merge(llama, adapter, tmp_path / "ours", dtype="f32", allow_unused=True)
    assert_same_tensors(read_tensors(tmp_path / "ours"), peft_merge(llama, adapter, tmp_path / "peft", torch.float32))


def test_use_qalora_on_a_plain_base_merges_as_lora(llama: Path, tmp_path: Path) -> None:
    """QA-LoRA applies to GPTQ layers only: on any other base PEFT merges it as plain LoRA."""
    adapter = make_adapter(llama, tmp_path / "adapter", "llama", use_qalora=True, qalora_group_size=16)
    assert json.loads((adapter / "adapter_config.json").read_text())["use_qalora"] is True
    merge(llama, adapter, tmp_path / "ours", dtype="f32")
    assert_same_tensors(read_tensors(tmp_path / "ours"), peft_merge(llama, adapter, tmp_path / "peft", torch.float32))


def test_overlapping_pattern_keys_are_warned(
    llama: Path, full_adapter: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    adapter = edited(full_adapter, tmp_path, alpha_pattern={"layers.0.self_attn.q_proj": 3, "q_proj": 5})
    with caplog.at_level(logging.WARNING):
        merge(llama, adapter, tmp_path / "ours", dtype="f32")
    assert (
        "alpha_pattern keys 'layers.0.self_attn.q_proj': 3, 'q_proj': 5 all match 'model.layers.0.self_attn.q_proj'"
        in caplog.text
    )
    assert "PEFT uses the first in the file ('layers.0.self_attn.q_proj')" in caplog.text
    caplog.clear()
    same_value = edited(full_adapter, tmp_path / "same", alpha_pattern={"layers.0.self_attn.q_proj": 5, "q_proj": 5})
    with caplog.at_level(logging.WARNING):
        merge(llama, same_value, tmp_path / "same-out", dtype="f32")
    assert "alpha_pattern keys" not in caplog.text


# --- the layout of square weights: by layer class, as PEFT decides --------------------------------------------


def gpt2_double_heads(directory: Path, with_config: bool = True) -> Path:
    """GPT2DoubleHeadsModel with a square `summary.summary` head (an nn.Linear in a gpt2-type model)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=2, n_positions=32, vocab_size=64, summary_proj_to_labels=False
    )
    model = transformers.GPT2DoubleHeadsModel(config)
    assert tuple(model.multiple_choice_head.summary.weight.shape) == (32, 32)
    model.save_pretrained(directory)
    if not with_config:
        (directory / "config.json").unlink()
    return directory


def double_heads_adapter(base: Path, directory: Path, targets: list[str]) -> Path:
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.GPT2DoubleHeadsModel.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(directory)
    return directory


def peft_double_heads_merge(base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    import transformers
    from peft import PeftModel

    model = transformers.GPT2DoubleHeadsModel.from_pretrained(base, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    return read_tensors(out)


def test_square_linear_in_a_gpt2_model_equals_peft(tmp_path: Path) -> None:
    """Issue 17.7: the square `summary` head is an nn.Linear (not transposed) beside Conv1D c_attn/c_proj."""
    base = gpt2_double_heads(tmp_path / "base")
    adapter = double_heads_adapter(base, tmp_path / "adapter", ["c_attn", "c_proj", "summary"])
    # PEFT saves the flag of the last layer it wrapped; the layout comes from the layer's class all the same
    reference = peft_double_heads_merge(base, adapter, tmp_path / "peft")
    merge(base, adapter, tmp_path / "ours", dtype="f32")
    assert_same_tensors(read_tensors(tmp_path / "ours"), reference)


def test_square_weight_without_config_json(tmp_path: Path) -> None:
    """No config.json: a square GPT-2-named weight is refused unless the adapter's non-square layers of those names
    show the layout; other names are nn.Linear."""
    with_config = gpt2_double_heads(tmp_path / "with-config")
    reference_adapter = double_heads_adapter(with_config, tmp_path / "adapter", ["c_attn", "c_proj", "summary"])
    reference = peft_double_heads_merge(with_config, reference_adapter, tmp_path / "peft")
    base = tmp_path / "no-config"
    base.mkdir()
    (base / "model.safetensors").write_bytes((with_config / "model.safetensors").read_bytes())

    # c_attn (32 -> 96) is non-square and stored (in, out): the square attn.c_proj is a Conv1D too
    merge(base, reference_adapter, tmp_path / "ours", dtype="f32")
    ours = read_tensors(tmp_path / "ours")
    assert_same_tensors({k: v for k, v in ours.items()}, {k: reference[k] for k in ours})

    only_square = double_heads_adapter(with_config, tmp_path / "only-square", ["attn.c_proj"])
    with pytest.raises(
        UnsupportedAdapter,
        match=r"'base_model\.model\.transformer\.h\.0\.attn\.c_proj' updates the square weight.*no config\.json",
    ):
        merge(base, only_square, tmp_path / "refused", dtype="f32")
    merge(with_config, only_square, tmp_path / "known", dtype="f32")


def test_square_conv1d_in_clvp_decoder_equals_peft(tmp_path: Path) -> None:
    """CLVP's decoder MLP is GPT-2's Conv1D (c_fc, c_proj) beside nn.Linear attention, in a non-gpt2 model_type."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    config = transformers.ClvpDecoderConfig(
        vocab_size=40,
        max_position_embeddings=32,
        max_text_tokens=16,
        n_positions=48,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        n_inner=32,
    )
    model = transformers.ClvpForCausalLM(config)
    base = tmp_path / "base"
    model.save_pretrained(base)
    peft_model = get_peft_model(
        transformers.ClvpForCausalLM.from_pretrained(base, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules=["c_fc", "c_proj", "q_proj", "out_proj"]),
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = PeftModel.from_pretrained(
        transformers.ClvpForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "adapter"
    ).merge_and_unload()
    merged.save_pretrained(tmp_path / "peft")
    merge(base, tmp_path / "adapter", tmp_path / "ours", dtype="f32")
    assert_same_tensors(read_tensors(tmp_path / "ours"), read_tensors(tmp_path / "peft"))


def test_mha_and_grouped_conv_and_conv3d_are_refused_by_name(tmp_path: Path) -> None:
    """Issue 17.12 and 17.9: LoRA on nn.MultiheadAttention, on a grouped Conv2d, on a 1x1x1 Conv3d."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(8, 2)
            self.grouped = torch.nn.Conv2d(8, 8, 3, groups=2)
            self.cube = torch.nn.Conv3d(4, 6, 1)

    torch.manual_seed(0)
    base = tmp_path / "base"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in Model().state_dict().items()}, base / "model.safetensors")
    (base / "config.json").write_text(json.dumps({"model_type": "custom"}))
    expected = {
        "attn": r"LoRA on nn\.MultiheadAttention 'attn' \(base tensor 'attn\.in_proj_weight'\)",
        "grouped": r"'base_model\.model\.grouped'.*a LoRA on a grouped convolution \(groups=2\), which PEFT",
        "cube": r"'base_model\.model\.cube' is a LoRA on a Conv3d with a \(1, 1, 1\) kernel, which PEFT cannot merge",
    }
    for target, message in expected.items():
        with pytest.warns(UserWarning) if target == "grouped" else _nothing():
            model = get_peft_model(Model(), LoraConfig(r=4, target_modules=[target]))
        model.save_pretrained(tmp_path / target)
        for allow_unused in (False, True):
            with pytest.raises(UnsupportedAdapter, match=message):
                merge(base, tmp_path / target, tmp_path / "out", dtype="f32", allow_unused=allow_unused)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def test_lora_on_an_empty_weight_is_refused(tmp_path: Path) -> None:
    """Issue 17.9: a (0, 16) weight was an internal error (an empty row block)."""
    from safetensors.torch import save_file

    base = tmp_path / "base"
    base.mkdir()
    save_file({"lin.weight": torch.zeros(0, 16), "other.weight": torch.ones(4, 4)}, base / "model.safetensors")
    (base / "config.json").write_text(json.dumps({"model_type": "custom"}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file(
        {
            "base_model.model.lin.lora_A.weight": torch.ones(2, 16),
            "base_model.model.lin.lora_B.weight": torch.ones(0, 2),
        },
        adapter / "adapter_model.safetensors",
    )
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["lin"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MergeError, match=r"'lin\.weight', which is empty \(0, 16\)"):
        merge(base, adapter, tmp_path / "out", dtype="f32")


def test_unselected_modules_in_a_combination(llama: Path, full_adapter: Path, tmp_path: Path) -> None:
    """Several adapters: the one whose config leaves modules out is named; with --allow-unused its left-out
    factors are listed in the coverage and the combination is the one without them."""
    from qlora_merge import verify

    excluded = edited(full_adapter, tmp_path / "excluded", exclude_modules=["down_proj"])
    other = make_adapter(llama, tmp_path / "other", "llama", seed=2, target_modules=["q_proj"])
    with pytest.raises(
        AdapterFormatError, match=r"excluded/edited/adapter_config\.json: module '.*down_proj' is not selected"
    ):
        merge(llama, [str(other), str(excluded)], tmp_path / "refused", dtype="f32")
    result = merge(llama, [str(other), str(excluded)], tmp_path / "ours", dtype="f32", allow_unused=True)
    rows = {row.adapter_key: row for row in result.coverage}
    left_out = [key for key, row in rows.items() if "not selected by adapter_config.json" in row.action]
    assert len(left_out) == 4 and all(key.startswith("#2 ") and "down_proj" in key for key in left_out)

    from safetensors.torch import load_file, save_file

    trimmed = edited(full_adapter, tmp_path / "trimmed")  # the same factors, without down_proj's in the file
    tensors = load_file(trimmed / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "down_proj" not in k}, trimmed / "adapter_model.safetensors")
    merge(llama, [str(other), str(trimmed)], tmp_path / "expected", dtype="f32")
    assert_same_tensors(read_tensors(tmp_path / "ours"), read_tensors(tmp_path / "expected"))
    assert verify(llama, [str(other), str(excluded)], tmp_path / "ours", allow_unused=True).ok
