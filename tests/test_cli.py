"""The command line on a tiny llama: the seed-style stage log, --json, --dtype, --max-shard-size, exit codes."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from factories import make_adapter, make_base, read_config, read_tensors

import qlora_merge
from qlora_merge.cli import main

DONE_TENSORS = 21  # tiny llama: embed, lm_head, final norm, 2 layers x (7 projections + 2 norms)
MERGED = 14  # 2 layers x 7 projections
MARKS = ("⏳", "✅", "💾")
TIMING = r"\(\d+(\.\d+)?s\)$"
ELLIPSIS = r"(…|\.\.\.)$"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    base = make_base("llama", root / "base")
    return base, make_adapter(base, root / "adapter", "llama")


def run(llama: tuple[Path, Path], output: Path, *args: str, encoding: str = "utf-8") -> tuple[int, str, str]:
    """main() with stdout a real text stream of the given encoding (as a terminal or a pipe would be)."""
    base, adapter = llama
    raw = io.BytesIO()
    out, err = io.TextIOWrapper(raw, encoding=encoding), io.StringIO()
    code = main(["--base", str(base), "--adapter", str(adapter), "--output", str(output), *args], out=out, err=err)
    out.flush()
    return code, raw.getvalue().decode(encoding), err.getvalue()


CASES = [
    ([], ["dtype   : bf16", f"{MERGED} tensors merged, {DONE_TENSORS - MERGED} copied", "in 1 shard(s)"], 0),
    (["--dtype", "f16"], ["dtype   : f16", f"{MERGED} tensors merged"], 0),
    (["--dtype", "f32"], ["dtype   : f32", f"{MERGED} tensors merged"], 0),
    (["--max-shard-size", "40KB"], ["dtype   : bf16", "shard(s)"], 0),
    (["--loader", "LlamaForCausalLM"], ["loader  : LlamaForCausalLM"], 0),
    (["--loader", "auto"], ["loader  : LlamaForCausalLM"], 0),
    (["--max-shard-size", "abc"], ["dtype   : bf16"], 2),
    (["--loader", "not an architecture!"], ["dtype   : bf16"], 2),
]


@pytest.mark.parametrize(("args", "fragments", "code"), CASES, ids=[" ".join(c[0]) or "defaults" for c in CASES])
def test_cli_table(llama: tuple[Path, Path], tmp_path: Path, args: list[str], fragments: list[str], code: int) -> None:
    output = tmp_path / "out"
    exit_code, stdout, stderr = run(llama, output, *args)
    assert exit_code == code, stderr
    for fragment in fragments:
        assert fragment in stdout, f"{fragment!r} not in:\n{stdout}"
    if code == 0:
        assert stderr == ""
        assert stdout.splitlines()[-1] == f"✅ Done. Merged model: {output}"
        assert (output / "config.json").is_file()
    else:
        assert len(stderr.splitlines()) == 1 and stderr.startswith("qlora-merge: error: "), stderr
        assert "Done" not in stdout
        assert list(tmp_path.iterdir()) == []


def test_stage_log_has_the_seed_format(llama: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = llama
    output = tmp_path / "out"
    code, stdout, _ = run(llama, output)
    assert code == 0
    lines = stdout.splitlines()
    assert lines[:4] == [f"base    : {base}", f"adapter : {adapter}", f"output  : {output}", "dtype   : bf16"]
    assert lines[4].startswith("loader  : ")
    assert sum(bool(re.fullmatch(r"RAM : \d+(\.\d+)? GB free / \d+(\.\d+)? GB total", line)) for line in lines) == 1

    stage_lines = [line for line in lines[:-1] if line.startswith(MARKS)]
    starts, dones = stage_lines[0::2], stage_lines[1::2]
    expected = [
        (r"⏳ Loading base model\b.*", r"✅ Base model indexed\b.*", True),
        (r"⏳ Loading tokenizer\b.*", r"✅ Tokenizer files found\b.*", False),
        (r"⏳ Loading LoRA adapter\b.*", rf"✅ Adapter loaded: {MERGED} LoRA modules, r=4, alpha=8\b.*", False),
        (r"⏳ Merging\b.*", rf"✅ Merged: {MERGED} merged, {DONE_TENSORS - MERGED} copied\b.*", True),
        (rf"💾 Saving merged model to '{re.escape(str(output))}'.*", r"✅ Saved\b.*", True),
    ]
    assert len(stage_lines) == 2 * len(expected), stdout
    for start, done, (start_re, done_re, timed) in zip(starts, dones, expected, strict=True):
        assert re.fullmatch(start_re, start) and re.search(ELLIPSIS, start), start
        assert re.fullmatch(done_re, done), done
        assert bool(re.search(TIMING, done)) == timed, f"timing in parentheses expected={timed}: {done}"
    assert lines.index(stage_lines[0]) > 4, "stages come after the header"
    assert lines[-1] == f"✅ Done. Merged model: {output}"


def test_ascii_stdout_gets_ascii_marks(llama: tuple[Path, Path], tmp_path: Path) -> None:
    output = tmp_path / "out"
    code, stdout, stderr = run(llama, output, encoding="ascii")
    assert code == 0, stderr
    assert stdout.isascii()
    assert stdout.splitlines()[-1] == f"ok Done. Merged model: {output}"
    assert len(read_tensors(output)) == DONE_TENSORS


def test_json_prints_only_the_result(llama: tuple[Path, Path], tmp_path: Path) -> None:
    output = tmp_path / "out"
    code, stdout, stderr = run(llama, output, "--json")
    assert code == 0 and stderr == ""
    result = json.loads(stdout)  # the whole of stdout is one JSON object
    assert isinstance(result, dict)
    assert {"output", "dtype", "shards", "tensors_merged", "tensors_copied", "bytes_written", "timings"} <= set(result)
    assert result["output"] == str(output)
    assert result["dtype"] == "bf16"
    assert result["shards"] == ["model.safetensors"]
    assert result["tensors_merged"] == MERGED
    assert result["tensors_copied"] == DONE_TENSORS - MERGED
    tensors = read_tensors(output)
    assert result["bytes_written"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert {"base", "merge", "save"} <= set(result["timings"])
    assert all(isinstance(v, float) and v >= 0 for v in result["timings"].values())


def test_json_error_leaves_stdout_empty(llama: tuple[Path, Path], tmp_path: Path) -> None:
    code, stdout, stderr = run(llama, tmp_path / "out", "--json", "--max-shard-size", "abc")
    assert code == 2
    assert stdout == ""
    assert stderr.startswith("qlora-merge: error: --max-shard-size") and len(stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("flag", "dtype", "name"),
    [("f16", torch.float16, "float16"), ("f32", torch.float32, "float32"), ("bf16", torch.bfloat16, "bfloat16")],
)
def test_dtype_flag(llama: tuple[Path, Path], tmp_path: Path, flag: str, dtype: torch.dtype, name: str) -> None:
    base, _ = llama
    output = tmp_path / "out"
    code, _, stderr = run(llama, output, "--dtype", flag)
    assert code == 0, stderr
    merged, original = read_tensors(output), read_tensors(base)
    assert sorted(merged) == sorted(original)
    assert {t.dtype for t in merged.values()} == {dtype}
    assert read_config(output)["dtype"] == name
    embed = "model.embed_tokens.weight"
    assert torch.equal(merged[embed], original[embed].to(dtype)), "unadapted tensors are only converted"
    assert not torch.equal(merged[Q_PROJ], original[Q_PROJ].to(dtype)), "adapted tensors are merged"


def test_max_shard_size_makes_shards_and_an_index(llama: tuple[Path, Path], tmp_path: Path) -> None:
    output = tmp_path / "out"
    code, stdout, _ = run(llama, output, "--max-shard-size", "40KB")
    assert code == 0
    shards = sorted(p.name for p in output.glob("*.safetensors"))
    n = len(shards)
    assert n > 1
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert f"in {n} shard(s)" in stdout
    index = json.loads((output / "model.safetensors.index.json").read_text())
    tensors = read_tensors(output)
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
    assert len(tensors) == DONE_TENSORS


def test_python_m_help() -> None:
    done = subprocess.run([sys.executable, "-m", "qlora_merge", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: qlora-merge")
    for flag in ("--base", "--adapter", "--output", "--dtype", "--loader", "--max-shard-size", "--json", "--debug"):
        assert flag in done.stdout


def test_console_script_version() -> None:
    script = Path(sys.executable).parent / "qlora-merge"
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"qlora-merge {qlora_merge.__version__}"


def test_process_exit_code_and_stderr_on_bad_input(llama: tuple[Path, Path], tmp_path: Path) -> None:
    """In a real process: exit status 2, one stderr line naming the file, no traceback, no log noise."""
    _, adapter = llama
    missing = tmp_path / "no-such-base"
    command = [sys.executable, "-m", "qlora_merge", "--base", str(missing), "--adapter", str(adapter)]
    done = subprocess.run([*command, "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"qlora-merge: error: {missing}") and "not found" in line, line
    assert list(tmp_path.iterdir()) == []
