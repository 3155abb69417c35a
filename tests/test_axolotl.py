"""--config: an axolotl training config merges as `axolotl merge-lora` would, into {output_dir}/merged/."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from tiny_checkpoints import llama_checkpoint

from qlora_merge import MergeError, merge_from_axolotl, read_axolotl_config
from qlora_merge.cli import main

# examples/llama-3/qlora-1b.yml from axolotl, with base_model pointing at a tiny local llama (filled in below).
LLAMA3_QLORA = """
base_model: {base}
# optionally might have model_type or tokenizer_type
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer

load_in_8bit: false
load_in_4bit: true
strict: false

datasets:
  - path: teknium/GPT4-LLM-Cleaned
    type: alpaca
dataset_prepared_path:
val_set_size: 0.1
output_dir: ./outputs/qlora-out

adapter: qlora
lora_model_dir:

sequence_len: 2048
sample_packing: true
eval_sample_packing: true
pad_to_sequence_len: true

lora_r: 4
lora_alpha: 8
lora_dropout: 0.05
lora_target_linear: true
lora_fan_in_fan_out:
lora_target_modules:
  - gate_proj
  - down_proj
  - up_proj
  - q_proj
  - v_proj
  - k_proj
  - o_proj

wandb_project:
wandb_entity:

gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 1
optimizer: paged_adamw_8bit
lr_scheduler: cosine
learning_rate: 0.0002

train_on_inputs: false
group_by_length: false
bf16: auto
fp16:
tf32: false

gradient_checkpointing: true
logging_steps: 1
flash_attention: true

warmup_steps: 10
evals_per_epoch: 4
saves_per_epoch: 1
weight_decay: 0.0
fsdp:
fsdp_config:
special_tokens:
  pad_token: "<|end_of_text|>"
"""


@pytest.fixture
def trained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """A working directory as axolotl leaves it after training: config.yml, and the adapter in its output_dir.
    Returns (base, adapter, config)."""
    base, adapter = llama_checkpoint(tmp_path / "models", layers=2)
    work = tmp_path / "work"
    shutil.copytree(adapter, work / "outputs" / "qlora-out")
    config = work / "config.yml"
    config.write_text(LLAMA3_QLORA.format(base=base))
    monkeypatch.chdir(work)  # axolotl's paths are relative to where it runs
    return base, adapter, config


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def same_files(first: Path, second: Path) -> None:
    """Every file of both outputs is there in the other with the same bytes (the model card names its inputs as
    they were given, so it is left out)."""
    names = sorted(p.name for p in first.iterdir() if p.name != "README.md")
    assert names == sorted(p.name for p in second.iterdir() if p.name != "README.md")
    assert any(name.endswith(".safetensors") for name in names)
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_config_merge_is_the_plain_merge_in_output_dir_merged(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, adapter, config = trained
    code, out, err = run("--config", str(config))
    assert code == 0, err
    merged = Path("outputs/qlora-out/merged")
    assert "dtype   : bf16" in out and "adapter : ./outputs/qlora-out" in out, "bf16: auto is bf16"
    # load_in_4bit: true merges into the round-tripped base, as `axolotl merge-lora` does
    plain = ["--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "plain"), "--base-quant", "nf4"]
    code, _, err = run(*plain)
    assert code == 0, err
    same_files(merged, tmp_path / "plain")


def test_command_line_flags_override_the_file(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, adapter, config = trained
    shutil.copytree(adapter, tmp_path / "elsewhere")  # axolotl trained into another output_dir
    code, out, err = run("--config", str(config), "--output_dir", str(tmp_path / "elsewhere"), "--dtype", "f16")
    assert code == 0, err
    assert "dtype   : f16" in out
    assert (tmp_path / "elsewhere" / "merged" / "model.safetensors").is_file()
    assert not Path("outputs/qlora-out/merged").exists()

    # --output_dir moves the adapter too (axolotl trained into it); --adapter keeps it where it is.
    code, _, err = run("--config", str(config), "--output-dir", str(tmp_path / "x"), "--adapter", str(adapter))
    assert code == 0, err
    code, _, err = run("--config", str(config), "--output", str(tmp_path / "exact"), "--base", str(base))
    assert code == 0, err
    same_files(tmp_path / "x" / "merged", tmp_path / "exact")


def test_lora_model_dir_is_the_adapter(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, adapter, config = trained
    values = yaml.safe_load(config.read_text()) | {"lora_model_dir": str(adapter), "output_dir": str(tmp_path / "o")}
    settings = read_axolotl_config(values)
    assert (settings.adapter, settings.output) == (str(adapter), tmp_path / "o" / "merged")
    result = merge_from_axolotl(values)
    assert result.output == tmp_path / "o" / "merged" and result.tensors_merged == 14
    from_path = merge_from_axolotl(config, output=tmp_path / "p")
    same_files(result.output, from_path.output)


DTYPES = [
    ({"bf16": "auto"}, "bf16"),
    ({"bf16": True, "fp16": False}, "bf16"),
    ({"bf16": False, "fp16": True}, "f16"),
    ({"bf16": False, "load_in_8bit": True}, "f16"),
    ({"bfloat16": True}, "bf16"),
    ({"float16": True}, "f16"),
    ({}, "f32"),
    ({"bf16": False, "fp16": None}, "f32"),
    ({"torch_dtype": "float16", "bf16": "auto"}, "f16"),
    ({"torch_dtype": "torch.bfloat16"}, "bf16"),
    ({"torch_dtype": "auto", "fp16": True}, "f16"),
]


@pytest.mark.parametrize(("flags", "dtype"), DTYPES, ids=[str(flags) for flags, _ in DTYPES])
def test_dtype_from_the_config_flags(flags: dict[str, Any], dtype: str) -> None:
    assert read_axolotl_config({"base_model": "org/m", "output_dir": "out", **flags}).dtype == dtype


def test_base_revision_and_token() -> None:
    values = {"base_model": "org/m", "revision_of_model": "v2", "output_dir": "o", "hf_use_auth_token": True}
    settings = read_axolotl_config(values)
    assert (settings.base, settings.adapter, settings.hf_token) == ("org/m@v2", "o", None)
    assert read_axolotl_config(values | {"hf_use_auth_token": "hf_abc"}).hf_token == "hf_abc"
    assert read_axolotl_config(values, base="other/base").base == "other/base"


BAD = [
    ("output_dir: out\nlora_r: 8\n", "'base_model' is missing"),
    ("base_model: org/m\nbf16: auto\n", "'output_dir' is missing"),
    ("base_model: [1, 2]\noutput_dir: out\n", "'base_model' must be a path or repo id"),
    ("base_model: org/m\noutput_dir: out\ntorch_dtype: int8\n", "'torch_dtype' 'int8' is not one of"),
    ("base_model: org/m\n  output_dir: : out\n", "not valid YAML"),
    ("- base_model\n", "expected a YAML mapping"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_configs_fail_in_one_line_naming_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "config.yml"
    config.write_text(text)
    code, _, err = run("--config", str(config))
    assert code == 2
    assert err.startswith(f"qlora-merge: error: {config}: ") and message in err and err.count("\n") == 1
    with pytest.raises(MergeError, match=message.replace("[", r"\[")):
        read_axolotl_config(config)


def test_missing_config_and_missing_flags(tmp_path: Path) -> None:
    code, _, err = run("--config", str(tmp_path / "nope.yml"))
    assert code == 2 and "axolotl config not found" in err
    with pytest.raises(SystemExit) as exit_info:
        run("--base", "b", "--output", "o")
    assert exit_info.value.code == 2
    code, _, err = run("--adapter", str(tmp_path / "a"), "--output", "o")  # no --base: the adapter's is read
    assert code == 2 and "adapter directory not found" in err, err
    (tmp_path / "a").mkdir()
    code, _, err = run("--adapter", str(tmp_path / "a"), "--output", "o")
    assert code == 2 and "adapter_config.json: not found" in err and "pass --base" in err, err


def test_config_with_verify_and_json(trained: tuple[Path, Path, Path]) -> None:
    _, _, config = trained
    code, out, err = run("--config", str(config), "--verify", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["output"] == "outputs/qlora-out/merged" and result["dtype"] == "bf16"
    assert set(result["inputs_sha256"]) >= {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"}


def test_a_4bit_config_merges_into_the_round_tripped_base(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """load_in_4bit / adapter: qlora merge into dequant(NF4(W)), as `axolotl merge-lora` does; --base-quant none
    merges into W as stored, and the 4-bit default shows in the base stage."""
    base, adapter, config = trained
    code, out, err = run("--config", str(config))
    assert code == 0, err
    assert "round-tripped through nf4 as QLoRA trained on it" in out
    code, _, err = run(
        "--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "nf4"), "--base-quant", "nf4"
    )
    assert code == 0, err
    same_files(Path("outputs/qlora-out/merged"), tmp_path / "nf4")

    code, out, err = run("--config", str(config), "--output", str(tmp_path / "off"), "--base-quant", "none")
    assert code == 0, err
    assert "round-tripped" not in out
    code, _, err = run("--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "plain"))
    assert code == 0, err
    same_files(tmp_path / "off", tmp_path / "plain")
    with pytest.raises(AssertionError):
        same_files(tmp_path / "off", tmp_path / "nf4")  # the round trip changes the weights


def test_base_quant_from_python_and_the_config(trained: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, config = trained
    found = read_axolotl_config(config)
    assert found.base_quant == "nf4"
    assert found.settings()["base_quant"] == "nf4"
    assert found.settings(base_quant="none")["base_quant"] == "none"
    assert found.settings(base_quant="fp4")["base_quant"] == "fp4"
    assert found.options().base_quant_type == "nf4"
    assert found.options(base_quant="none").base_quant_type is None
    from qlora_merge import MergeOptions

    assert found.options(MergeOptions(base_quant="none")).base_quant_type is None
    off = merge_from_axolotl(config, output=tmp_path / "off", base_quant="none")
    on = merge_from_axolotl(config, output=tmp_path / "on")
    with pytest.raises(AssertionError):
        same_files(off.output, on.output)
    assert "| base weights | round-tripped through nf4" in (on.output / "README.md").read_text()
    assert "round-tripped" not in (off.output / "README.md").read_text()


QUANT_KEYS = [
    ({"load_in_4bit": True}, "nf4"),
    ({"adapter": "qlora"}, "nf4"),
    ({"adapter": "qlora", "load_in_4bit": False}, "nf4"),  # axolotl's merge checks either
    ({"adapter": "lora"}, None),
    ({"adapter": "lora", "load_in_8bit": True}, None),  # axolotl merges an 8-bit LoRA into W as stored
    ({"load_in_4bit": False}, None),
    ({"load_in_4bit": True, "bnb_config_kwargs": {"bnb_4bit_quant_type": "fp4"}}, "fp4"),
    ({"adapter": "qlora", "bnb_4bit_quant_type": "fp4"}, "fp4"),
    ({"adapter": "qlora", "bnb_config_kwargs": {"bnb_4bit_use_double_quant": True, "blocksize": 64}}, "nf4"),
]


@pytest.mark.parametrize(("keys", "base_quant"), QUANT_KEYS, ids=[str(keys) for keys, _ in QUANT_KEYS])
def test_base_quant_from_the_config_keys(keys: dict[str, Any], base_quant: str | None) -> None:
    assert read_axolotl_config({"base_model": "org/m", "output_dir": "out", **keys}).base_quant == base_quant


BAD_QUANT = [
    ({"bnb_config_kwargs": {"bnb_4bit_use_double_quant": False}}, "'bnb_4bit_use_double_quant: false'"),
    ({"bnb_4bit_use_double_quant": False}, "'bnb_4bit_use_double_quant: false'"),
    ({"bnb_config_kwargs": {"blocksize": 128}}, "'blocksize: 128'"),
    ({"bnb_config_kwargs": {"bnb_4bit_quant_type": "int4"}}, "'bnb_4bit_quant_type' 'int4' is not nf4 or fp4"),
    ({"bnb_config_kwargs": [1]}, "'bnb_config_kwargs' must be a mapping"),
]


@pytest.mark.parametrize(("keys", "message"), BAD_QUANT, ids=[m for _, m in BAD_QUANT])
def test_4bit_settings_the_round_trip_cannot_reproduce_are_refused(
    keys: dict[str, Any], message: str, tmp_path: Path
) -> None:
    values = {"base_model": "org/m", "output_dir": "out", "adapter": "qlora", **keys}
    with pytest.raises(MergeError, match=message.replace("[", r"\[")) as error:
        read_axolotl_config(values)
    assert "\n" not in str(error.value)
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump(values))
    code, _, err = run("--config", str(config), "--dry-run")
    assert code == 2 and err.count("\n") == 1 and message in err, err
    if "mapping" in message:
        return
    assert "pass --base-quant none" in str(error.value)
    # a base_quant given settles it, and a LoRA config never round-trips, whatever its bnb keys say
    assert read_axolotl_config(values, base_quant="none").settings()["base_quant"] == "none"
    assert read_axolotl_config(values, base_quant="fp4").options().base_quant_type == "fp4"
    assert read_axolotl_config(values | {"adapter": "lora"}).settings()["base_quant"] is None


def test_base_quant_given_to_merge_from_axolotl_settles_the_config(
    trained: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from qlora_merge import MergeOptions

    _, _, config = trained
    values = yaml.safe_load(config.read_text()) | {"bnb_config_kwargs": {"bnb_4bit_use_double_quant": False}}
    with pytest.raises(MergeError, match="bnb_4bit_use_double_quant: false"):
        merge_from_axolotl(values, output=tmp_path / "refused")
    first = merge_from_axolotl(values, output=tmp_path / "a", base_quant="none")
    second = merge_from_axolotl(values, MergeOptions(base_quant="none"), output=tmp_path / "b")
    same_files(first.output, second.output)
    assert "round-tripped" not in (first.output / "README.md").read_text()


def test_a_quantized_base_in_a_qlora_config_is_merged_as_it_is(tmp_path: Path) -> None:
    """A *-bnb-4bit base_model is the 4-bit model training used: it is dequantized, not round-tripped (and the
    --base-quant refusal, meant for a flag given by hand, does not fire)."""
    base = tmp_path / "base-bnb-4bit"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "bitsandbytes"}}))
    found = read_axolotl_config({"base_model": str(base), "output_dir": "out", "adapter": "qlora"})
    assert found.base_quant is None
    full = tmp_path / "base"
    full.mkdir()
    (full / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert read_axolotl_config({"base_model": str(full), "output_dir": "out", "adapter": "qlora"}).base_quant == "nf4"
