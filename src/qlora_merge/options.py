"""One frozen options object for a merge: the CLI, an axolotl --config and Python callers all build a MergeOptions."""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass
from typing import Any

from .dtypes import canonical_dtype
from .errors import MergeError


class Combination(enum.Enum):
    """How several adapters become one, as PEFT's `add_weighted_adapter` combines them (merging/combination.py)."""

    CAT = "cat"  # the exact weighted sum of the deltas: ranks stacked, sum(w_i * s_i * B_i @ A_i)
    LINEAR = "linear"  # PEFT's "linear": factors averaged, (sum c_i B_i) @ (sum c_i A_i), cross terms included


COMBINATIONS = tuple(c.value for c in Combination)
# --base-quant: merge into dequant(Q(W)), the base a QLoRA adapter was trained against ("none": into W itself)
BASE_QUANTS = ("nf4", "fp4", "none")
# --requantize: write the merged model back as a bitsandbytes 4-bit checkpoint
REQUANTIZE_TYPES = ("nf4", "fp4")
DEFAULT_SHARD_SIZE = "5GB"

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 and '5GiB' -> 5*2**30, the way transformers reads max_shard_size."""
    if isinstance(text, int):
        return text
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (use e.g. 5GB, 500MB, 2GiB)")
    number, unit = match.groups()
    size = int(float(number) * _UNITS[(unit or "B").upper()])
    if size <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return size


@dataclass(frozen=True)
class MergeOptions:
    """Everything that says how to merge, apart from what (base, adapters) and where (output).

    Checked and normalised when made: `dtype` takes the usual spellings (fp16, float16, half ...) and holds the
    canonical name (bf16, f16, f32); `max_shard_size` ("5GB", "2GiB" or bytes) holds its size in bytes; an
    unknown `combine` is a MergeError. `replace(**changes)` gives a checked copy.
    """

    dtype: str = "bf16"
    loader: str = "auto"  # the base's architecture for key matching; "auto" reads config.json
    hf_token: str | None = None
    adapter_name: str | None = None  # an adapter repo's sub-directory (one repo, several adapters)
    combine: str = "cat"  # several adapters: "cat" (exact weighted sum) or PEFT's "linear"
    subtract: bool = False  # take the adapters' deltas out of a merged checkpoint
    revision: str | None = None  # the base's branch, tag or commit on the hub
    adapter_revision: str | None = None
    max_shard_size: str | int = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    allow_unused: bool = False  # adapter tensors that update nothing are left out (with a warning), not refused
    allow_nonfinite: bool = False  # NaN/inf/overflow in a merged tensor is logged and kept, not refused
    checksum: bool = False  # the model card lists each shard's SHA-256
    dry_run: bool = False  # plan and report; write nothing
    # Round-trip the base's LoRA-updated weights through bitsandbytes 4-bit (blocks of 64, double quantization)
    # before merging, as QLoRA training saw them and `axolotl merge-lora` does for 4-bit configs; None and "none"
    # merge into the weights as stored.
    base_quant: str | None = None
    # with base_quant: every float tensor of two or more dimensions (embeddings and head too), exactly as `axolotl
    # merge-lora` does; by default only the weights QLoRA training quantized (transformers' 4-bit rule)
    base_quant_all: bool = False
    requantize: str | None = None  # write the merge as a bitsandbytes 4-bit checkpoint of this type
    # GGUF types llama.cpp's converter and quantizer make of the merge ("f16,q4_k_m" or a sequence), in the output
    gguf: tuple[str, ...] | str = ()
    keep_safetensors: bool = True  # with gguf: False keeps only the .gguf files
    llama_cpp: str | None = None  # a llama.cpp checkout with convert_hf_to_gguf.py; default: setup-gguf's cache

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        object.__setattr__(self, "combine", str(getattr(self.combine, "value", self.combine)))
        if self.combine not in COMBINATIONS:
            raise MergeError(f"--combine {self.combine!r}: expected one of {', '.join(COMBINATIONS)}")
        if self.base_quant is not None and self.base_quant not in BASE_QUANTS:
            raise MergeError(f"--base-quant {self.base_quant!r}: expected one of {', '.join(BASE_QUANTS)}")
        if self.requantize is not None and self.requantize not in REQUANTIZE_TYPES:
            raise MergeError(f"--requantize {self.requantize!r}: expected one of {', '.join(REQUANTIZE_TYPES)}")
        if self.gguf:
            from .gguf.types import parse_types

            object.__setattr__(self, "gguf", parse_types(self.gguf))
            if self.requantize is not None:
                raise MergeError("--gguf converts a float merge; --requantize writes a bitsandbytes one: pick one")
        elif not self.keep_safetensors:
            raise MergeError("--gguf-only needs --gguf TYPES")
        try:
            object.__setattr__(self, "max_shard_size", parse_size(self.max_shard_size))
        except ValueError as exc:
            raise MergeError(f"--max-shard-size: {exc}") from exc

    @property
    def max_shard_bytes(self) -> int:
        assert isinstance(self.max_shard_size, int)
        return self.max_shard_size

    @property
    def base_quant_type(self) -> str | None:
        """The 4-bit type the base is round-tripped through, or None for the base as stored."""
        return None if self.base_quant in (None, "none") else self.base_quant

    def replace(self, **changes: Any) -> MergeOptions:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_settings(cls, options: MergeOptions | None, settings: dict[str, Any]) -> MergeOptions:
        """`options` with the keyword settings a caller gave by name (`merge(..., dtype="f16")`) applied; a name
        that is no option is a TypeError, as for any keyword argument."""
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
        base = options if options is not None else cls()
        return dataclasses.replace(base, **settings) if settings else base
