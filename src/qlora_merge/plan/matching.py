"""Decide, before any byte is written, what happens to every tensor: copy, convert, merge or replace, and where it goes.

Pure: reads headers and configs only (a comparison of two adapter tensors, where tying depends on it, is passed
in). Every error a user can cause through mismatched inputs is raised here, so a bad merge fails in a second,
not after minutes of writing.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..adapter.config import LoraConfig
from ..adapter.selection import module_of, unselected_error, warn_unselected
from ..adapter.weights import (
    PEFT_PREFIX,
    AdapterTensor,
    AdapterWeights,
    CombinedFactor,
    LoraPair,
    Replacement,
    TokenDelta,
    describe_key,
)
from ..dtypes import OUTPUT_DTYPES
from ..errors import AdapterFormatError, KeyMatchError, ShapeMismatch, UnsupportedAdapter
from ..inputs.format import DTYPES, FLOAT_DTYPES, TensorEntry
from ..inputs.index import CheckpointIndex
from ..merging.variants import (
    GPT2_CONV1D,
    MOE_TRANSPOSED_MODEL_TYPES,
    Layout,
    conv1d_names,
    fitting_layouts,
    lora_scaling,
    module_rank_alpha,
    rounds_delta,
)
from .keymap import EXPERT_LAYOUTS, Loader, is_expert_linear, match_tensors
from .tasks import (
    Action,
    BiasUpdate,
    ExpertUpdate,
    LoraUpdate,
    MergePlan,
    OutputTensor,
    TensorTask,
    TokenUpdate,
    Update,
    Updates,
)

log = logging.getLogger(__name__)


# Module names of a language model's input embedding and output head, as transformers names them.
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in")
OUTPUT_HEADS = ("lm_head", "embed_out")
DEFAULT_HEAD = "lm_head.weight"

# Tells whether two adapter tensors hold the same values (the second transposed when asked).
SameValues = Callable[[AdapterTensor, AdapterTensor, bool], bool]


@dataclass(frozen=True)
class CoverageRow:
    """One adapter tensor and what it does to the output (`target` is empty when it updates nothing)."""

    adapter_key: str
    role: str
    adapter_shape: tuple[int, ...]
    target: str
    target_shape: tuple[int, ...]
    action: str


def coverage(plan: MergePlan, weights: AdapterWeights) -> list[CoverageRow]:
    """Every adapter tensor -> the output tensor it changes, in adapter-file order. Each one must be accounted for:
    used, a checked tied copy, not needed, or explicitly allowed unused; one the plan forgot is a bug."""
    rows: dict[str, CoverageRow] = {}
    per_expert = Counter(
        t.update.pair.keys for t in plan.tasks if isinstance(t.update, ExpertUpdate) and t.update.expert is not None
    )
    for task in plan.tasks:
        action = task.action.value + (f", {task.note}" if task.note else "")
        if isinstance(task.update, LoraUpdate):
            action += f", {task.update.layout.value}" + (" DoRA" if task.update.dora else "")
        elif isinstance(task.update, TokenUpdate):
            action += f", {len(task.update.indices)} token rows replaced"
        elif isinstance(task.update, ExpertUpdate):
            update = task.update
            if update.expert is None:
                action += f", all {update.experts} experts"
            else:  # one row per key: its first tensor, and how many it updates
                action += f", {update.experts} experts in {per_expert[update.pair.keys]} per-expert tensors like it"
                if any(key in rows for key in task.adapter_keys):
                    continue
        for key in task.adapter_keys:
            rows[key] = CoverageRow(
                key, describe_key(key), weights.shapes[key], task.output.name, task.output.shape, action
            )
    for key in plan.tied_copies:
        rows[key] = CoverageRow(key, describe_key(key), weights.shapes[key], "", (), "tied copy of the embedding's")
    for key in plan.unused:
        why = f"{plan.unused_reasons[key]}, " if key in plan.unused_reasons else ""
        rows[key] = CoverageRow(key, describe_key(key), weights.shapes[key], "", (), f"unused ({why}--allow-unused)")
    for key, why in weights.redundant.items():
        rows[key] = CoverageRow(key, describe_key(key), weights.shapes[key], "", (), f"not needed: {why}")
    missing = [key for key in weights.shapes if key not in rows]
    if missing:
        raise RuntimeError(f"{weights.path}: adapter tensors the plan does not use: {', '.join(missing[:5])}")
    return [rows[key] for key in weights.shapes]


@dataclass(frozen=True)
class Embeddings:
    """Where the base keeps its input embedding and output head, and whether they share one tensor."""

    input: str | None
    output: str | None
    tied: bool


def build_plan(
    base: CheckpointIndex,
    base_config: dict[str, Any],
    config: LoraConfig,
    weights: AdapterWeights,
    loader: Loader,
    dtype: str,
    allow_unused: bool = False,
    same_values: SameValues | None = None,
) -> MergePlan:
    """One task per output tensor, in the base's own order, so the input is read front to back."""
    out_dtype = OUTPUT_DTYPES[dtype]
    adapter_file = str(weights.path)
    changes: dict[str, Any] = {}
    if config.layer_replication:
        base, changes = replicate_layers(base, base_config, config.layer_replication, weights.path)
    embeddings = find_embeddings(base, base_config)
    # A module the config leaves out that matches nothing in the base either is reported as matching nothing.
    stray = _matching_nothing(weights.unselected, base, loader, adapter_file, embeddings)
    unselected = {key: why for key, why in weights.unselected.items() if key not in stray}
    if unselected and not allow_unused:
        raise unselected_error(config, weights, unselected)

    expert_updates, expert_modules, unmatched_experts = _expert_updates(weights, config, base, base_config, loader)
    lora_names = {f"{module}.weight": pair for module, pair in weights.pairs.items() if module not in expert_modules}
    names = list(dict.fromkeys([*lora_names, *weights.replacements, *weights.token_deltas]))
    matched = match_tensors(names, base.tensors, loader, adapter_file, optional=names)

    unmatched = [name for name, target in matched.items() if target is None]
    _refuse_unmergeable([lora_names[name] for name in unmatched if name in lora_names], base, loader, adapter_file)
    head = _tied_head(unmatched, embeddings)
    orientation = _orientation(base_config, lora_names, matched, base)
    replacements: dict[str, Replacement] = {}
    keys: dict[str, list[str]] = {}
    for name, replacement in weights.replacements.items():
        target = matched[name]
        if target is not None:
            replacements[target] = replacement
            keys.setdefault(target, []).append(replacement.key)
    updates: dict[str, Update] = {}
    for name, pair in lora_names.items():
        target = matched[name]
        if target is None:
            continue
        entry = base.tensors[target]
        lora = _lora_updates(
            weights.path, pair, target, entry, base, config, base_config, replacements.get(target), orientation
        )
        for output, (update, update_keys) in lora.items():
            updates[output] = update
            keys.setdefault(output, []).extend(update_keys)
    for target, (update, update_keys) in expert_updates.items():
        if target in updates or target in replacements:
            raise UnsupportedAdapter(
                f"{adapter_file}: '{update_keys[0]}' updates expert weight '{target}', which other adapter tensors "
                "also update or replace"
            )
        updates[target] = update
        keys.setdefault(target, []).extend(update_keys)
    for name, tokens in weights.token_deltas.items():
        target = matched[name]
        if target is None:
            continue
        if target in updates:
            raise UnsupportedAdapter(
                f"{adapter_file}: '{tokens.key}' trains tokens of '{target}', which a LoRA also updates; "
                "PEFT does not combine the two on one module"
            )
        shape = replacements[target].shape if target in replacements else base.tensors[target].shape
        updates[target] = _token_update(config, tokens, shape, embeddings, base.tensors[target])
        keys.setdefault(target, []).append(tokens.key)

    tied_copies: list[str] = []
    head_task = None
    if embeddings.tied and embeddings.input is not None:
        head_task, head_keys, head_bias = _tied_head_task(
            base,
            embeddings.input,
            head,
            lora_names,
            weights,
            replacements,
            updates,
            config,
            base_config,
            out_dtype,
            embeddings,
            same_values,
            orientation,
        )
        if head_task is None:
            tied_copies.extend(head_keys)
        else:
            changes["tie_word_embeddings"] = False
        for output, (update, update_keys) in head_bias.items():
            updates[output] = update
            keys.setdefault(output, []).extend(update_keys)

    tasks = []
    for entry in base.tensors.values():
        tasks.append(
            _task(
                entry,
                entry.name,
                out_dtype,
                replacements.get(entry.name),
                updates.get(entry.name),
                tuple(keys.get(entry.name, ())),
                embeddings,
                weights.path,
            )
        )
    if head_task is not None:
        tasks.append(head_task)
    unused = list(unmatched_experts)
    for name in unmatched:
        if name == head and embeddings.tied and embeddings.input is not None:
            continue
        if name in lora_names:
            unused.extend(lora_names[name].keys)
        if name in weights.replacements:
            unused.append(weights.replacements[name].key)
        if name in weights.token_deltas:
            unused.append(weights.token_deltas[name].key)
    unused.extend(stray)
    if unused and not allow_unused:
        # One short line: the file, the first module, how many more, the fix. The full keys are in --debug's log
        # and in `inspect`, which lists every unmatched tensor.
        modules = list(dict.fromkeys(_module_of(key) for key in unused))
        more = f" (and {len(modules) - 1} more modules)" if len(modules) > 1 else ""
        log.debug("adapter tensors matching no base tensor: %s", ", ".join(unused))
        raise KeyMatchError(
            f"{adapter_file}: module '{modules[0]}'{more} matches no tensor of the base checkpoint; "
            "pass --allow-unused to merge without it"
        )
    for key in unused:
        log.warning("%s: '%s' updates no tensor of the base checkpoint; left out (--allow-unused)", adapter_file, key)
    if unselected:
        warn_unselected(config, unselected)
        unused.extend(unselected)
    _vocab_changes(tasks, base, embeddings, changes, weights.path)
    return MergePlan(
        tasks=tuple(tasks),
        config_changes=changes,
        unused=tuple(unused),
        tied_copies=tuple(tied_copies),
        unused_reasons={key: f"not selected by adapter_config.json: {why}" for key, why in unselected.items()},
    )


def _matching_nothing(
    unselected: dict[str, str], base: CheckpointIndex, loader: Loader, adapter_file: str, embeddings: Embeddings
) -> list[str]:
    """The keys of unselected modules whose weight matches no base tensor (the output head of a tied base
    matches its embedding)."""
    modules = {key: module_of(key) for key in unselected}
    names = list(dict.fromkeys(f"{module}.weight" for module in modules.values()))
    try:
        found = match_tensors(names, base.tensors, loader, adapter_file, optional=names)
    except KeyMatchError:  # ambiguous: it matches something
        return []
    tied_head = embeddings.tied and embeddings.input is not None
    return [
        key
        for key, module in modules.items()
        if found[f"{module}.weight"] is None and not (tied_head and _leaf_module(f"{module}.weight") in OUTPUT_HEADS)
    ]


# The decoder layer lists PEFT's replicate_layers knows: llama-like `layers`, bert's `encoder.layer`, falcon's `h`.
LAYER_LIST = re.compile(r"^((?:.*\.)?(?:layers|encoder\.layer|h))\.(\d+)\.(.+)$")


def replicate_layers(
    base: CheckpointIndex, base_config: dict[str, Any], ranges: tuple[tuple[int, int], ...], adapter_path: Path
) -> tuple[CheckpointIndex, dict[str, Any]]:
    """layer_replication: the base as PEFT's adapted model holds it, and the config.json changes that follow.

    PEFT's `replicate_layers` builds a new layer list from the [start, end) ranges (`[[0, 2], [1, 3]]` on three
    layers gives 0, 1, 1, 2), the copies sharing the base's weights and each getting its own LoRA. Layer j of the
    result reads base layer map[j]'s bytes under the name `<prefix>.j.*`, so every copy is materialised and merged
    with its own delta. (PEFT's merge_and_unload would add all copies' deltas into the one shared weight.)
    """
    groups: dict[str, dict[int, list[TensorEntry]]] = {}
    for entry in base.tensors.values():
        found = LAYER_LIST.match(entry.name)
        if found:
            groups.setdefault(found.group(1), {}).setdefault(int(found.group(2)), []).append(entry)
    if not groups:
        raise UnsupportedAdapter(
            f"{adapter_path}: layer_replication needs a list of decoder layers ('model.layers.N.*'), and the base "
            "checkpoint has none"
        )
    # The decoder's own list: the longest, then the shortest name (not `mtp.layers`, a one-layer extra head)
    prefix = min(groups, key=lambda p: (-len(groups[p]), p.count("."), p))
    layers = groups[prefix]
    count = len(layers)
    if sorted(layers) != list(range(count)):
        raise ShapeMismatch(f"{base.root}: the layers under '{prefix}' are not numbered 0 to {count - 1}")
    mapping = [i for start, end in ranges for i in range(start, end)]
    if max(mapping) >= count:
        raise ShapeMismatch(
            f"{adapter_path}: layer_replication {[list(r) for r in ranges]} names layer {max(mapping)}, but the "
            f"base has {count} layers under '{prefix}'"
        )
    tensors: dict[str, TensorEntry] = {}
    placed = False
    for entry in base.tensors.values():
        found = LAYER_LIST.match(entry.name)
        if not found or found.group(1) != prefix:
            tensors[entry.name] = entry
        elif not placed:
            placed = True
            for new, old in enumerate(mapping):  # the new layer list, where the base's first layer was
                for source in layers[old]:
                    rest = LAYER_LIST.match(source.name).group(3)  # type: ignore[union-attr]
                    name = f"{prefix}.{new}.{rest}"
                    tensors[name] = dataclasses.replace(source, name=name)
    changes: dict[str, Any] = {"num_hidden_layers": len(mapping)}
    for config in (base_config, base_config.get("text_config")):
        types = config.get("layer_types") if isinstance(config, dict) else None
        if isinstance(types, list) and len(types) == count:
            changes["layer_types"] = [types[i] for i in mapping]
    return dataclasses.replace(base, tensors=tensors), changes


def find_embeddings(base: CheckpointIndex, base_config: dict[str, Any]) -> Embeddings:
    """The input embedding and output head tensors by their usual names; tied when the checkpoint has no head
    (transformers does not save a tied head) and the config does not say otherwise."""
    inputs = [n for n in base.tensors if _leaf_module(n) in INPUT_EMBEDDINGS and n.endswith(".weight")]
    outputs = [n for n in base.tensors if _leaf_module(n) in OUTPUT_HEADS and n.endswith(".weight")]
    # The shortest name is the language model's own (`model.embed_tokens`, not `mtp.layers.0.embed_tokens`).
    input_name = min(inputs, key=lambda n: (n.count("."), n)) if inputs else None
    output_name = min(outputs, key=lambda n: (n.count("."), n)) if outputs else None
    tie = base_config.get("tie_word_embeddings")
    text_tie = (base_config.get("text_config") or {}).get("tie_word_embeddings")
    explicitly_untied = tie is False or (tie is None and text_tie is False)
    return Embeddings(input_name, output_name, input_name is not None and output_name is None and not explicitly_untied)


def _task(
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


def _tied_head(unmatched: list[str], embeddings: Embeddings) -> str | None:
    """The adapter's name for the output head of a tied base (which has no head tensor of its own)."""
    if not embeddings.tied:
        return None
    heads = sorted({n for n in unmatched if _leaf_module(n) in OUTPUT_HEADS and n.endswith(".weight")})
    return heads[0] if len(heads) == 1 else None


def _tied_head_task(
    base: CheckpointIndex,
    input_name: str,
    head: str | None,
    lora_names: dict[str, LoraPair],
    weights: AdapterWeights,
    replacements: dict[str, Replacement],
    updates: dict[str, Update],
    config: LoraConfig,
    base_config: dict[str, Any],
    out_dtype: str,
    embeddings: Embeddings,
    same_values: SameValues | None,
    orientation: Orientation | None = None,
) -> tuple[TensorTask | None, tuple[str, ...], Updates]:
    """The output head of a tied base, as the unmerged PeftModel computes it: None while it still equals the merged
    embedding (tying survives), else a task writing it as its own tensor; with the head's adapter keys, and the
    update of the head's bias (a LoRA bias, lora_bias) with its keys.

    In the unmerged model the head shares the embedding's *base* parameter: it sees what the adapter loads into
    that parameter (`embed_tokens.base_layer.weight`, or a resized embedding saved as `embed_tokens.weight`), but
    not the embedding's LoRA nor a modules_to_save copy of it. The head's own adapter tensors (a LoRA on lm_head,
    lm_head in modules_to_save) apply to the head only, except where they are ensure_weight_tying's mirror of
    the embedding's (checked by value).
    """
    entry = base.tensors[input_name]
    head_pair = lora_names.get(head) if head else None
    head_replacement = weights.replacements.get(head) if head else None
    head_tokens = weights.token_deltas.get(head) if head else None
    head_keys = (head_pair.keys if head_pair else ()) + tuple(
        t.key for t in (head_replacement, head_tokens) if t is not None
    )
    embed_replacement = replacements.get(input_name)
    embed_update = updates.get(input_name)
    shared = embed_replacement if embed_replacement and not _is_trained_copy(embed_replacement, config) else None
    head_values = head_replacement or shared
    if head_pair is not None and head_tokens is not None:
        raise UnsupportedAdapter(f"{weights.path}: '{head_tokens.key}' trains tokens of a head a LoRA also updates")
    head_values_shape = head_values.shape if head_values is not None else entry.shape
    token_update = (
        _token_update(config, head_tokens, head_values_shape, embeddings, entry) if head_tokens is not None else None
    )
    if _same_weight(head_values, embed_replacement, same_values) and _same_update(
        head_pair, token_update, embed_update, config, same_values
    ):
        return None, head_keys, {}
    name = head or DEFAULT_HEAD
    update: Update | None = token_update
    lora: Updates = {}
    if head_pair is not None:
        lora = _lora_updates(weights.path, head_pair, name, entry, base, config, base_config, head_values, orientation)
        update, lora_keys = lora.pop(name)
        head_keys = lora_keys + tuple(t.key for t in (head_replacement, head_tokens) if t is not None)
    note = f"untied from {entry.name}"
    task = _task(
        entry,
        name,
        out_dtype,
        head_values,
        update,
        head_keys,
        embeddings,
        weights.path,
        note,
    )
    return task, head_keys, lora


def _token_update(
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


def _is_trained_copy(replacement: Replacement, config: LoraConfig) -> bool:
    """A modules_to_save tensor: a copy trained beside the base module, which a tied head does not see."""
    if replacement.wrapper == "base_layer":
        return False
    if replacement.wrapper == "modules_to_save":
        return True
    module = replacement.name.rpartition(".")[0]
    return any(module == m or module.endswith(f".{m}") for m in config.modules_to_save or ())


def _same_weight(
    head_values: Replacement | None, embed_values: Replacement | None, same_values: SameValues | None
) -> bool:
    if head_values is None or embed_values is None:
        return head_values is embed_values
    if head_values is embed_values:
        return True
    return same_values is not None and same_values(head_values.tensor, embed_values.tensor, False)


def _same_update(
    head_pair: LoraPair | None,
    head_tokens: TokenUpdate | None,
    embed_update: Update | None,
    config: LoraConfig,
    same_values: SameValues | None,
) -> bool:
    """No update on either; trainable tokens on the embedding, which PEFT ties the head's token adapter to (saving
    no delta for the head, or the same one again); or a head LoRA that is ensure_weight_tying's mirror of the
    embedding's: A = the embedding's B.T and B = its A.T with the same scaling, which is the same delta."""
    if head_tokens is not None:
        return (
            isinstance(embed_update, TokenUpdate)
            and head_tokens.indices == embed_update.indices
            and same_values is not None
            and same_values(head_tokens.delta, embed_update.delta, False)
        )
    if isinstance(embed_update, TokenUpdate):
        return head_pair is None
    if head_pair is None or embed_update is None:
        return head_pair is None and embed_update is None
    if not isinstance(embed_update, LoraUpdate) or embed_update.dora or head_pair.magnitude is not None:
        return False
    if head_pair.bias is not None:  # an embedding LoRA has no bias (PEFT refuses lora_bias there): no mirror
        return False
    embed_pair = embed_update.pair
    if same_values is None or not embed_pair.embedding:
        return False
    if _rank_and_scaling(head_pair, config)[1] != embed_update.scaling:
        return False
    return _mirrored(head_pair.a, head_pair.b, embed_pair.a, embed_pair.b, same_values)


def _mirrored(
    head_a: AdapterTensor, head_b: AdapterTensor, embed_a: AdapterTensor, embed_b: AdapterTensor, same: SameValues
) -> bool:
    """Whether a head LoRA is ensure_weight_tying's mirror of the embedding's: A = the embedding's B.T and B = its
    A.T. Combined adapters (see adapter.combine) are mirrors when each adapter's parts are, at the same weight and
    scaling: the combination scales A on both, so their combined factors are not transposes of each other."""
    if isinstance(head_a, CombinedFactor) or isinstance(embed_a, CombinedFactor):
        if not (
            isinstance(head_a, CombinedFactor)
            and isinstance(head_b, CombinedFactor)
            and isinstance(embed_a, CombinedFactor)
            and isinstance(embed_b, CombinedFactor)
        ):
            return False
        return (
            head_a.multipliers == embed_a.multipliers
            and len(head_a.parts) == len(embed_a.parts)
            and all(
                _mirrored(*parts, same)
                for parts in zip(head_a.parts, head_b.parts, embed_a.parts, embed_b.parts, strict=True)
            )
        )
    return same(head_a, embed_b, True) and same(head_b, embed_a, True)


def _vocab_changes(
    tasks: list[TensorTask], base: CheckpointIndex, embeddings: Embeddings, changes: dict[str, Any], path: Path
) -> None:
    """A resized embedding or head: config.json's vocab_size follows; the two must agree."""
    resized = False
    sizes: dict[str, int] = {}
    for task in tasks:
        if task.source is not None and task.source.name in (embeddings.input, embeddings.output):
            sizes[task.output.name] = task.output.shape[0]
            resized |= task.output.shape != task.source.shape
    if not resized:
        return
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"'{name}' has {n} rows" for name, n in sizes.items())
        raise ShapeMismatch(
            f"{path}: the adapter resizes the vocabulary but not every embedding ({shown}): the new rows of the "
            "other one were never trained or saved (PEFT saves a resized head only when it is targeted or in "
            "modules_to_save)"
        )
    changes["vocab_size"] = next(iter(sizes.values()))


def _rank_and_scaling(pair: LoraPair, config: LoraConfig) -> tuple[int, float]:
    """The rank adapter_config.json gives a module, and its scaling."""
    r, alpha = module_rank_alpha(pair.module, config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern)
    return r, lora_scaling(alpha, r, config.use_rslora)


def _lora_updates(
    adapter_path: Path,
    pair: LoraPair,
    name: str,
    weight: TensorEntry,
    base: CheckpointIndex,
    config: LoraConfig,
    base_config: dict[str, Any],
    replacement: Replacement | None = None,
    orientation: Orientation | None = None,
) -> Updates:
    """What one LoRA does to the output, per output tensor with the adapter keys it uses: the delta on the weight
    `name` (whose values are `weight`'s, or `replacement`'s), and with lora_bias the bias added to `name`'s bias,
    which the base must have (PEFT cannot merge it either: "the base layer has no bias")."""
    update = _lora_update(adapter_path, pair, weight, config, base_config, replacement, orientation)
    bias_key = pair.bias_key
    updates: Updates = {name: (update, tuple(k for k in pair.keys if k != bias_key))}
    if pair.bias is None:
        return updates
    bias_name = name.removesuffix(".weight") + ".bias"
    bias_entry = base.tensors.get(bias_name)
    if bias_entry is None:
        raise UnsupportedAdapter(
            f"{adapter_path}: '{bias_key}' is a LoRA bias but base tensor '{name}' has no bias to add it to"
        )
    if bias_entry.shape != tuple(pair.bias.shape):
        raise ShapeMismatch(
            f"{adapter_path}: '{bias_key}' is {tuple(pair.bias.shape)} but base tensor '{bias_name}' "
            f"is {bias_entry.shape}"
        )
    updates[bias_name] = (BiasUpdate(pair.bias, update.scaling), (bias_key,))
    return updates


def _lora_update(
    adapter_path: Path,
    pair: LoraPair,
    weight: TensorEntry,
    config: LoraConfig,
    base_config: dict[str, Any],
    replacement: Replacement | None = None,
    orientation: Orientation | None = None,
) -> LoraUpdate:
    key = f"{PEFT_PREFIX}{pair.module}"
    if weight.dtype not in FLOAT_DTYPES:
        raise UnsupportedAdapter(
            f"{weight.file}: '{weight.name}' is stored as {weight.dtype}; merging into quantized weights is not "
            "supported (use the full-precision base)"
        )
    r, scaling = _rank_and_scaling(pair, config)
    if pair.rank != r:
        raise ShapeMismatch(f"{adapter_path}: '{key}' has rank {pair.rank} but adapter_config.json gives it r={r}")
    shape = replacement.shape if replacement is not None else weight.shape
    rows, cols = pair.weight_shape
    if len(pair.kernel) == 3 and pair.kernel[:2] == (1, 1):
        # PEFT takes a kernel starting (1, 1) for a 1x1 Conv2d and squeezes two dims of five: its merge fails
        raise UnsupportedAdapter(
            f"{adapter_path}: '{key}' is a LoRA on a Conv3d with a {pair.kernel} kernel, which PEFT cannot merge "
            "either; not supported"
        )
    if 0 in shape:
        raise UnsupportedAdapter(
            f"{adapter_path}: '{key}' updates '{weight.name}', which is empty {shape}; a LoRA on an empty weight is "
            "not supported"
        )
    if pair.embedding:
        layout: Layout | None = Layout.EMBEDDING if shape == (rows, cols) else None
    elif pair.kernel:
        layout = Layout.CONV if shape == (rows, cols, *pair.kernel) else None
    else:
        layouts = fitting_layouts(shape, rows, cols)
        layout = layouts[0] if len(layouts) == 1 else None
        if len(layouts) == 2:
            layout = (orientation or _orientation(base_config, {}, {}, None)).square(adapter_path, key, weight.name)
    if layout is None:
        what = "an embedding" if pair.embedding else "a"
        expected = (rows, cols, *pair.kernel)
        raise ShapeMismatch(
            f"{adapter_path}: '{key}' updates {what} {expected} weight but base tensor '{weight.name}' is {shape}"
        )
    return LoraUpdate(
        pair=pair,
        scaling=scaling,
        layout=layout,
        round_delta=rounds_delta(layout, config.mica, is_expert_linear(weight.name, base_config.get("model_type"))),
    )


@dataclass(frozen=True)
class Orientation:
    """Whether a square 2-D weight is an nn.Linear's (out, in) or a Conv1D's (in, out), which its shape cannot
    tell: PEFT decides by the layer's class. Known from the architecture (variants.conv1d_names); for code that is
    not transformers' own, Conv1D only appears in GPT-2-derived code, under GPT-2's layer names, so only those
    names are in doubt, and the adapter's non-square layers of those names settle it when they agree."""

    names: frozenset[str] | None  # Conv1D layer names of a known architecture
    evidence: Layout | None  # the layout of the adapter's non-square GPT-2-named layers, when one
    unknown_why: str

    def square(self, adapter_path: Path, key: str, weight_name: str) -> Layout:
        leaf = _strip_base_layers(key.removeprefix(PEFT_PREFIX)).rpartition(".")[2]
        if self.names is not None:
            return Layout.CONV1D if leaf in self.names else Layout.LINEAR
        if leaf not in GPT2_CONV1D:
            return Layout.LINEAR
        if self.evidence is not None:
            return self.evidence
        raise UnsupportedAdapter(
            f"{adapter_path}: '{key}' updates the square weight '{weight_name}', stored (out, in) if it is an "
            f"nn.Linear and (in, out) if it is GPT-2's Conv1D, and which it is cannot be known: {self.unknown_why}, "
            "and no non-square layer of the adapter named like GPT-2's shows it"
        )


def _orientation(
    base_config: dict[str, Any],
    lora_names: dict[str, LoraPair],
    matched: dict[str, str | None],
    base: CheckpointIndex | None,
) -> Orientation:
    names = conv1d_names(base_config)
    if names is not None:
        return Orientation(names, None, "")
    if base_config.get("auto_map"):
        why = "the base runs code of its own (auto_map in config.json), not transformers'"
    elif base_config:
        why = "config.json names no model_type"
    else:
        why = "the base has no config.json naming its architecture"
    seen: set[Layout] = set()
    for name, pair in lora_names.items():
        target = matched.get(name)
        leaf = _strip_base_layers(pair.module).rpartition(".")[2]
        if base is None or target is None or pair.embedding or pair.kernel or leaf not in GPT2_CONV1D:
            continue
        layouts = fitting_layouts(base.tensors[target].shape, *pair.weight_shape)
        if len(layouts) == 1:
            seen.add(layouts[0])
    return Orientation(None, seen.pop() if len(seen) == 1 else None, why)


def _refuse_unmergeable(pairs: list[LoraPair], base: CheckpointIndex, loader: Loader, adapter_file: str) -> None:
    """LoRA modules that match no base weight because the base holds that layer otherwise: nn.MultiheadAttention
    (in_proj_weight, and PEFT's LoRA on its out_proj under `base_layer.out_proj`) and quantized layers (GPTQ and
    AWQ's qweight). Named for what they are, whatever --allow-unused says: leaving them out merges nothing of them."""
    probes: dict[str, tuple[str, LoraPair]] = {}
    for pair in pairs:
        owner = pair.module.split(".base_layer.")[0]
        probes[f"{owner}.in_proj_weight"] = ("attention", pair)
        probes[f"{pair.module}.qweight"] = ("quantized", pair)
    if not probes:
        return
    try:
        found = match_tensors(list(probes), base.tensors, loader, adapter_file, optional=list(probes))
    except KeyMatchError:
        return  # ambiguous probes: the ordinary unmatched-module error follows
    for probe, target in found.items():
        if target is None:
            continue
        what, pair = probes[probe]
        key = f"{PEFT_PREFIX}{pair.module}.lora_A.weight"
        if what == "attention":
            raise UnsupportedAdapter(
                f"{adapter_file}: '{key}' is a LoRA on nn.MultiheadAttention '{target.rpartition('.')[0]}' (base "
                f"tensor '{target}'), which qlora-merge does not merge"
            )
        raise UnsupportedAdapter(
            f"{adapter_file}: '{key}' adapts '{target.rpartition('.')[0]}', which the base stores quantized "
            f"('{target}'); merge into the full-precision base"
        )


def _leaf_module(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else ""


def _module_of(key: str) -> str:
    name = key.removeprefix(PEFT_PREFIX)
    for marker in (".lora_", ".base_layer.", ".modules_to_save."):
        if marker in name:
            return name.split(marker)[0]
    return name.rpartition(".")[0] or name


def _strip_base_layers(module: str) -> str:
    """PEFT nests one ParamWrapper per adapted parameter of a module: `experts.base_layer.base_layer` -> `experts`."""
    while module.endswith(".base_layer"):
        module = module.removesuffix(".base_layer")
    return module


def _targeted_parameters(owner: str, target_parameters: tuple[str, ...]) -> list[str]:
    """The parameter names of module `owner` that target_parameters names (`mlp.experts.down_proj` matches
    `model.layers.0.mlp.experts`, as PEFT matches the key or its tail)."""
    found = []
    for target in target_parameters:
        module, _, parameter = target.rpartition(".")
        if module and (owner == module or owner.endswith(f".{module}")) and parameter not in found:
            found.append(parameter)
    return found


@dataclass(frozen=True)
class _ExpertTarget:
    """Where a fused expert parameter lives in the base: one 3-D tensor, or per expert one tensor per projection."""

    parameter: str
    experts: int
    d1: int  # rows of one expert's weight as the fused parameter holds it (the projections' rows summed)
    d2: int
    fused: str | None = None
    split: tuple[tuple[str, ...], ...] = ()  # per expert, the base tensor names of its projections


def _expert_candidates(owner: str, parameter: str, experts: int) -> list[str]:
    """Every base tensor name `owner.parameter` may be stored under: fused, or per expert in a known layout (one
    expert more than expected, to tell that there is none)."""
    names = [f"{owner}.{parameter}"]
    for layout in EXPERT_LAYOUTS:
        if layout.parameter == parameter:
            names.extend(name for names_of in layout.names(owner, experts + 1) for name in names_of)
    return names


def _expert_targets(
    owner: str, parameter: str, experts: int, base: CheckpointIndex, matched: dict[str, str | None], adapter_file: str
) -> _ExpertTarget | None:
    """The base tensors of `owner.parameter` with `experts` experts (`matched` maps _expert_candidates to them):
    the fused tensor, else a known per-expert layout with exactly that many experts."""
    found = matched[f"{owner}.{parameter}"]
    if found is not None:
        shape = base.tensors[found].shape
        if len(shape) != 3:
            raise ShapeMismatch(f"{adapter_file}: '{owner}' targets parameter '{found}', which is {shape}, not 3-D")
        return _ExpertTarget(parameter, shape[0], shape[1], shape[2], fused=found)
    for layout in EXPERT_LAYOUTS:
        if layout.parameter != parameter:
            continue
        targets = [tuple(matched[name] for name in names) for names in layout.names(owner, experts + 1)]
        if any(target is None for target in targets[experts]) and all(
            target is not None for names in targets[:experts] for target in names
        ):
            split = tuple(tuple(str(target) for target in names) for names in targets[:experts])
            shapes = [base.tensors[name].shape for name in split[0]]
            if any(len(shape) != 2 or shape[1] != shapes[0][1] for shape in shapes):
                raise ShapeMismatch(f"{adapter_file}: expert weights {', '.join(split[0])} do not stack")
            return _ExpertTarget(parameter, experts, sum(shape[0] for shape in shapes), shapes[0][1], split=split)
    return None


def _expert_updates(
    weights: AdapterWeights,
    config: LoraConfig,
    base: CheckpointIndex,
    base_config: dict[str, Any],
    loader: Loader,
) -> tuple[Updates, set[str], list[str]]:
    """LoRA on target_parameters (PEFT's ParamWrapper, MoE experts): the update of every base tensor they touch,
    the adapter modules they are, and the keys of those that match nothing in the base.

    The adapter file does not say which parameter a wrapper adapts (`experts.lora_A` and
    `experts.base_layer.lora_A` only give the nesting), so each pair goes to the targeted parameter its shapes fit.
    """
    updates: Updates = {}
    modules: set[str] = set()
    unmatched: list[str] = []
    if not config.target_parameters:
        return updates, modules, unmatched
    adapter_file = str(weights.path)
    transposed = base_config.get("model_type") in MOE_TRANSPOSED_MODEL_TYPES
    claimed: dict[tuple[str, str], str] = {}
    # (module, pair, owner, [(parameter, r, alpha)]) per ParamWrapper; every name they may match, matched at once
    wrappers: list[tuple[str, LoraPair, str, list[tuple[str, int, float]]]] = []
    candidates: list[str] = []
    for module, pair in weights.pairs.items():
        owner = _strip_base_layers(module)
        parameters: list[tuple[str, int, float]] = []
        for parameter in _targeted_parameters(owner, config.target_parameters):
            r, alpha = module_rank_alpha(
                f"{owner}.{parameter}", config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern
            )
            parameters.append((parameter, r, alpha))
            if pair.rank % r == 0:
                candidates.extend(_expert_candidates(owner, parameter, pair.rank // r))
        if parameters:
            wrappers.append((module, pair, owner, parameters))
    candidates = list(dict.fromkeys(candidates))
    matched = match_tensors(candidates, base.tensors, loader, adapter_file, optional=candidates)
    for module, pair, owner, parameters in wrappers:
        modules.add(module)
        key = f"{PEFT_PREFIX}{module}.lora_A.weight"
        if pair.embedding or pair.bias is not None or pair.magnitude is not None:
            raise UnsupportedAdapter(
                f"{adapter_file}: '{key}' adapts a parameter with a variant PEFT cannot merge there"
            )
        in_features, out_features = int(pair.a.shape[1]), int(pair.b.shape[0])
        fits: list[tuple[_ExpertTarget, float]] = []
        seen: list[str] = []
        for parameter, r, alpha in parameters:
            if pair.rank % r:
                continue
            target = _expert_targets(owner, parameter, pair.rank // r, base, matched, adapter_file)
            if target is None:
                continue
            seen.append(target.fused or target.split[0][0])
            flipped = transposed and target.fused is not None
            rows, cols = (target.d2, target.d1) if flipped else (target.d1, target.d2)
            if (out_features, in_features) == (rows, cols) and pair.rank == target.experts * r:
                fits.append((target, lora_scaling(alpha, r, config.use_rslora)))
        if not seen:
            unmatched.extend(pair.keys)
            continue
        if len(fits) != 1:
            reason = "fits none" if not fits else "fits several"
            raise ShapeMismatch(
                f"{adapter_file}: '{key}' ({tuple(pair.a.shape)}, lora_B {tuple(pair.b.shape)}) {reason} of the "
                f"targeted expert parameters of '{owner}' ({', '.join(seen)})"
            )
        target, scaling = fits[0]
        if (owner, target.parameter) in claimed:
            raise KeyMatchError(
                f"{adapter_file}: '{claimed[owner, target.parameter]}' and '{key}' both adapt "
                f"'{owner}.{target.parameter}'"
            )
        claimed[owner, target.parameter] = key
        for name in [target.fused] if target.fused else [n for names in target.split for n in names]:
            if name is not None and base.tensors[name].dtype not in FLOAT_DTYPES:
                raise UnsupportedAdapter(
                    f"{base.tensors[name].file}: '{name}' is stored as {base.tensors[name].dtype}; merging into "
                    "quantized weights is not supported (use the full-precision base)"
                )
        if target.fused:
            updates[target.fused] = (ExpertUpdate(pair, scaling, target.experts, transposed), pair.keys)
            continue
        for expert, names in enumerate(target.split):
            start = 0
            for name in names:
                stop = start + base.tensors[name].shape[0]
                update = ExpertUpdate(pair, scaling, target.experts, False, expert, (start, stop))
                updates[name] = (update, pair.keys)
                start = stop
    return updates, modules, unmatched
