#!/usr/bin/env bash
# GGUF export's tools, once per machine: llama-cpp-python (pinned) built from its sdist into a cached wheel and
# installed into the venv, and llama.cpp's converter (convert_hf_to_gguf.py, conversion/, gguf-py) unpacked from
# the same sdist into the cache that qlora-merge looks in. The first run downloads the sdist (76 MB) and compiles
# llama.cpp (about 7 minutes on 2 busy cores); later runs reuse both and take seconds.
#
#   scripts/setup_llama_cpp.sh                 # into ./.venv
#   PYTHON=/path/to/python scripts/setup_llama_cpp.sh
#
# CMAKE_ARGS=-DGGML_NATIVE=OFF builds for any x86-64 CPU, so the cached wheel runs on whatever machine reuses it.
set -euo pipefail

VERSION=0.3.36
PYTHON=${PYTHON:-.venv/bin/python}
CACHE=${QLORA_MERGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qlora-merge}
SDIST_DIR=$CACHE/sdist
WHEEL_DIR=$CACHE/wheels/llama-cpp-python-$VERSION
SDIST=$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -f "$SDIST" ]; then
    echo "downloading llama-cpp-python $VERSION's source (76 MB) into $SDIST_DIR"
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: --dest "$SDIST_DIR" "llama-cpp-python==$VERSION"
fi

shopt -s nullglob
wheels=("$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "building llama-cpp-python $VERSION (llama.cpp, CPU only; several minutes, once) into $WHEEL_DIR"
    started=$(date +%s)
    CMAKE_ARGS="-DGGML_NATIVE=OFF ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        "$PYTHON" -m pip wheel -q --no-deps --wheel-dir "$WHEEL_DIR" "$SDIST"
    echo "built in $(($(date +%s) - started))s"
    wheels=("$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl)
fi

"$PYTHON" -m pip install -q "${wheels[0]}"
"$PYTHON" -c "import sys; from qlora_merge.gguf import setup_converter; print('converter:', setup_converter(sys.argv[1]).root)" "$SDIST"
