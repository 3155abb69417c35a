#!/usr/bin/env bash
# Install axolotl 0.19 (the last release for Python 3.11) into its own venv, without its training stack,
# so that bench/run.py can time its shard-by-shard merge (`merge_method: memory_efficient`,
# axolotl/cli/utils/lora_merge.py) through `python -m axolotl.cli.merge_lora CONFIG`.
#
# axolotl is installed with --no-deps; then only what `import axolotl.cli.merge_lora` and the merge itself
# actually import, found by trying, at the versions axolotl 0.19.0 pins (or, where it pins nothing, the
# versions this was tested with). Nothing is stubbed: the heavy imports that the merge path cannot avoid
# (datasets+pyarrow, numba, bitsandbytes, kernels) are the real packages, all CPU-installable from PyPI.
# Left out because the merge never imports them: trl, deepspeed, flash-attn, xformers, triton, liger-kernel,
# torchao, wandb, gradio, modal, lm_eval, optimum, evaluate, tensorboard and the rest of axolotl's list.
#
# Idempotent: a stamp written after a successful import check makes a second run a no-op; a changed script
# (other pins) redoes the installs into the same venv.
#
# Usage: bench/setup_axolotl.sh [VENV_DIR]    (default /tmp/qlora-bench/axolotl-venv; PYTHON picks the python)
set -euo pipefail

VENV=${1:-${AXOLOTL_VENV:-/tmp/qlora-bench/axolotl-venv}}
PYTHON=${PYTHON:-python3}
AXOLOTL_VERSION=0.19.0
STAMP="$VENV/.qlora-bench-setup"
SCRIPT_HASH=$(sha256sum "$0" | cut -d' ' -f1)
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Each line: requirement  # who imports it on the merge-lora path
REQUIREMENTS=(
  "transformers==5.16.1"    # axolotl.cli.config, lora_merge (meta model, AutoConfig)
  "peft==0.20.0"            # lora_merge (LoraConfig, get_delta_weight)
  "accelerate==1.13.0"      # axolotl.utils.distributed
  "huggingface_hub==1.17.0" # lora_merge (snapshot_download); datasets would otherwise pull 2.x
  "tokenizers==0.23.1"      # transformers
  "datasets==4.8.4"         # axolotl.utils.trainer (imported by the config loader); brings pyarrow
  "pydantic==2.12.5"        # axolotl.utils.config (config schema)
  "PyYAML==6.0.3"           # axolotl.cli.config
  "packaging==26.0"         # axolotl, transformers
  "typing-extensions==4.15.0"
  "hf_xet==1.4.3"
  "posthog==6.7.11"         # axolotl.telemetry.manager (telemetry is disabled by the runner's env)
  "numba==0.68.1"           # axolotl.utils.samplers.multipack (axolotl: numba<1.0,>=0.63.1)
  "bitsandbytes==0.50.2"    # peft.helpers
  "kernels==0.16.2"         # bitsandbytes.backends.cpu.ops (axolotl: kernels<0.17.0,>=0.16.0)
  "fire==0.7.1"             # axolotl.cli.merge_lora (unpinned by axolotl; tested version)
  "colorama==0.4.6"         # axolotl.logging_config (unpinned by axolotl; tested version)
  "requests==2.34.2"        # axolotl.cli.config (unpinned by axolotl; tested version)
  "addict==2.4.0"           # axolotl.utils.dict (unpinned by axolotl; tested version)
  "pillow==13.0.0"          # axolotl.utils.schemas.multimodal (unpinned by axolotl; tested version)
  "fastcore==2.2.39"        # axolotl.utils.model_shard_quant (unpinned by axolotl; tested version)
)

quiet_pip() {
  # Drop two kinds of noise only: this machine's pip config names local indexes that lack most projects, and
  # pip lists every dependency of axolotl's that --no-deps left out on purpose (counted instead).
  local log="$VENV/pip-last.log" absent
  "$VENV/bin/pip" "$@" > "$log" 2>&1 || { cat "$log" >&2; return 1; }
  absent=$(grep -c "^axolotl .* requires .*, which is not installed" "$log" || true)
  grep -v -e "is ignored: it is neither a file nor a directory" -e "^axolotl .* requires .*, which is not installed" \
    -e "^ERROR: pip's dependency resolver does not currently" -e "^  *This behaviour is the source" "$log" || true
  if [[ "$absent" -gt 0 ]]; then echo "($absent of axolotl's declared dependencies left out on purpose)"; fi
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$SCRIPT_HASH" && -x "$VENV/bin/python" ]]; then
  echo "axolotl $AXOLOTL_VERSION already set up in $VENV"
  exit 0
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 10))' \
  || { echo "axolotl $AXOLOTL_VERSION needs Python >= 3.10; set PYTHON" >&2; exit 1; }
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
rm -f "$STAMP"

CONSTRAINTS="$VENV/torch-constraint.txt"
echo "torch==2.13.0" > "$CONSTRAINTS"
# torch first, pinned: on these machines that pin is a local CPU wheel; unpinned, pip pulls GBs of CUDA wheels.
echo "installing torch==2.13.0 into $VENV"
quiet_pip install -q torch==2.13.0
echo "installing axolotl==$AXOLOTL_VERSION (--no-deps) and its merge path's imports"
quiet_pip install -q --no-deps "axolotl==$AXOLOTL_VERSION"
# The constraint keeps any dependency from replacing the CPU torch.
quiet_pip install -q -c "$CONSTRAINTS" "${REQUIREMENTS[@]}"

# The check that matters: the merge entry point imports, offline, with no stubs.
HF_HUB_OFFLINE=1 AXOLOTL_DO_NOT_TRACK=1 DO_NOT_TRACK=1 "$VENV/bin/python" -c '
import axolotl.cli.merge_lora, axolotl.cli.utils.lora_merge, importlib.metadata as m
print("axolotl", m.version("axolotl"), "imports; torch", m.version("torch"))
' > "$VENV/import-check.log" 2>&1 || { cat "$VENV/import-check.log" >&2; exit 1; }
tail -n 1 "$VENV/import-check.log"
echo "$SCRIPT_HASH" > "$STAMP"
echo "axolotl $AXOLOTL_VERSION set up in $VENV"
