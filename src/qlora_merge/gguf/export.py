"""A merged Hugging Face directory -> GGUF files, made by llama.cpp's own converter and quantizer.

Nothing here converts a tensor or a vocabulary: `convert_hf_to_gguf.py` does (as a child process, with the gguf-py of
its own commit first on PYTHONPATH, so that a PyPI `gguf` wheel cannot shadow it), and `llama_model_quantize` of
the llama_cpp bindings does every type the converter does not write (also in a child process: a llama.cpp abort
then ends the child, not the caller). This module chooses the steps, turns their refusals into one line, and
publishes each file atomically.

- `preflight(dir)`: the converter in vocab-only mode on a directory of config.json and tokenizer files (no weights
  needed): a tokenizer, pre-tokenizer or architecture it does not know is refused in seconds, before a merge.
- `convert(dir, types, out)`: `<name>-<type>.gguf` for each type. f32/f16/bf16/q8_0 come from the converter; any
  other type is quantized from an intermediate float GGUF in the merged checkpoint's own float type (lossless, so
  exactly what an f32 intermediate would give, at half the disk for a 16-bit merge), removed afterwards unless that
  type was asked for too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputNotFound, MergeError, NonFiniteValues, OutputError
from .tools import Converter, find_converter, llama_cpp_module
from .types import CONVERTER_TYPES, QUANTIZER_TYPES, parse_types

logger = logging.getLogger(__name__)

F16_MAX = 65504.0
# safetensors dtype of the stored weights -> the converter's float outtype that holds them without loss
_LOSSLESS_OUTTYPE = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
# what a merged directory must hold for the converter: the architecture and the tokenizer
_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "vocab.json", "tekken.json")


class ConversionError(MergeError):
    """llama.cpp's converter or quantizer refused a model: the message is the reason, in one line."""


@dataclass(frozen=True)
class GGUFFile:
    """One GGUF written: its type, where it is, its size and how long it took."""

    gguf_type: str
    path: Path
    bytes: int
    seconds: float


def gguf_name(name: str, gguf_type: str) -> str:
    return f"{name}-{gguf_type}.gguf"


# -- running the converter ------------------------------------------------------------------------------------------


def _converter_env(converter: Converter) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)  # the script then also puts its own gguf-py first
    parts = [str(converter.gguf_py)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


def _run_converter(
    converter: Converter,
    model_dir: Path,
    outfile: Path,
    arguments: Sequence[str],
    script: Path | None = None,
    what: str = "converter",
) -> None:
    """llama.cpp's `script` (default: convert_hf_to_gguf.py) on `model_dir`, writing `outfile`; its refusal as one
    line naming `model_dir` and `what` refused it."""
    script = script or converter.script
    command = [sys.executable, str(script), str(model_dir.resolve()), "--outfile", str(outfile.resolve())]
    command += arguments
    logger.debug("running %s", " ".join(command))
    done = subprocess.run(
        command, cwd=converter.root, env=_converter_env(converter), capture_output=True, text=True, check=False
    )
    for line in (done.stdout + done.stderr).splitlines():
        logger.debug("%s: %s", script.stem, line)
    if done.returncode != 0:
        raise ConversionError(f"{model_dir}: llama.cpp's {what} refused it: {converter_reason(done.stderr)}")
    if not outfile.is_file():
        raise ConversionError(f"{model_dir}: llama.cpp's {what} wrote no file")


_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)|AssertionError)(?::\s*(.*))?$")


def converter_reason(output: str) -> str:
    """The one line that says why the converter failed, from its stderr (its logging and any traceback)."""
    text = output.strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "BPE pre-tokenizer was not recognized" in text:
        found = re.search(r"chkhsh:\s*([0-9a-f]{64})", text)
        hash_note = f" (chkhsh {found.group(1)[:16]}…)" if found else ""
        return (
            f"its BPE pre-tokenizer is not one llama.cpp knows{hash_note}: the converter recognises a tokenizer "
            "only by the hash of its output on a test text, so a home-made or edited BPE tokenizer is refused; "
            "ship the base model's original tokenizer files"
        )
    missing = re.search(r"No module named '([\w.]+)'", text)
    if missing:
        module = missing.group(1).split(".")[0]
        package = {"sentencepiece": "sentencepiece", "google": "protobuf", "mistral_common": "mistral-common"}.get(
            module, module
        )
        return f"it needs the Python package {package!r} for this model: pip install {package}"
    for line in reversed(lines):
        unsupported = re.search(r"Model (\S+) is not supported", line)
        if unsupported:
            return f"architecture {unsupported.group(1)} is not one this llama.cpp converter supports"
    for line in reversed(lines):
        match = _EXCEPTION_LINE.match(line)
        if match:
            kind, message = match.group(1).rsplit(".", 1)[-1], (match.group(2) or "").strip()
            unknown = re.search(r"Architecture '?([\w]+)'? not supported", message)
            if unknown:
                return f"architecture {unknown.group(1)} is not one this llama.cpp converter supports"
            return f"{kind}: {message}" if message else kind
    for line in reversed(lines):
        if line.startswith("ERROR:"):
            return line.split(":", 2)[-1].strip()
    return lines[-1] if lines else "it exited with an error and said nothing"


# -- the checks before anything is written -------------------------------------------------------------------------


def _check_model_dir(model_dir: Path) -> None:
    if not (model_dir / "config.json").is_file():
        raise InputNotFound(f"{model_dir}: no config.json (a merged Hugging Face model directory is needed)")
    if not any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
        raise InputNotFound(
            f"{model_dir}: no tokenizer (tokenizer.model, tokenizer.json or vocab.json): a GGUF carries its "
            "vocabulary, so the converter needs the tokenizer files beside the weights"
        )


def _check_tools(types: Sequence[str], converter: str | Path | Converter | None) -> Converter:
    found = converter if isinstance(converter, Converter) else find_converter(converter)
    if any(t in QUANTIZER_TYPES for t in types):
        llama_cpp_module()
    return found


def preflight(
    model_dir: str | Path, types: str | Sequence[str] = ("f16",), *, converter: str | Path | Converter | None = None
) -> Converter:
    """Check that llama.cpp can convert `model_dir` to `types` before anything costly: the tools are there, and the
    converter accepts its architecture and tokenizer (a vocab-only conversion: config.json and the tokenizer files
    are read, no weight). Returns the converter; raises MergeError (one line) otherwise. A few seconds."""
    model_dir = Path(model_dir)
    parsed = parse_types(types) if isinstance(types, str) else parse_types(list(types))
    found = _check_tools(parsed, converter)
    _check_model_dir(model_dir)
    with tempfile.TemporaryDirectory(prefix="qlora-merge-gguf-preflight-") as scratch:
        started = time.perf_counter()
        _run_converter(found, model_dir, Path(scratch) / "vocab.gguf", ["--vocab-only"])
    logger.info("llama.cpp's converter accepts %s (vocab-only, %.1fs)", model_dir, time.perf_counter() - started)
    return found


def preflight_files(
    config: dict[str, Any],
    files: Iterable[Path],
    types: str | Sequence[str] = ("f16",),
    *,
    converter: str | Path | Converter | None = None,
) -> Converter:
    """`preflight` for a merge not yet written: `config` is the config.json the merge will write, `files` the
    tokenizer and other companion files it will copy. They are put in a temporary directory for the converter."""
    with tempfile.TemporaryDirectory(prefix="qlora-merge-gguf-inputs-") as scratch:
        stub = Path(scratch) / "model"
        stub.mkdir()
        (stub / "config.json").write_text(json.dumps(config, indent=2))
        for path in files:
            if path.name != "config.json" and path.is_file():
                shutil.copyfile(path, stub / path.name)
        return preflight(stub, types, converter=converter)


def weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InputNotFound(f"{model_dir}: no .safetensors weights to convert")
    return files


def _header(path: Path) -> dict[str, Any]:
    with path.open("rb") as stream:
        (length,) = struct.unpack("<Q", stream.read(8))
        header = json.loads(stream.read(length))
    header.pop("__metadata__", None)
    return header


def stored_float_type(model_dir: Path) -> str:
    """The float type the merged weights are stored in (f32, f16 or bf16), from their safetensors headers: the
    converter's outtype that holds them without loss. Mixed or other dtypes give f32."""
    dtypes = {
        entry["dtype"]
        for path in weight_files(model_dir)
        for entry in _header(path).values()
        if len(entry.get("shape", ())) >= 2
    }
    if len(dtypes) == 1:
        return _LOSSLESS_OUTTYPE.get(dtypes.pop(), "f32")
    return "f32"


def f16_overflow(model_dir: Path, rows_per_read: int = 1 << 14) -> tuple[str, float] | None:
    """The first tensor (and its largest |value|) of `model_dir` whose values are beyond float16's range, or None.
    Reads every weight once, a block of rows at a time."""
    import torch
    from safetensors import safe_open

    for path in weight_files(model_dir):
        with safe_open(str(path), framework="pt") as reader:
            for name in reader.keys():  # noqa: SIM118 - safe_open is not a mapping
                piece = reader.get_slice(name)
                if piece.get_dtype() not in ("F32", "BF16", "F64"):
                    continue
                shape = piece.get_shape()
                rows = shape[0] if shape else 1
                peak = 0.0
                for start in range(0, rows, rows_per_read):
                    block = piece[start : start + rows_per_read] if shape else reader.get_tensor(name)
                    values = block.float().abs()
                    finite = values[torch.isfinite(values)]
                    if finite.numel():
                        peak = max(peak, float(finite.max()))
                if peak > F16_MAX:
                    return name, peak
    return None


# -- writing ---------------------------------------------------------------------------------------------------------


def _temp_path(directory: Path, final_name: str) -> Path:
    return directory / f".{final_name}.{os.getpid()}.tmp"


def _publish(temp: Path, final: Path) -> None:
    """fsync `temp`, rename it to `final` (same directory), fsync the directory."""
    fd = os.open(temp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, final)
    directory = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _quantize(source: Path, destination: Path, gguf_type: str, threads: int | None) -> None:
    """llama_model_quantize(source -> destination, gguf_type), in a child process: quiet, and a llama.cpp abort
    cannot take the caller with it."""
    command = [
        sys.executable, "-m", "qlora_merge.gguf._quantize", str(source), str(destination), gguf_type,
        str(threads or os.cpu_count() or 1),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in (done.stdout + done.stderr).splitlines():
        logger.debug("llama_model_quantize: %s", line)
    if done.returncode != 0:
        raise ConversionError(f"{source}: llama.cpp's quantizer refused {gguf_type}: {quantizer_reason(done)}")


def quantizer_reason(done: subprocess.CompletedProcess[str]) -> str:
    text = done.stderr + done.stdout
    found = re.findall(r"failed to quantize: (.+)", text)
    if found:
        return found[-1].strip()
    return converter_reason(text) if text.strip() else f"it exited with status {done.returncode}"


def convert(
    model_dir: str | Path,
    types: str | Sequence[str],
    output_dir: str | Path | None = None,
    *,
    name: str | None = None,
    converter: str | Path | Converter | None = None,
    overwrite: bool = False,
    allow_f16_overflow: bool = False,
    threads: int | None = None,
    check: bool = True,
) -> list[GGUFFile]:
    """Convert the merged Hugging Face model in `model_dir` to one GGUF per type in `types` (a comma list or a
    sequence: f32, f16, bf16, q8_0, and llama.cpp's quantizer types such as q4_k_m), written into `output_dir`
    (default: `model_dir`) as `<name>-<type>.gguf` (`name` defaults to the directory's name). Each file appears
    whole, or not at all. With `check` (the default) the converter first runs vocab-only, so that a refused tokenizer
    or architecture costs seconds. An f16 output of a model whose values exceed float16's range is refused unless
    `allow_f16_overflow`. Raises MergeError (one line)."""
    model_dir = Path(model_dir)
    wanted = parse_types(types) if isinstance(types, str) else parse_types(list(types))
    out = Path(output_dir) if output_dir is not None else model_dir
    label = name or model_dir.resolve().name
    found = preflight(model_dir, wanted, converter=converter) if check else _check_tools(wanted, converter)
    _check_model_dir(model_dir)
    stored = stored_float_type(model_dir)
    if not out.is_dir():
        raise OutputError(f"{out}: not a directory (GGUF files go into an existing directory)")
    targets = {t: out / gguf_name(label, t) for t in wanted}
    if not overwrite:
        taken = [str(path) for path in targets.values() if path.exists()]
        if taken:
            raise OutputError(f"{taken[0]}: exists (pass overwrite to replace it)")
    if "f16" in wanted and stored != "f16" and not allow_f16_overflow:
        over = f16_overflow(model_dir)
        if over is not None:
            raise NonFiniteValues(
                f"{model_dir}: tensor {over[0]} has values up to {over[1]:.6g}, beyond float16's range "
                f"({F16_MAX:.0f}): its f16 GGUF would hold inf; ask for bf16 or f32"
            )
    written: list[GGUFFile] = []
    temps: list[Path] = []
    intermediate: Path | None = None
    try:
        for gguf_type in [t for t in wanted if t in CONVERTER_TYPES]:
            started = time.perf_counter()
            temp = _temp_path(out, targets[gguf_type].name)
            temps.append(temp)
            _run_converter(found, model_dir, temp, ["--outtype", gguf_type, "--model-name", label])
            _publish(temp, targets[gguf_type])
            written.append(_done(gguf_type, targets[gguf_type], started))
        quantized = [t for t in wanted if t in QUANTIZER_TYPES]
        if quantized:
            started = time.perf_counter()
            if stored in wanted:
                intermediate = targets[stored]
            else:
                intermediate = _temp_path(out, gguf_name(label, stored))
                temps.append(intermediate)
                _run_converter(found, model_dir, intermediate, ["--outtype", stored, "--model-name", label])
            logger.info("intermediate %s GGUF for quantization (%.1fs)", stored, time.perf_counter() - started)
            for gguf_type in quantized:
                started = time.perf_counter()
                temp = _temp_path(out, targets[gguf_type].name)
                temps.append(temp)
                _quantize(intermediate, temp, gguf_type, threads)
                _publish(temp, targets[gguf_type])
                written.append(_done(gguf_type, targets[gguf_type], started))
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
    order = {t: i for i, t in enumerate(wanted)}
    return sorted(written, key=lambda f: order[f.gguf_type])


def _done(gguf_type: str, path: Path, started: float) -> GGUFFile:
    seconds = time.perf_counter() - started
    size = path.stat().st_size
    logger.info("wrote %s (%s, %.1f MB, %.1fs)", path, gguf_type, size / 1e6, seconds)
    return GGUFFile(gguf_type, path, size, seconds)
