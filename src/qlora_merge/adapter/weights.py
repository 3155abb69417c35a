"""Adapter weight files -> LoRA pairs per module, with every key accounted for.

PEFT saves `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`; anything else in the file is a feature
that needs its own merge rule, so it is reported by what it is rather than skipped.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.format import TORCH_TO_NAME, TensorEntry, read_safetensors_header
from ..checkpoint.reader import TensorReader
from ..errors import AdapterFormatError, CheckpointFormatError, InputNotFound, ShapeMismatch, UnsupportedAdapter

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."

# A tensor of the adapter file: lazily read from a safetensors file, or already in memory from a .bin file.
AdapterTensor = TensorEntry | torch.Tensor


@dataclass(frozen=True)
class LoraPair:
    """The two low-rank factors of one adapted module: A (r, in) and B (out, r)."""

    module: str
    a: AdapterTensor
    b: AdapterTensor

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class AdapterWeights:
    path: Path
    pairs: dict[str, LoraPair]


def find_weights_file(directory: Path) -> Path:
    for name in (SAFETENSORS_NAME, PICKLE_NAME):
        if (directory / name).is_file():
            return directory / name
    raise InputNotFound(f"{directory}: no {SAFETENSORS_NAME} or {PICKLE_NAME} in the adapter directory")


def read_adapter_weights(directory: Path) -> AdapterWeights:
    path = find_weights_file(directory)
    tensors = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pickle(path)
    if not tensors:
        raise AdapterFormatError(f"{path}: the adapter file contains no tensors")
    halves: dict[str, dict[str, AdapterTensor]] = {}
    unsupported: list[str] = []
    for key, tensor in tensors.items():
        module_key = key.removeprefix(PEFT_PREFIX)
        for half in ("A", "B"):
            suffix = f".lora_{half}.weight"
            if module_key.endswith(suffix):
                halves.setdefault(module_key.removesuffix(suffix), {})[half] = tensor
                break
        else:
            unsupported.append(key)
    if unsupported:
        first = unsupported[0]
        more = f" (and {len(unsupported) - 1} more)" if len(unsupported) > 1 else ""
        raise UnsupportedAdapter(f"{path}: '{first}' is {describe_key(first)}, not merged yet{more}")
    pairs = {}
    for module, found in halves.items():
        if set(found) != {"A", "B"}:
            missing = ({"A", "B"} - set(found)).pop()
            raise AdapterFormatError(f"{path}: '{PEFT_PREFIX}{module}.lora_{missing}.weight' is missing")
        pairs[module] = _checked_pair(path, module, found["A"], found["B"])
    return AdapterWeights(path=path, pairs=pairs)


def describe_key(key: str) -> str:
    """Name the PEFT feature an adapter key belongs to, for error messages."""
    if key.endswith("lora_magnitude_vector") or ".lora_magnitude_vector." in key:
        return "a DoRA magnitude vector (use_dora)"
    if ".lora_embedding_" in key:
        return "an embedding LoRA factor"
    if ".lora_B.bias" in key:
        return "a LoRA bias (lora_bias=True)"
    if "trainable_tokens" in key:
        return "a trainable-token delta (trainable_token_indices)"
    if key.endswith(".bias"):
        return "a trained bias (bias='all' or 'lora_only')"
    if ".lora_" in key:
        return "an unknown LoRA tensor"
    return "a full replacement tensor (modules_to_save or saved embedding layers)"


def _checked_pair(path: Path, module: str, a: AdapterTensor, b: AdapterTensor) -> LoraPair:
    if len(a.shape) == len(b.shape) and len(a.shape) in (3, 4, 5):
        raise UnsupportedAdapter(
            f"{path}: '{PEFT_PREFIX}{module}' has {len(a.shape)}-D LoRA factors (convolution LoRA), not merged yet"
        )
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise AdapterFormatError(
            f"{path}: '{PEFT_PREFIX}{module}' lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not matrices"
        )
    if a.shape[0] != b.shape[1]:
        raise ShapeMismatch(
            f"{path}: '{PEFT_PREFIX}{module}' lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} disagree on rank"
        )
    for tensor, half in ((a, "A"), (b, "B")):
        dtype = tensor.dtype if isinstance(tensor, TensorEntry) else TORCH_TO_NAME.get(tensor.dtype)
        if dtype not in ("F32", "F16", "BF16", "F64"):
            raise AdapterFormatError(f"{path}: '{PEFT_PREFIX}{module}.lora_{half}.weight' has dtype {dtype}")
    return LoraPair(module=module, a=a, b=b)


def load_factor(tensor: AdapterTensor, reader: TensorReader) -> torch.Tensor:
    """A LoRA factor as PEFT holds it after loading: half precision upcast to float32, float32/64 as saved."""
    value = reader.read(tensor) if isinstance(tensor, TensorEntry) else tensor
    return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value


def _read_safetensors(path: Path) -> dict[str, AdapterTensor]:
    try:
        header = read_safetensors_header(path)
    except CheckpointFormatError as exc:
        raise AdapterFormatError(str(exc)) from exc
    return {entry.name: entry for entry in header.tensors}


def _read_pickle(path: Path) -> dict[str, AdapterTensor]:
    """Load a .bin adapter with weights_only=True: plain tensors only, nothing is ever executed."""
    try:
        # mmap needs the zip format of torch >= 1.6; older .bin files are read whole (adapters are small).
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():
            raise AdapterFormatError(
                f"{path}: refused, it pickles objects other than tensors (nothing was run; re-save it as safetensors)"
            ) from exc
        raise AdapterFormatError(f"{path}: not a readable torch file (corrupt or not a pickle)") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdapterFormatError(f"{path}: not a readable torch file ({reason[:200]})") from exc
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise AdapterFormatError(f"{path}: expected a mapping of names to tensors")
    return dict(loaded)
