# Two entry points for a fresh machine: `make demo` and `make test`. Both install into ./.venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= /tmp/qlora-merge-demo
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install install-test install-gguf demo test lint bench bench-gguf

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned: on these machines that pin is a local CPU wheel; unpinned, pip pulls GBs of CUDA wheels.
# The install is editable, so only a changed pyproject.toml (or the compiled fused merge step, setup.py and
# fused.c) needs pip again: a stamp in the venv records each one.
install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml setup.py src/qlora_merge/merging/fused.c | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: install
	$(BIN)/qlora-merge --base examples/tiny-llama/base --adapter examples/tiny-llama/adapter \
		--output $(DEMO_OUT) --dtype bf16 --overwrite

lint: install-test
	$(BIN)/ruff check src tests scripts bench
	$(BIN)/ruff format --check src tests scripts bench

# GGUF export's tools, for tests/test_gguf.py: llama-cpp-python built once into a wheel cached under
# ~/.cache/qlora-merge (about 7 minutes on 2 cores the first time, seconds after), llama.cpp's converter unpacked
# from the same sdist. The stamp skips even that while the venv lives.
install-gguf: $(VENV)/.installed-gguf
$(VENV)/.installed-gguf: $(VENV)/.installed-test scripts/setup_llama_cpp.sh
	PYTHON=$(BIN)/python bash scripts/setup_llama_cpp.sh
	touch $@

test: lint install-gguf
	$(BIN)/python -m pytest -q

# Benchmark: generates checkpoints under /tmp/qlora-bench (cached), sets up axolotl in its own venv there, runs
# floors, ours, PEFT and axolotl, prints tables, writes bench/results/*.json and bench/plot.png.
# SIZES=1b,3b,8b make bench; BENCH_ARGS="--axolotl --cold" for cold input; BENCH_ARGS= leaves axolotl out.
SIZES ?= 8b
BENCH_ARGS ?= --axolotl
bench: install
	$(BIN)/pip install -q -e ".[test,bench]"
	$(BIN)/python bench/run.py --sizes $(SIZES) $(BENCH_ARGS)

# GGUF end to end at 1.1B: qlora-merge --gguf q8_0/q4_k_m against PEFT merge + llama.cpp's converter + quantizer.
bench-gguf: install-gguf
	$(BIN)/python bench/gguf_bench.py $(BENCH_ARGS)
