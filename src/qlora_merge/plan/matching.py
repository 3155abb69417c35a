"""Decide, before any byte is written, what happens to every tensor: copy, convert, merge or replace, and where it goes.

Pure: reads headers and configs only (a comparison of two adapter tensors, where tying depends on it, is passed
in). Every error a user can cause through mismatched inputs is raised here or in the plan modules build_plan calls
(tied, experts, updates, ...), so a bad merge fails in a second, not after minutes of writing.
"""

from __future__ import annotations

import logging
from typing import Any

from ..adapter.config import LoraConfig
from ..adapter.selection import module_of, unselected_error, warn_unselected
from ..adapter.weights import PEFT_PREFIX, AdapterWeights, LoraPair, Replacement
from ..dtypes import OUTPUT_DTYPES
from ..errors import KeyMatchError, UnsupportedAdapter
from ..inputs.index import CheckpointIndex
from .embeddings import OUTPUT_HEADS, Embeddings, find_embeddings, leaf_module, vocab_changes
from .experts import target_parameter_updates
from .keymap import Loader, match_tensors
from .orientation import find_orientation
from .replication import replicate_layers
from .tasks import MergePlan, Update
from .tied import SameValues, tied_head, tied_head_task
from .updates import LoraRules, tensor_task, token_rows_update

log = logging.getLogger(__name__)


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

    expert_updates, expert_modules, unmatched_experts = target_parameter_updates(
        weights, config, base, base_config, loader
    )
    lora_names = {f"{module}.weight": pair for module, pair in weights.pairs.items() if module not in expert_modules}
    names = list(dict.fromkeys([*lora_names, *weights.replacements, *weights.token_deltas]))
    matched = match_tensors(names, base.tensors, loader, adapter_file, optional=names)

    unmatched = [name for name, target in matched.items() if target is None]
    _refuse_unmergeable([lora_names[name] for name in unmatched if name in lora_names], base, loader, adapter_file)
    head = tied_head(unmatched, embeddings)
    rules = LoraRules(weights.path, base, config, base_config, find_orientation(base_config, lora_names, matched, base))
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
        lora = rules.updates(pair, target, entry, replacements.get(target))
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
        updates[target] = token_rows_update(config, tokens, shape, embeddings, base.tensors[target])
        keys.setdefault(target, []).append(tokens.key)

    tied_copies: list[str] = []
    head_task = None
    if embeddings.tied and embeddings.input is not None:
        head_task, head_keys, head_bias = tied_head_task(
            base,
            embeddings.input,
            head,
            lora_names,
            weights,
            replacements,
            updates,
            config,
            rules,
            out_dtype,
            embeddings,
            same_values,
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
            tensor_task(
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
    vocab_changes(tasks, base, embeddings, changes, weights.path)
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
        if found[f"{module}.weight"] is None and not (tied_head and leaf_module(f"{module}.weight") in OUTPUT_HEADS)
    ]


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


def _module_of(key: str) -> str:
    name = key.removeprefix(PEFT_PREFIX)
    for marker in (".lora_", ".base_layer.", ".modules_to_save."):
        if marker in name:
            return name.split(marker)[0]
    return name.rpartition(".")[0] or name
