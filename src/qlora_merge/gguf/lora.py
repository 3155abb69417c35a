"""A PEFT LoRA adapter -> a GGUF LoRA adapter for llama.cpp's runtime `--lora`, by llama.cpp's own
`convert_lora_to_gguf.py` (unpacked beside the model converter by `qlora-merge setup-gguf`).

For serving one base with several adapters, or switching adapters without a merge. The converter reads the
adapter's safetensors and the base's config.json (no base weights); a pickled adapter (.bin) is refused here before
it could be unpickled. The file appears whole, or not at all.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..errors import InputNotFound, OutputError
from ..names import ADAPTER_CONFIG_NAME, CONFIG_NAME
from .export import ConversionError, GGUFFile, _publish, _run_converter, _temp_path
from .tools import Converter, find_converter

logger = logging.getLogger(__name__)

# What convert_lora_to_gguf.py writes (its --outtype); llama.cpp applies a LoRA in the base's compute type anyway.
LORA_TYPES = ("f32", "f16", "bf16", "q8_0")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_script(converter: Converter) -> Path:
    return converter.root / "convert_lora_to_gguf.py"


def base_of(adapter_dir: Path) -> Path:
    """The base a local adapter names (base_model_name_or_path), where that is a local directory."""
    config = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text())
    named = config.get("base_model_name_or_path")
    for candidate in (Path(str(named)), adapter_dir / str(named)) if named else ():
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise InputNotFound(
        f"{adapter_dir / ADAPTER_CONFIG_NAME}: its base ({named!r}) is not a local directory with a config.json; "
        "pass --base DIR (only the base's config.json is read)"
    )


def export_lora(
    adapter: str | Path,
    output: str | Path,
    base: str | Path | None = None,
    *,
    gguf_type: str = "f16",
    converter: str | Path | Converter | None = None,
    overwrite: bool = False,
) -> GGUFFile:
    """Write `adapter` (a local PEFT LoRA directory) as the GGUF LoRA file `output`, of `gguf_type` (f32, f16, bf16
    or q8_0), with the base's hyperparameters from `base` (a local model directory; default: the one the adapter
    names). Raises MergeError (one line)."""
    adapter_dir, out = Path(adapter), Path(output)
    if gguf_type not in LORA_TYPES:
        raise ConversionError(f"--type {gguf_type}: a GGUF LoRA is one of {', '.join(LORA_TYPES)}")
    if not (adapter_dir / ADAPTER_CONFIG_NAME).is_file():
        raise InputNotFound(f"{adapter_dir}: no {ADAPTER_CONFIG_NAME} (a local PEFT adapter directory is needed)")
    if not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise InputNotFound(
            f"{adapter_dir}: no {ADAPTER_WEIGHTS}; a pickled adapter_model.bin is not converted (llama.cpp's "
            "converter would unpickle it): re-save the adapter with safetensors"
        )
    base_dir = Path(base) if base is not None else base_of(adapter_dir)
    if not (base_dir / CONFIG_NAME).is_file():
        raise InputNotFound(f"{base_dir}: no {CONFIG_NAME} (the base's model directory is needed for its config)")
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: not a directory")
    if out.exists() and not overwrite:
        raise OutputError(f"{out}: exists (pass --overwrite to replace it)")
    found = converter if isinstance(converter, Converter) else find_converter(converter)
    script = lora_script(found)
    if not script.is_file():
        raise InputNotFound(f"{script}: missing from llama.cpp's converter; run `qlora-merge setup-gguf --force`")
    started = time.perf_counter()
    temp = _temp_path(out.parent, out.name)
    try:
        arguments = ["--base", str(base_dir.resolve()), "--outtype", gguf_type]
        _run_converter(found, adapter_dir, temp, arguments, script=script, what="LoRA converter")
        _publish(temp, out)
    finally:
        temp.unlink(missing_ok=True)
    seconds = time.perf_counter() - started
    logger.info("wrote %s (LoRA, %s, %.1fs)", out, gguf_type, seconds)
    return GGUFFile(gguf_type, out, out.stat().st_size, seconds)
