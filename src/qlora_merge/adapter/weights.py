"""Adapter weight files -> LoRA modules and replacement tensors, with every key accounted for.

PEFT saves, under `base_model.model.`: the LoRA factors of each adapted module (`<module>.lora_A.weight`,
`.lora_B.weight`, `.lora_B.bias` with lora_bias, `.lora_embedding_A`/`_B` on embeddings, `.lora_magnitude_vector`
with DoRA), and whole tensors that replace the base's: `modules_to_save` modules (`lm_head.weight`), trained biases
(`bias="all"|"lora_only"`, saved as `<module>.base_layer.bias` on adapted modules) and embedding layers
(`embed_tokens.base_layer.weight` with save_embedding_layers, resized ones included). Anything else is a feature
that needs its own merge rule, so it is reported by what it is rather than skipped.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import AdapterFormatError, CheckpointFormatError, InputNotFound, ShapeMismatch, UnsupportedAdapter
from ..inputs.format import DTYPES, FLOAT_DTYPES, TORCH_TO_NAME, TensorEntry, read_safetensors_header
from ..inputs.pickled import load_plain_tensors
from ..inputs.reader import TensorReader
from ..merging.combination import Combination, combined_factor
from ..names import ADAPTER_PICKLE_NAME, ADAPTER_WEIGHTS_NAME

PEFT_PREFIX = "base_model.model."
TOKEN_DELTA = ".token_adapter.trainable_tokens_delta"

# Suffix of an adapter key -> which part of a LoRA module it is. Older PEFT saved the DoRA magnitude with `.weight`.
LORA_PARTS = {
    ".lora_A.weight": "a",
    ".lora_B.weight": "b",
    ".lora_B.bias": "bias",
    ".lora_embedding_A": "embedding_a",
    ".lora_embedding_B": "embedding_b",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",
}
# Wrappers PEFT puts around a module, which a saved key may still name: `<module>.base_layer.weight` (and
# `<module>.token_adapter.base_layer.weight` with trainable tokens) is the module's own weight; old files kept
# `<module>.modules_to_save.<adapter>.weight`.
_WRAPPERS = re.compile(r"\.(base_layer|token_adapter|modules_to_save\.[^.]+)(?=\.)")
# With a resized vocabulary PEFT also saves the wrapper's inner tensors under other names: the trained copy again
# (`lm_head.modules_to_save.weight`, its adapter name stripped) and the untrained original
# (`lm_head.original_module.weight`). PEFT's merged model uses neither when `lm_head.weight` is there.
_SECONDARY = re.compile(r"(.+)\.(modules_to_save|original_module)\.([^.]+)")


@dataclass(frozen=True)
class CombinedFactor:
    """A LoRA factor of several adapters combined into one (see `variants.combined_factor`), computed from their
    factors when it is read, so a combination holds no more in memory than one module's factors at a time."""

    how: Combination
    side: str  # "a" or "b"
    parts: tuple[TensorEntry | torch.Tensor, ...]
    multipliers: tuple[tuple[float, ...], ...]  # per part
    rank: int
    shape: tuple[int, ...]
    dtype: torch.dtype


# A tensor of the adapter file: lazily read from a safetensors file, or already in memory from a .bin file; or
# a factor of several adapters combined.
AdapterTensor = TensorEntry | torch.Tensor | CombinedFactor


@dataclass(frozen=True)
class LoraPair:
    """One adapted module: factors A and B, and optionally a LoRA bias and a DoRA magnitude.

    Linear-style modules have A (r, in) and B (out, r); embeddings (`embedding=True`) have A (r, num_embeddings)
    and B (embedding_dim, r), and update the (num_embeddings, embedding_dim) weight with (B @ A).T.
    """

    module: str
    a: AdapterTensor
    b: AdapterTensor
    embedding: bool = False
    bias: AdapterTensor | None = None
    magnitude: AdapterTensor | None = None
    keys: tuple[str, ...] = ()
    bias_key: str | None = None
    magnitude_key: str | None = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def kernel(self) -> tuple[int, ...]:
        """A convolution LoRA's kernel size (A is (r, in, *kernel)); () for every other layer kind."""
        return tuple(int(n) for n in self.a.shape[2:])

    @property
    def weight_shape(self) -> tuple[int, int]:
        """The (rows, columns) of the weight as PEFT's layer sees it: (out, in), or (num, dim) for embeddings."""
        if self.embedding:
            return int(self.a.shape[1]), int(self.b.shape[0])
        return int(self.b.shape[0]), int(self.a.shape[1])


@dataclass(frozen=True)
class Replacement:
    """A whole tensor saved in the adapter that replaces the base's: `name` is the tensor as the adapter's model
    named it (`lm_head.weight`, `model.embed_tokens.weight`, `...q_proj.bias`)."""

    name: str
    key: str
    tensor: AdapterTensor
    wrapper: str = ""  # "base_layer" or "modules_to_save" when the key still names PEFT's wrapper
    secondary: bool = False  # PEFT's second copy of a trained tensor, or the untrained original (_SECONDARY)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.tensor.shape)


@dataclass(frozen=True)
class TokenDelta:
    """trainable_token_indices: new values for some rows of an embedding (or tied head), `name` its weight."""

    name: str
    key: str
    tensor: AdapterTensor


@dataclass(frozen=True)
class AdapterWeights:
    path: Path
    pairs: dict[str, LoraPair]
    replacements: dict[str, Replacement]
    shapes: dict[str, tuple[int, ...]]  # every key of the file and its shape
    redundant: dict[str, str]  # keys PEFT saves but its merged model does not use, and why
    token_deltas: dict[str, TokenDelta] = field(default_factory=dict)
    # keys of LoRA modules adapter_config.json does not select, which PEFT leaves out, and why (see selection)
    unselected: dict[str, str] = field(default_factory=dict)


def find_weights_file(directory: Path) -> Path:
    for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_PICKLE_NAME):
        if (directory / name).is_file():
            return directory / name
    raise InputNotFound(f"{directory}: no {ADAPTER_WEIGHTS_NAME} or {ADAPTER_PICKLE_NAME} in the adapter directory")


def read_adapter_weights(directory: Path) -> AdapterWeights:
    path = find_weights_file(directory)
    tensors = _read_safetensors(path) if path.suffix == ".safetensors" else _read_pickle(path)
    if not tensors:
        raise AdapterFormatError(f"{path}: the adapter file contains no tensors")
    parts: dict[str, dict[str, tuple[str, AdapterTensor]]] = {}
    candidates: dict[str, list[Replacement]] = {}
    token_deltas: dict[str, TokenDelta] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        for suffix, part in LORA_PARTS.items():
            if name.endswith(suffix):
                module = name.removesuffix(suffix)
                if part in parts.get(module, {}):
                    raise AdapterFormatError(f"{path}: '{key}' and '{parts[module][part][0]}' are the same tensor")
                parts.setdefault(module, {})[part] = (key, tensor)
                break
        else:
            if name.endswith(TOKEN_DELTA):
                _check_float(path, key, tensor)
                if len(tensor.shape) != 2:
                    raise AdapterFormatError(f"{path}: '{key}' is {tuple(tensor.shape)}, expected (tokens, dim)")
                target = f"{name.removesuffix(TOKEN_DELTA)}.weight"
                token_deltas[target] = TokenDelta(name=target, key=key, tensor=tensor)
                continue
            if "trainable_tokens" in name:
                raise UnsupportedAdapter(f"{path}: '{key}' is an unknown trainable-tokens tensor")
            if ".lora_" in name or name.startswith("lora_"):
                raise UnsupportedAdapter(f"{path}: '{key}' is an unknown LoRA tensor; qlora-merge cannot merge it")
            _check_float(path, key, tensor)
            secondary = _SECONDARY.fullmatch(name)
            if secondary:
                module, wrapper, leaf = secondary.groups()
                found = Replacement(name=f"{module}.{leaf}", key=key, tensor=tensor, wrapper=wrapper, secondary=True)
            else:
                wrapper = match.group(1).split(".")[0] if (match := _WRAPPERS.search(name)) else ""
                found = Replacement(name=_WRAPPERS.sub("", name), key=key, tensor=tensor, wrapper=wrapper)
            candidates.setdefault(found.name, []).append(found)
    replacements: dict[str, Replacement] = {}
    redundant: dict[str, str] = {}
    for target, found in candidates.items():
        # The trained tensor first: a plain or base_layer key, then the adapter-name-less copy, then the original.
        found.sort(key=lambda r: (r.secondary, r.wrapper))
        primary, *others = found
        if others and not others[0].secondary:
            raise AdapterFormatError(f"{path}: '{primary.key}' and '{others[0].key}' both replace '{target}'")
        replacements[target] = primary
        for other in others:
            redundant[other.key] = f"PEFT's {other.wrapper} copy of '{primary.key}', not used by its merged model"
    pairs = {module: _checked_pair(path, module, found) for module, found in parts.items()}
    shapes = {key: tuple(int(n) for n in tensor.shape) for key, tensor in tensors.items()}
    return AdapterWeights(
        path=path,
        pairs=pairs,
        replacements=replacements,
        shapes=shapes,
        redundant=redundant,
        token_deltas=token_deltas,
    )


def describe_key(key: str) -> str:
    """Name the PEFT feature an adapter key belongs to, for coverage reports."""
    name = key.removeprefix(PEFT_PREFIX)
    if ".lora_magnitude_vector" in name:
        return "DoRA magnitude"
    if ".lora_embedding_" in name:
        return "embedding LoRA factor"
    if name.endswith(".lora_B.bias"):
        return "LoRA bias (lora_bias)"
    if ".lora_A." in name or ".lora_B." in name:
        return "LoRA factor"
    if name.endswith(TOKEN_DELTA):
        return "trainable tokens"
    if ".original_module." in name:
        return "original module"
    if name.endswith(".bias"):
        return "trained bias"
    if ".base_layer." in name:
        return "saved embedding layer"
    return "full tensor (modules_to_save or saved embedding layer)"


def _checked_pair(path: Path, module: str, found: dict[str, tuple[str, AdapterTensor]]) -> LoraPair:
    key = f"{PEFT_PREFIX}{module}"
    embedding = "embedding_a" in found or "embedding_b" in found
    if embedding and ("a" in found or "b" in found):
        raise AdapterFormatError(f"{path}: '{key}' has both lora_A/lora_B and lora_embedding_A/B factors")
    names = ("embedding_a", "embedding_b") if embedding else ("a", "b")
    for part, suffix in zip(names, ("A", "B"), strict=True):
        if part not in found:
            missing = f"lora_embedding_{suffix}" if embedding else f"lora_{suffix}.weight"
            present = ", ".join(f"'{k}'" for k, _ in found.values())
            raise AdapterFormatError(f"{path}: '{key}.{missing}' is missing (the file has {present})")
    a, b = found[names[0]][1], found[names[1]][1]
    conv = not embedding and len(a.shape) == len(b.shape) and len(a.shape) in (3, 4, 5)
    if conv and any(int(n) != 1 for n in b.shape[2:]):
        raise AdapterFormatError(
            f"{path}: '{key}' lora_B {tuple(b.shape)} of a convolution LoRA must have a 1 x 1 kernel"
        )
    if not conv and (len(a.shape) != 2 or len(b.shape) != 2):
        raise AdapterFormatError(
            f"{path}: '{key}' lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not matrices"
        )
    rank, b_rank = int(a.shape[0]), int(b.shape[1])
    if conv and 0 < b_rank < rank and rank % b_rank == 0:
        # PEFT gives lora_B the base layer's groups: each of its output channels sees rank / groups of A's
        raise UnsupportedAdapter(
            f"{path}: '{key}' lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are a LoRA on a grouped "
            f"convolution (groups={rank // b_rank}), which PEFT cannot merge either; not supported"
        )
    if rank != b_rank:
        raise ShapeMismatch(f"{path}: '{key}' lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} disagree on rank")
    for part_key, tensor in found.values():
        _check_float(path, part_key, tensor)
    bias = found.get("bias")
    magnitude = found.get("magnitude")
    pair = LoraPair(
        module=module,
        a=a,
        b=b,
        embedding=embedding,
        bias=bias[1] if bias else None,
        magnitude=magnitude[1] if magnitude else None,
        keys=tuple(k for k, _ in found.values()),
        bias_key=bias[0] if bias else None,
        magnitude_key=magnitude[0] if magnitude else None,
    )
    rows, cols = pair.weight_shape
    if bias is not None and tuple(bias[1].shape) != (int(b.shape[0]),):
        raise ShapeMismatch(f"{path}: '{bias[0]}' is {tuple(bias[1].shape)}, expected ({int(b.shape[0])},)")
    if conv and magnitude is not None:  # saved as the norm's transpose: (1, out, 1, ...)
        expected_shape = (1, rows, *(1,) * (len(a.shape) - 2))
        if tuple(magnitude[1].shape) != expected_shape:
            raise ShapeMismatch(f"{path}: '{magnitude[0]}' is {tuple(magnitude[1].shape)}, expected {expected_shape}")
    elif magnitude is not None and len(magnitude[1].shape) != 1:
        raise ShapeMismatch(f"{path}: '{magnitude[0]}' is {tuple(magnitude[1].shape)}, expected a vector")
    if not conv and magnitude is not None and int(magnitude[1].shape[0]) != (cols if embedding else rows):
        expected = cols if embedding else rows
        raise ShapeMismatch(f"{path}: '{magnitude[0]}' has {magnitude[1].shape[0]} entries, expected {expected}")
    return pair


def _dtype_name(tensor: AdapterTensor) -> str:
    if isinstance(tensor, TensorEntry):
        return tensor.dtype
    return TORCH_TO_NAME.get(tensor.dtype, str(tensor.dtype))


def _check_float(path: Path, key: str, tensor: AdapterTensor) -> None:
    dtype = _dtype_name(tensor)
    if dtype not in FLOAT_DTYPES:
        raise AdapterFormatError(f"{path}: '{key}' has dtype {dtype}")


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype PEFT holds an adapter tensor in once loaded: half precision upcast to float32, float32/64 as saved."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def load_factor(tensor: AdapterTensor, reader: TensorReader) -> torch.Tensor:
    """An adapter tensor as PEFT holds it after loading: half precision upcast to float32, float32/64 as saved."""
    value = read_tensor(tensor, reader)
    return value.to(adapter_dtype(value.dtype))


def read_tensor(tensor: AdapterTensor, reader: TensorReader) -> torch.Tensor:
    """An adapter tensor as saved (its own dtype); a combined factor computed from its parts as loaded."""
    if isinstance(tensor, CombinedFactor):
        factors = [load_factor(part, reader) for part in tensor.parts]
        return combined_factor(tensor.how, tensor.side, factors, list(tensor.multipliers), tensor.rank)
    return reader.read(tensor) if isinstance(tensor, TensorEntry) else tensor


def read_chunks(tensor: AdapterTensor, reader: TensorReader, nbytes: int) -> Iterator[torch.Tensor]:
    """An adapter tensor's values as saved, flattened, about `nbytes` at a time (whole elements); each chunk is
    valid until the next one is asked for."""
    if not isinstance(tensor, TensorEntry):
        flat = read_tensor(tensor, reader).reshape(-1)
        count = max(nbytes // flat.element_size(), 1)
        for start in range(0, flat.numel(), count):
            yield flat[start : start + count]
        return
    step = max(nbytes // DTYPES[tensor.dtype][1], 1) * DTYPES[tensor.dtype][1]
    buffer = torch.empty(min(step, tensor.nbytes), dtype=torch.uint8)
    for offset in range(0, tensor.nbytes, step):
        piece = buffer[: min(step, tensor.nbytes - offset)]
        reader.read_bytes_into(tensor.file, tensor.start + offset, piece)
        yield piece.view(tensor.torch_dtype)


def dtype_of(tensor: AdapterTensor) -> torch.dtype:
    return tensor.torch_dtype if isinstance(tensor, TensorEntry) else tensor.dtype


def _read_safetensors(path: Path) -> dict[str, AdapterTensor]:
    try:
        header = read_safetensors_header(path)
    except CheckpointFormatError as exc:
        raise AdapterFormatError(str(exc)) from exc
    return {entry.name: entry for entry in header.tensors}


def _read_pickle(path: Path) -> dict[str, AdapterTensor]:
    """Load a .bin adapter with weights_only=True: plain tensors only, nothing is ever executed."""
    # mmap needs the zip format of torch >= 1.6; older .bin files are read whole (adapters are small).
    return dict(load_plain_tensors(path, AdapterFormatError, mmap=zipfile.is_zipfile(path)))
