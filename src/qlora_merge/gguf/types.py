"""The GGUF types a user may ask for, and which llama.cpp tool makes each.

Four come straight out of llama.cpp's converter (`convert_hf_to_gguf.py --outtype`); every other one is made by
llama.cpp's quantizer (`llama_model_quantize`) from a float GGUF the converter wrote first. The names are
llama-quantize's, lower-cased; each maps to the name of its `llama_ftype` constant in the llama_cpp bindings, looked
up only when quantizing, so this module imports nothing heavy.
"""

from __future__ import annotations

from ..errors import MergeError

# Written by the converter itself: lossless for f32 (and for a merge stored in the same float type), q8_0 by the
# converter's own numpy quantizer (which llama.cpp's reference code matches).
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")

# Made by llama_model_quantize from a float GGUF: the name a user writes -> the llama_ftype constant's suffix.
QUANTIZER_TYPES = {
    "q4_0": "MOSTLY_Q4_0",
    "q4_1": "MOSTLY_Q4_1",
    "q5_0": "MOSTLY_Q5_0",
    "q5_1": "MOSTLY_Q5_1",
    "q2_k": "MOSTLY_Q2_K",
    "q3_k_s": "MOSTLY_Q3_K_S",
    "q3_k_m": "MOSTLY_Q3_K_M",
    "q3_k_l": "MOSTLY_Q3_K_L",
    "q4_k_s": "MOSTLY_Q4_K_S",
    "q4_k_m": "MOSTLY_Q4_K_M",
    "q5_k_s": "MOSTLY_Q5_K_S",
    "q5_k_m": "MOSTLY_Q5_K_M",
    "q6_k": "MOSTLY_Q6_K",
    "iq3_s": "MOSTLY_IQ3_S",
    "iq3_m": "MOSTLY_IQ3_M",
    "iq3_xs": "MOSTLY_IQ3_XS",
    "iq4_nl": "MOSTLY_IQ4_NL",
    "iq4_xs": "MOSTLY_IQ4_XS",
}

# llama-quantize's aliases: the short K-quant names are the medium mixes.
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m", "fp32": "f32", "fp16": "f16", "q8": "q8_0"}

# Types whose quantization needs an importance matrix (llama.cpp refuses them, or makes garbage, without one):
# an imatrix comes from running the model over calibration text, which this tool does not do.
NEEDS_IMATRIX = frozenset({"iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "q2_k_s"})

# Ternary types are only for models trained ternary (BitNet); any other model comes out as noise.
TERNARY = frozenset({"tq1_0", "tq2_0"})

ALL_TYPES = (*CONVERTER_TYPES, *QUANTIZER_TYPES)


class GGUFTypeError(MergeError):
    """A GGUF type that is unknown, or one this tool does not make."""


def canonical_type(name: str) -> str:
    """The lower-case name of a GGUF type (`Q4_K_M` -> `q4_k_m`, `q4_k` -> `q4_k_m`), or GGUFTypeError."""
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key in CONVERTER_TYPES or key in QUANTIZER_TYPES:
        return key
    if key in NEEDS_IMATRIX:
        raise GGUFTypeError(
            f"GGUF type {name!r} needs an importance matrix (llama.cpp's imatrix from calibration text), "
            "which qlora-merge does not make: quantize the f16 GGUF with llama-quantize --imatrix"
        )
    if key in TERNARY:
        raise GGUFTypeError(f"GGUF type {name!r} is for ternary (BitNet) models only: pick another type")
    raise GGUFTypeError(f"unknown GGUF type {name!r}: one of {', '.join(ALL_TYPES)}")


def parse_types(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A comma list (`"f16,q4_k_m"`) or a sequence of GGUF types -> their canonical names, in order, each once."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    result: list[str] = []
    for name in names:
        if not name.strip():
            continue
        key = canonical_type(name)
        if key not in result:
            result.append(key)
    if not result:
        raise GGUFTypeError(f"no GGUF type given: one or more of {', '.join(ALL_TYPES)}, separated by commas")
    return tuple(result)


def needs_quantizer(gguf_type: str) -> bool:
    return gguf_type in QUANTIZER_TYPES
