"""What a new user meets first: dtype spellings, mistyped flags, swapped inputs, honest adapter lines, quiet library
output, the adapter's own base as the default --base, and the README agreeing with the commands."""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from factories import make_adapter, make_base, read_config, read_tensors

from qlora_merge import merge, read_axolotl_config
from qlora_merge.cli import build_parser, main
from qlora_merge.errors import InputNotFound, MergeError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("first-hour")
    base = make_base("llama", root / "base")
    return {
        "root": root,
        "base": base,
        "a": make_adapter(base, root / "a", "llama"),
        "b": make_adapter(base, root / "b", "llama", seed=2, target_modules=["q_proj", "v_proj"]),
    }


def run(*argv: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([str(arg) for arg in argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> str:
    """The one stderr line of a usage error (argparse exits 2 through SystemExit)."""
    with pytest.raises(SystemExit) as exited:
        main([str(arg) for arg in argv], out=io.StringIO(), err=io.StringIO())
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "usage:" not in err, err
    return err


# 1. dtype spellings


@pytest.mark.parametrize(
    ("spelling", "canonical", "torch_name"),
    [("fp16", "f16", "float16"), ("float16", "f16", "float16"), ("half", "f16", "float16"),
     ("bfloat16", "bf16", "bfloat16"), ("fp32", "f32", "float32"), ("float32", "f32", "float32")],
)  # fmt: skip
def test_usual_dtype_spellings_are_accepted(
    llama: dict[str, Path], tmp_path: Path, spelling: str, canonical: str, torch_name: str
) -> None:
    code, out, err = run(
        "--base", llama["base"], "--adapter", llama["a"], "--output", tmp_path / "m", "--dtype", spelling
    )
    assert code == 0, err
    assert f"dtype   : {canonical}" in out.splitlines()
    assert read_config(tmp_path / "m")["dtype"] == torch_name
    assert f"| dtype | {canonical} |" in (tmp_path / "m" / "README.md").read_text()


def test_dtype_spellings_in_the_python_api_and_axolotl_configs(llama: dict[str, Path], tmp_path: Path) -> None:
    result = merge(llama["base"], llama["a"], tmp_path / "m", dtype="half")
    assert result.dtype == "f16"
    config = {"base_model": "org/base", "output_dir": str(tmp_path / "run")}
    assert read_axolotl_config({**config, "torch_dtype": "fp16"}).dtype == "f16"
    assert read_axolotl_config({**config, "torch_dtype": "torch.bfloat16"}).dtype == "bf16"
    assert read_axolotl_config(config, dtype="float32").dtype == "f32"
    with pytest.raises(MergeError, match=r"--dtype 'fp8'.*bf16, f16, f32"):
        merge(llama["base"], llama["a"], tmp_path / "x", dtype="fp8")


def test_an_unknown_dtype_is_one_line_naming_the_choices(
    llama: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = usage_error(
        capsys, "--base", llama["base"], "--adapter", llama["a"], "--output", tmp_path / "m", "--dtype", "q4"
    )
    assert "'q4' is not a dtype" in err and "bf16, f16, f32" in err and "fp16" in err
    assert not (tmp_path / "m").exists()


# 2. mistyped flags, `help`


@pytest.mark.parametrize(
    ("typo", "meant"),
    [("--ouput", "--output"), ("--adaptor", "--adapter"), ("--overwite", "--overwrite"), ("--dtpye=f16", "--dtype")],
)
def test_a_mistyped_flag_gets_the_closest_one_on_one_line(
    llama: dict[str, Path], capsys: pytest.CaptureFixture[str], typo: str, meant: str
) -> None:
    err = usage_error(capsys, "--base", llama["base"], "--adapter", llama["a"], typo, "x")
    assert f"unrecognized argument {typo.split('=')[0]}: did you mean {meant}?" in err, err


def test_subcommands_suggest_their_own_flags(llama: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(capsys, "verify", "--adapter", llama["a"], "--mergd", "x")
    assert err.startswith("qlora-merge verify: error:") and "did you mean --merged?" in err
    err = usage_error(capsys, "inspect", llama["a"], "--bsae", "x")
    assert "did you mean --base?" in err


def test_help_as_a_word_prints_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, start in ((["help"], "usage: qlora-merge [--base"), (["help", "verify"], "usage: qlora-merge verify")):
        with pytest.raises(SystemExit) as exited:
            main(argv, out=io.StringIO(), err=io.StringIO())
        assert exited.value.code == 0
        assert capsys.readouterr().out.startswith(start)


def test_the_usage_line_lists_the_subcommands() -> None:
    usage = build_parser().format_usage()
    assert "qlora-merge verify" in usage and "qlora-merge inspect" in usage and "--config" in usage


# 3. swapped inputs


def test_swapped_base_and_adapter_are_named_as_such(
    llama: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    code, _, err = run("--base", llama["a"], "--adapter", llama["base"], "--output", tmp_path / "m")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "look swapped" in err and str(llama["a"]) in err and str(llama["base"]) in err
    assert not [r for r in caplog.records if r.levelname == "WARNING"], "no misleading warning before the error"
    assert not (tmp_path / "m").exists()


def test_an_adapter_as_base_or_a_model_as_adapter_is_named(llama: dict[str, Path], tmp_path: Path) -> None:
    code, _, err = run("--base", llama["a"], "--adapter", llama["b"], "--output", tmp_path / "m")
    assert code == 2 and "holds a LoRA adapter" in err and "pass it as --adapter" in err, err
    code, _, err = run("--base", llama["base"], "--adapter", llama["base"], "--output", tmp_path / "m")
    assert code == 2 and "holds a model" in err and "not a LoRA adapter" in err, err


# 4. honest adapter lines


def test_a_weighted_adapter_shows_its_own_r_and_alpha_and_the_weight_apart(
    llama: dict[str, Path], tmp_path: Path
) -> None:
    code, out, err = run("--base", llama["base"], "--adapter", f"{llama['a']}:0.5", "--output", tmp_path / "m")
    assert code == 0, err
    assert "Adapter loaded: 14 LoRA modules, r=4, alpha=8, weight 0.5" in out, out
    code, out, err = run(
        "--base", tmp_path / "m", "--adapter", f"{llama['a']}:0.5", "--subtract", "--output", tmp_path / "s"
    )
    assert code == 0, err
    assert "r=4, alpha=8, weight 0.5, subtracted" in out and "alpha=-" not in out, out
    assert "Subtracting the adapters' deltas from the base weights" in out


def test_several_adapters_say_so_and_one_adapter_has_no_combination(llama: dict[str, Path], tmp_path: Path) -> None:
    code, out, err = run(
        "--base", llama["base"], "--adapter", llama["a"], "--adapter", llama["b"], "--output", tmp_path / "m"
    )
    assert code == 0, err
    assert "Loading LoRA adapters" in out and "Merging adapters into base weights" in out
    code, out, err = run("--base", llama["base"], "--adapter", llama["a"], "--output", tmp_path / "one", "--json")
    assert code == 0, err
    assert json.loads(out)["combination"] is None


# 5. library output stays out of ours


def test_verify_logits_prints_no_library_bars_or_warnings(
    llama: dict[str, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    merge(llama["base"], llama["a"], tmp_path / "m", dtype="f32")
    argv = ["verify", "--base", llama["base"], "--adapter", llama["a"], "--merged", tmp_path / "m", "--logits"]
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        code, out, err = run(*argv)
    captured = capfd.readouterr()
    assert code == 0, err
    assert "Loading weights" not in captured.err + captured.out + err
    assert [str(w.message) for w in seen] == []
    assert "Logits: max difference" in out and "Verified" in out
    caplog.set_level(logging.DEBUG, logger="qlora_merge")  # what --debug turns on: then they show
    code, _, _ = run(*argv)
    assert code == 0 and "Loading weights" in capfd.readouterr().err


# 7. short error lines


def test_a_module_matching_no_base_tensor_is_one_short_line(llama: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "stray"
    shutil.copytree(llama["a"], adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    for module in ("rotary", "gate"):
        for factor, shape in (("lora_A", (8, 64)), ("lora_B", (64, 8))):
            key = f"base_model.model.model.layers.0.self_attn.{module}.{factor}.weight"
            tensors[key] = torch.zeros(shape)
    save_file(tensors, adapter / "adapter_model.safetensors")
    code, _, err = run("--base", llama["base"], "--adapter", adapter, "--output", tmp_path / "out")
    assert code != 0 and not (tmp_path / "out").exists()
    (line,) = err.splitlines()
    named = r"module 'model\.layers\.0\.self_attn\.(rotary|gate)' \(and 1 more modules\) matches no tensor"
    assert re.search(named, line), line
    assert line.endswith("pass --allow-unused to merge without it")
    # Without the path it names, the line reads at a glance: no repeated keys, no tensor kinds.
    assert len(line.replace(str(adapter / "adapter_model.safetensors"), "FILE")) < 180, line
    assert line.count("self_attn") == 1


# 6. README


def test_the_readme_flag_table_has_every_flag() -> None:
    readme = (ROOT / "README.md").read_text()
    table = {m for m in re.findall(r"^\| `(--[a-z-_]+)`", readme, flags=re.MULTILINE)}
    flags = {
        option
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--") and option not in ("--help", "--output-dir")
    }
    assert flags <= table, f"missing from the README's flag table: {sorted(flags - table)}"


# 8. warnings from the libraries the tests drive are filtered by their text


def test_known_library_warnings_are_filtered_and_new_ones_are_not() -> None:
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn(
            "Model with `tie_word_embeddings=True` and the tied_target_modules=['lm_head'] ...",
            UserWarning,
            stacklevel=1,
        )
        warnings.warn(
            "Adapter 'default': 4 LoRA tensor(s) have invalid shape: x.lora_B.bias:(64,)", UserWarning, stacklevel=1
        )
        warnings.warn(
            "`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1
        )
        warnings.warn("something new from a library", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something new from a library"]


# 9. make demo does not reinstall a current venv


def test_make_install_skips_pip_when_the_venv_is_current(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.fail("make is needed to check the Makefile")
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    for name in ("pyproject.toml", "setup.py", "src/qlora_merge/merging/fused.c"):  # what the install stamp follows
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").write_text("")

    def planned(target: str) -> str:
        done = subprocess.run(["make", "-n", target, "VENV=venv"], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "pip install" in planned("install") and "pip install" in planned("install-test")
    for line in planned("install-test").splitlines():  # what make would do, run for real but for pip
        if line.startswith("touch "):
            subprocess.run(line, shell=True, cwd=tmp_path, check=True)
    assert "pip install" not in planned("install") and "pip install" not in planned("install-test")
    assert "qlora-merge" in planned("demo") and "pip install" not in planned("demo")
    (tmp_path / "pyproject.toml").touch()  # a changed pyproject installs again
    subprocess.run(["touch", "-d", "+1 minute", "pyproject.toml"], cwd=tmp_path, check=True)
    assert "pip install" in planned("install")


# 10. the adapter's own base by default


def test_the_base_defaults_to_the_one_the_adapter_names(llama: dict[str, Path], tmp_path: Path) -> None:
    code, out, err = run("--adapter", llama["a"], "--output", tmp_path / "m")
    assert code == 0, err
    assert out.splitlines()[0] == (
        f"base    : {llama['base']}  (base_model_name_or_path in {llama['a'] / 'adapter_config.json'})"
    )
    merge(llama["base"], llama["a"], tmp_path / "explicit")
    assert read_tensors(tmp_path / "m").keys() == read_tensors(tmp_path / "explicit").keys()
    for name in ("model.safetensors",):
        assert (tmp_path / "m" / name).read_bytes() == (tmp_path / "explicit" / name).read_bytes()
    assert merge(None, llama["a"], tmp_path / "api").base == llama["base"]


def test_a_relative_base_is_read_beside_the_adapter_too(llama: dict[str, Path], tmp_path: Path) -> None:
    adapter = tmp_path / "runs" / "adapter"
    shutil.copytree(llama["a"], adapter)
    shutil.copytree(llama["base"], tmp_path / "runs" / "base")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "../base"}))
    assert merge(None, adapter, tmp_path / "m").base == tmp_path / "runs" / "base"


def test_a_named_base_that_is_missing_or_differs_is_refused(llama: dict[str, Path], tmp_path: Path) -> None:
    adapter = tmp_path / "moved"
    shutil.copytree(llama["a"], adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "/no/such/base"}))
    code, _, err = run("--adapter", adapter, "--output", tmp_path / "m")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "'/no/such/base' is not a directory here" in err and "pass --base" in err
    with pytest.raises(InputNotFound, match="pass --base"):
        merge(None, adapter, tmp_path / "m")
    other = tmp_path / "other"
    shutil.copytree(llama["b"], other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/another"}))
    code, _, err = run("--adapter", llama["a"], "--adapter", other, "--output", tmp_path / "m")
    assert code == 2 and "name different bases" in err and "pass --base" in err, err
    assert not (tmp_path / "m").exists()


def test_an_error_line_is_capped_unless_debug(llama: dict[str, Path], tmp_path: Path) -> None:
    """Whatever an input puts into a message (here a 5,000-character base path), the error stays one readable line."""
    missing = tmp_path / ("x" * 200) / ("y" * 200) / ("z" * 200) / ("w" * 200) / ("v" * 200) / "base"
    code, _, err = run("--base", missing, "--adapter", llama["a"], "--output", tmp_path / "out")
    (line,) = err.splitlines()
    assert code == 2 and len(line) < 1100 and "characters cut; --debug shows them" in line, line
    assert line.endswith("base model directory not found"), line  # the problem stays, at the end
    code, _, err = run("--base", missing, "--adapter", llama["a"], "--output", tmp_path / "out", "--debug")
    assert code == 2 and any(str(missing) in line for line in err.splitlines())
