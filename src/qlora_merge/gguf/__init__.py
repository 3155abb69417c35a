"""GGUF out: a merged model converted by llama.cpp's own converter and quantizer (see export.py, tools.py).

    from qlora_merge.gguf import convert, setup_converter
    setup_converter()                                   # once: llama.cpp's converter from llama-cpp-python's sdist
    convert("merged/", "f16,q8_0,q4_k_m")               # merged/merged-f16.gguf, ...-q8_0.gguf, ...-q4_k_m.gguf
    export_lora("adapter/", "adapter-f16.gguf", base="base/")  # the adapter itself, for llama.cpp's --lora

Needs `pip install "qlora-merge[gguf]"` (llama-cpp-python, pinned; sentencepiece for SentencePiece tokenizers).
Nothing heavy is imported here.
"""

from __future__ import annotations

from .export import (
    ConversionError,
    GGUFFile,
    convert,
    converter_reason,
    f16_overflow,
    gguf_name,
    preflight,
    preflight_files,
    stored_float_type,
)
from .lora import LORA_TYPES, export_lora
from .staged import export_staged, gguf_bytes, preflight_merge
from .tools import (
    LLAMA_CPP_PYTHON_VERSION,
    Converter,
    default_converter_dir,
    find_converter,
    llama_cpp_module,
    setup_converter,
)
from .types import ALL_TYPES, CONVERTER_TYPES, QUANTIZER_TYPES, GGUFTypeError, canonical_type, parse_types

__all__ = [
    "ALL_TYPES",
    "CONVERTER_TYPES",
    "LLAMA_CPP_PYTHON_VERSION",
    "LORA_TYPES",
    "QUANTIZER_TYPES",
    "ConversionError",
    "Converter",
    "GGUFFile",
    "GGUFTypeError",
    "canonical_type",
    "convert",
    "converter_reason",
    "default_converter_dir",
    "export_lora",
    "export_staged",
    "f16_overflow",
    "find_converter",
    "gguf_bytes",
    "gguf_name",
    "llama_cpp_module",
    "parse_types",
    "preflight",
    "preflight_files",
    "preflight_merge",
    "setup_converter",
    "stored_float_type",
]
