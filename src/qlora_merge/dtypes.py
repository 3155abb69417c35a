"""Output dtype names: the canonical short names (bf16, f16, f32) and the spellings people use for them."""

from __future__ import annotations

from .errors import MergeError

CANONICAL_DTYPES = ("bf16", "f16", "f32")
# canonical name -> the tensor dtype's name in safetensors headers and the plan; that name -> config.json's "dtype"
OUTPUT_DTYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32"}
TORCH_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}

# axolotl configs, guides and torch spell the same three dtypes many ways; all of them mean what they say.
DTYPE_ALIASES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "f16": "f16",
    "fp16": "f16",
    "float16": "f16",
    "half": "f16",
    "f32": "f32",
    "fp32": "f32",
    "float32": "f32",
    "float": "f32",
}


def canonical_dtype(name: str) -> str:
    """`fp16`, `float16`, `half`, `torch.float16` ... -> `f16` (likewise bf16, f32); MergeError for anything else."""
    key = str(name).strip().lower().removeprefix("torch.")
    try:
        return DTYPE_ALIASES[key]
    except KeyError:
        raise MergeError(
            f"--dtype {name!r}: expected one of {', '.join(CANONICAL_DTYPES)} (or fp16, float16, half, bfloat16, "
            "fp32, float32)"
        ) from None
