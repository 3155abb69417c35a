"""One output tensor's task (copy, convert, merge or replace) and the update merged into it: a LoRA's delta (and
lora_bias), or trainable token rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapter.config import LoraConfig
from ..adapter.weights import PEFT_PREFIX, LoraPair, Replacement, TokenDelta
from ..errors import AdapterFormatError, ShapeMismatch, UnsupportedAdapter
from ..inputs.format import DTYPES, FLOAT_DTYPES, TensorEntry
from ..inputs.index import CheckpointIndex
from ..merging.variants import Layout, fitting_layouts, lora_scaling, module_rank_alpha, rounds_delta
from .embeddings import DEFAULT_HEAD, Embeddings
from .keymap import is_expert_linear
from .orientation import Orientation, find_orientation
from .tasks import Action, BiasUpdate, LoraUpdate, OutputTensor, TensorTask, TokenUpdate, Update, Updates


def tensor_task(
    entry: TensorEntry,
    name: str,
    out_dtype: str,
    replacement: Replacement | None,
    update: Update | None,
    adapter_keys: tuple[str, ...],
    embeddings: Embeddings,
    adapter_path: Path,
    note: str = "",
) -> TensorTask:
    target_dtype = out_dtype if entry.dtype in FLOAT_DTYPES else entry.dtype
    shape = entry.shape
    if replacement is not None:
        if entry.dtype not in FLOAT_DTYPES:
            raise UnsupportedAdapter(
                f"{adapter_path}: '{replacement.key}' replaces '{entry.name}', which is stored as {entry.dtype}"
            )
        resizable = entry.name in (embeddings.input, embeddings.output) or name == DEFAULT_HEAD
        if replacement.shape != shape and not (resizable and len(shape) == 2 and replacement.shape[1:] == shape[1:]):
            raise ShapeMismatch(
                f"{adapter_path}: '{replacement.key}' is {replacement.shape} but base tensor '{entry.name}' is {shape}"
            )
        shape = replacement.shape
    output = OutputTensor(name, target_dtype, shape)
    held = _held_dtype(entry.dtype, target_dtype)
    if update is not None:
        action = Action.MERGE
    elif replacement is not None:
        action = Action.REPLACE
    elif target_dtype == entry.dtype:
        action = Action.COPY
    else:
        action = Action.CONVERT
    return TensorTask(output, action, held, entry, replacement, update, adapter_keys, note)


def _held_dtype(base_dtype: str, out_dtype: str) -> str:
    """PEFT merges in the dtype the model was loaded in: the base's, or a wider output dtype (the oracle for a
    float32 output loads the model in float32)."""
    if base_dtype not in FLOAT_DTYPES or DTYPES[out_dtype][1] <= DTYPES[base_dtype][1]:
        return base_dtype
    return out_dtype


def token_rows_update(
    config: LoraConfig, tokens: TokenDelta, shape: tuple[int, ...], embeddings: Embeddings, entry: TensorEntry
) -> TokenUpdate:
    """The token rows a trainable_tokens_delta replaces, from trainable_token_indices: a plain list names rows of
    the input embedding (and of a head tied to it); a mapping names them per module, matched by name tail."""
    module = tokens.name.removesuffix(".weight")
    indices = config.trainable_token_indices
    found = [ids for name, ids in indices.items() if name and (module == name or module.endswith(f".{name}"))]
    if not found and "" in indices and entry.name == embeddings.input:
        found = [indices[""]]
    if len(found) != 1:
        raise AdapterFormatError(
            f"{config.path}: trainable_token_indices names no token rows for '{module}' ('{tokens.key}')"
        )
    ids = found[0]
    delta_shape = tuple(int(n) for n in tokens.tensor.shape)
    if len(shape) != 2 or delta_shape != (len(ids), shape[1]):
        raise ShapeMismatch(
            f"{config.path}: '{tokens.key}' is {delta_shape} but {len(ids)} token ids of the {shape} weight "
            f"'{entry.name}' need ({len(ids)}, {shape[1] if len(shape) == 2 else '?'})"
        )
    if max(ids, default=0) >= shape[0]:
        raise ShapeMismatch(f"{config.path}: token id {max(ids)} is outside '{entry.name}', which has {shape[0]} rows")
    return TokenUpdate(indices=ids, delta=tokens.tensor)


def rank_and_scaling(pair: LoraPair, config: LoraConfig) -> tuple[int, float]:
    """The rank adapter_config.json gives a module, and its scaling."""
    r, alpha = module_rank_alpha(pair.module, config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern)
    return r, lora_scaling(alpha, r, config.use_rslora)


@dataclass(frozen=True)
class LoraRules:
    """What turns a LoRA pair into the update of its weight, besides the pair and the weight: the adapter file
    (named in messages), its config (rank, alpha, rsLoRA, MiCA), the base (for lora_bias's bias) and its config, and
    how the base stores square weights."""

    adapter_path: Path
    base: CheckpointIndex
    config: LoraConfig
    base_config: dict[str, Any]
    orientation: Orientation | None = None

    def updates(
        self, pair: LoraPair, name: str, weight: TensorEntry, replacement: Replacement | None = None
    ) -> Updates:
        """What one LoRA does to the output, per output tensor with the adapter keys it uses: the delta on the weight
        `name` (whose values are `weight`'s, or `replacement`'s), and with lora_bias the bias added to `name`'s bias,
        which the base must have (PEFT cannot merge it either: "the base layer has no bias")."""
        update = self.update(pair, weight, replacement)
        bias_key = pair.bias_key
        updates: Updates = {name: (update, tuple(k for k in pair.keys if k != bias_key))}
        if pair.bias is None:
            return updates
        bias_name = name.removesuffix(".weight") + ".bias"
        bias_entry = self.base.tensors.get(bias_name)
        if bias_entry is None:
            raise UnsupportedAdapter(
                f"{self.adapter_path}: '{bias_key}' is a LoRA bias but base tensor '{name}' has no bias to add it to"
            )
        if bias_entry.shape != tuple(pair.bias.shape):
            raise ShapeMismatch(
                f"{self.adapter_path}: '{bias_key}' is {tuple(pair.bias.shape)} but base tensor '{bias_name}' "
                f"is {bias_entry.shape}"
            )
        updates[bias_name] = (BiasUpdate(pair.bias, update.scaling), (bias_key,))
        return updates

    def update(self, pair: LoraPair, weight: TensorEntry, replacement: Replacement | None = None) -> LoraUpdate:
        key = f"{PEFT_PREFIX}{pair.module}"
        if weight.dtype not in FLOAT_DTYPES:
            raise UnsupportedAdapter(
                f"{weight.file}: '{weight.name}' is stored as {weight.dtype}; merging into quantized weights is not "
                "supported (use the full-precision base)"
            )
        r, scaling = rank_and_scaling(pair, self.config)
        if pair.rank != r:
            raise ShapeMismatch(
                f"{self.adapter_path}: '{key}' has rank {pair.rank} but adapter_config.json gives it r={r}"
            )
        shape = replacement.shape if replacement is not None else weight.shape
        rows, cols = pair.weight_shape
        if len(pair.kernel) == 3 and pair.kernel[:2] == (1, 1):
            # PEFT takes a kernel starting (1, 1) for a 1x1 Conv2d and squeezes two dims of five: its merge fails
            raise UnsupportedAdapter(
                f"{self.adapter_path}: '{key}' is a LoRA on a Conv3d with a {pair.kernel} kernel, which PEFT "
                "cannot merge either; not supported"
            )
        if 0 in shape:
            raise UnsupportedAdapter(
                f"{self.adapter_path}: '{key}' updates '{weight.name}', which is empty {shape}; a LoRA on an "
                "empty weight is not supported"
            )
        if pair.embedding:
            layout: Layout | None = Layout.EMBEDDING if shape == (rows, cols) else None
        elif pair.kernel:
            layout = Layout.CONV if shape == (rows, cols, *pair.kernel) else None
        else:
            layouts = fitting_layouts(shape, rows, cols)
            layout = layouts[0] if len(layouts) == 1 else None
            if len(layouts) == 2:
                orientation = self.orientation or find_orientation(self.base_config, {}, {}, None)
                layout = orientation.square(self.adapter_path, key, weight.name)
        if layout is None:
            what = "an embedding" if pair.embedding else "a"
            expected = (rows, cols, *pair.kernel)
            raise ShapeMismatch(
                f"{self.adapter_path}: '{key}' updates {what} {expected} weight but base tensor '{weight.name}' "
                f"is {shape}"
            )
        return LoraUpdate(
            pair=pair,
            scaling=scaling,
            layout=layout,
            round_delta=rounds_delta(
                layout, self.config.mica, is_expert_linear(weight.name, self.base_config.get("model_type"))
            ),
        )
