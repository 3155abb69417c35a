"""Child process: `python -m qlora_merge.gguf._quantize SOURCE DESTINATION TYPE THREADS` runs llama.cpp's
llama_model_quantize (through the llama_cpp bindings) and exits 0 on success. export.py runs it so that llama.cpp's
log and any abort stay in the child."""

from __future__ import annotations

import ctypes
import sys


def main(argv: list[str]) -> int:
    from .tools import llama_cpp_module
    from .types import QUANTIZER_TYPES

    source, destination, gguf_type, threads = argv
    llama_cpp = llama_cpp_module()
    constant = f"LLAMA_FTYPE_{QUANTIZER_TYPES[gguf_type]}"
    ftype = getattr(llama_cpp, constant, None)
    if ftype is None:
        print(f"failed to quantize: this llama-cpp-python has no {constant}", file=sys.stderr)
        return 2
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = int(threads)
    status = llama_cpp.llama_model_quantize(source.encode(), destination.encode(), ctypes.byref(params))
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
