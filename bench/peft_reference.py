"""PEFT's merge, the way users run it: load the whole model, attach the adapter, merge, save.

Run as a child process by the runner so that its peak RSS is measured on its own.

Usage: python bench/peft_reference.py --base BASE --adapter ADAPTER --output OUT
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def merge(base: Path, adapter: Path, output: Path) -> None:
    """Load ``base`` in bf16, apply ``adapter``, merge it into the weights and save to ``output``."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(output)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    merge(args.base, args.adapter, args.output)


if __name__ == "__main__":
    main()
