"""The benchmarked tools: how to invoke each one on a case, and where its merged checkpoint lands.

Every tool is a separate child process run on the same warm input files. Floors (``cp``, direct-I/O
write, direct-I/O read, and both at once) bound what any merge can achieve; ``start-up`` is our CLI's dry run (all a
merge does before writing); merges produce a checkpoint that the runner
spot-checks against PEFT's.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "AXOLOTL_DO_NOT_TRACK": "1",
}

OURS = "qlora-merge"
PEFT = "peft"
AXOLOTL = "axolotl"
DIRECT_WRITE = "direct-write"
DIRECT_READ = "direct-read"
DIRECT_READ_WRITE = "direct-read+write"
STARTUP = "start-up"


@dataclass(frozen=True)
class Case:
    """One model size's generated inputs."""

    size: str
    base: Path
    adapter: Path
    shards: tuple[Path, ...]

    @property
    def shard_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.shards)

    @property
    def input_files(self) -> tuple[Path, ...]:
        return (*self.shards, *sorted(self.adapter.glob("*.safetensors")))


CommandBuilder = Callable[[Case, Path], list[str]]


@dataclass(frozen=True)
class Tool:
    """A benchmarked command. ``merged_subdir`` is where a merge tool leaves its checkpoint in its output."""

    name: str
    is_merge: bool
    command: CommandBuilder
    env: dict[str, str] = field(default_factory=dict)
    precreate_output: bool = False
    merged_subdir: str = ""


def cp_command(case: Case, out: Path) -> list[str]:
    """Floor 1: copy the shards."""
    return ["cp", "--", *map(str, case.shards), str(out)]


def direct_write_command(case: Case, out: Path) -> list[str]:
    """Floor 2: O_DIRECT write of files with the shards' sizes."""
    sizes = [str(path.stat().st_size) for path in case.shards]
    return [sys.executable, str(BENCH_DIR / "floors.py"), "write", str(out), *sizes]


def direct_read_command(case: Case, out: Path) -> list[str]:
    """Cold-read floor: O_DIRECT read of the shards."""
    return [sys.executable, str(BENCH_DIR / "floors.py"), "read", *map(str, case.shards)]


def direct_read_write_command(case: Case, out: Path) -> list[str]:
    """Cold floor: O_DIRECT read of the shards while writing files of their sizes, at once."""
    return [sys.executable, str(BENCH_DIR / "floors.py"), "readwrite", str(out), *map(str, case.shards)]


def startup_command(case: Case, out: Path) -> list[str]:
    """Our start-up: the CLI up to the first byte a merge writes (imports, adapter, headers, plan), as --dry-run."""
    return [*ours_command(case, out), "--dry-run"]


def ours_command(case: Case, out: Path) -> list[str]:
    """Our streaming merge through its CLI."""
    return [
        sys.executable,
        "-m",
        "qlora_merge",
        *("--base", str(case.base), "--adapter", str(case.adapter), "--output", str(out)),
        *("--dtype", "bf16", "--overwrite"),
    ]


def peft_command(case: Case, out: Path) -> list[str]:
    """PEFT's load, merge_and_unload, save_pretrained."""
    script = str(BENCH_DIR / "peft_reference.py")
    return [sys.executable, script, "--base", str(case.base), "--adapter", str(case.adapter), "--output", str(out)]


def peft_dequantize_command(case: Case, out: Path) -> list[str]:
    """PEFT's merge from a bitsandbytes 4-bit base: load 4-bit, ``dequantize()``, merge_and_unload, save_pretrained."""
    return [*peft_command(case, out), "--dequantize"]


def axolotl_config(case: Case, out: Path) -> dict[str, object]:
    """An axolotl 0.19 config that asks for its shard-by-shard ``memory_efficient`` LoRA merge.

    axolotl validates a merge config with its training schema, so the training fields it requires
    (datasets, learning rate, batch and epoch counts, sequence length) are present but never used.
    The LoRA kernel flags are set off only to silence its "auto-enabling" warning; they do not affect
    the merge, which writes ``{output_dir}/merged``.
    """
    adapter = json.loads((case.adapter / "adapter_config.json").read_text())
    return {
        "base_model": str(case.base),
        "adapter": "lora",
        "lora_model_dir": str(case.adapter),
        "lora_r": adapter["r"],
        "lora_alpha": adapter["lora_alpha"],
        "lora_dropout": adapter["lora_dropout"],
        "lora_target_modules": adapter["target_modules"],
        "lora_mlp_kernel": False,
        "lora_qkv_kernel": False,
        "lora_o_kernel": False,
        "merge_method": "memory_efficient",
        "bf16": True,
        "output_dir": str(out),
        "datasets": [{"path": "unused-for-merge", "type": "alpaca"}],
        "learning_rate": 2e-4,
        "micro_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "num_epochs": 1,
        "sequence_len": 2048,
    }


def axolotl_builder(python: Path, config_dir: Path) -> CommandBuilder:
    """Command builder for ``axolotl.cli.merge_lora`` run by ``python`` (a separate env with axolotl)."""

    def build(case: Case, out: Path) -> list[str]:
        config_dir.mkdir(parents=True, exist_ok=True)
        config = config_dir / f"axolotl-{case.size}.yml"
        config.write_text(json.dumps(axolotl_config(case, out), indent=2) + "\n")
        return [str(python), "-m", "axolotl.cli.merge_lora", str(config)]

    return build


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """The runner's environment, forced offline, plus ``extra``."""
    return {**os.environ, **OFFLINE_ENV, **extra}


def ours_env() -> dict[str, str]:
    """Put the repository's ``src/`` first on the path so the working tree's package is what runs."""
    existing = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT / "src"), existing]))}


def all_tools(axolotl_python: Path | None, config_dir: Path, quantized: bool = False) -> list[Tool]:
    """Every tool in run order; axolotl only when a python for it is given.

    For a quantized base only the two merges run: ours, and PEFT from the dequantized model. The floors copy the
    (4-bit) input's bytes, a third of what a merge writes, so they would bound nothing; axolotl is left out.
    """
    if quantized:
        return [
            Tool(OURS, is_merge=True, command=ours_command, env=ours_env()),
            Tool(PEFT, is_merge=True, command=peft_dequantize_command),
        ]
    tools = [
        Tool("cp", is_merge=False, command=cp_command, precreate_output=True),
        Tool(DIRECT_WRITE, is_merge=False, command=direct_write_command),
        Tool(DIRECT_READ, is_merge=False, command=direct_read_command),
        Tool(DIRECT_READ_WRITE, is_merge=False, command=direct_read_write_command),
        Tool(STARTUP, is_merge=False, command=startup_command, env=ours_env()),
        Tool(OURS, is_merge=True, command=ours_command, env=ours_env()),
        Tool(PEFT, is_merge=True, command=peft_command),
    ]
    if axolotl_python is not None:
        builder = axolotl_builder(axolotl_python, config_dir)
        tools.append(Tool(AXOLOTL, is_merge=True, command=builder, merged_subdir="merged"))
    return tools
