"""PEFT's merge, the way users run it: load the whole model, attach the adapter, merge, save.

Run as a child process by the runner so that its peak RSS is measured on its own.

For a bitsandbytes 4-bit base (``--dequantize``) it takes the path a user takes today to get a 16-bit merged
checkpoint: transformers loads the 4-bit model on CPU (the ``quantization_config`` in its config.json makes every
linear layer a ``bnb.nn.Linear4bit``), ``model.dequantize()`` turns those back into bf16 ``nn.Linear`` layers with
bitsandbytes' ``dequantize_4bit``, then PEFT attaches the adapter, ``merge_and_unload()`` and ``save_pretrained``.
Merging into the ``Linear4bit`` layers first instead would re-quantize every merged weight to 4 bits (PEFT's
``Linear4bit.merge``), so a 16-bit checkpoint made that way carries a second rounding: not what a user wants.

Usage: python bench/peft_reference.py --base BASE --adapter ADAPTER --output OUT [--dequantize]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def merge(base: Path, adapter: Path, output: Path, dequantize: bool = False) -> None:
    """Load ``base`` in bf16 (dequantized from 4 bits when ``dequantize``), apply ``adapter``, merge, save."""
    if dequantize:
        quantized = AutoModelForCausalLM.from_pretrained(base, device_map="cpu", dtype=torch.bfloat16)
        if not getattr(quantized, "is_quantized", False):
            raise SystemExit(f"{base}: --dequantize given, but transformers did not load a quantized model")
        model = quantized.dequantize()
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(output)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument(
        "--dequantize", action="store_true", help="the base is bitsandbytes 4-bit: load it so, dequantize, merge"
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    merge(args.base, args.adapter, args.output, args.dequantize)


if __name__ == "__main__":
    main()
