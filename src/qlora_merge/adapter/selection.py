"""Which of the LoRA modules saved in an adapter file PEFT adapts, by adapter_config.json, as PEFT selects them.

`PeftModel.from_pretrained` builds LoRA layers where the config selects (target_modules, exclude_modules,
layers_to_transform with layers_pattern, modules_to_save, target_parameters: PEFT's `check_target_module_exists`)
and then loads the saved tensors into them; saved factors of a module it did not select have nowhere to go and
are dropped. A file PEFT saved holds only modules it selected, but a hand-edited or foreign one may hold more:
the config decides, as it does for PEFT. Module names are the adapter's, as the model it was trained on named
them, which are the names PEFT matches.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterable

from ..errors import AdapterFormatError
from .config import LoraConfig, check_regex, pattern_refusal
from .patterns import PatternError, PatternTooComplex, is_plain, pattern_keys, safe_regex
from .weights import PEFT_PREFIX, AdapterWeights, LoraPair

log = logging.getLogger(__name__)

# PEFT's "all-linear": every nn.Linear and Conv1D but the output layer (and a classifier head for SEQ_CLS).
ALL_LINEAR = "all-linear"
OUTPUT_LAYERS = ("lm_head", "embed_out")
SEQ_CLS_HEADS = ("score", "classifier")
# The layers ensure_weight_tying adapts as one, whatever target_modules says (PEFT's EMBEDDING_LAYER_NAMES).
TIED_LAYERS = ("embed_tokens", "lm_head")


def select_modules(config: LoraConfig, weights: AdapterWeights) -> AdapterWeights:
    """The adapter as PEFT loads it: only the LoRA modules the config selects in `pairs`; every tensor of a module
    it does not select (and its `base_layer` bias or embedding) in `unselected`, with the reason."""
    reasons = {module: why for module, pair in weights.pairs.items() if (why := why_not_selected(config, pair))}
    if not reasons:
        return weights
    unselected = dict(weights.unselected)
    for module, why in reasons.items():
        for key in weights.pairs[module].keys:
            unselected[key] = why
    replacements = {}
    for name, replacement in weights.replacements.items():
        module = name.rpartition(".")[0]
        if replacement.wrapper == "base_layer" and module in reasons:  # loads into the LoRA layer PEFT did not make
            unselected[replacement.key] = reasons[module]
        else:
            replacements[name] = replacement
    return dataclasses.replace(
        weights,
        pairs={module: pair for module, pair in weights.pairs.items() if module not in reasons},
        replacements=replacements,
        unselected=unselected,
    )


def why_not_selected(config: LoraConfig, pair: LoraPair) -> str | None:
    """None if PEFT adapts the module of `pair`, else why not (PEFT's `check_target_module_exists`, in its order)."""
    key = pair.module
    owner = strip_base_layers(key)
    if config.target_parameters and any(
        owner == target.rpartition(".")[0] or owner.endswith(f".{target.rpartition('.')[0]}")
        for target in config.target_parameters
    ):
        return None  # a parameter wrapper: selected by target_parameters, which nothing excludes
    leaf = key.rpartition(".")[2]
    if config.ensure_weight_tying and leaf in TIED_LAYERS:
        return None  # PEFT ties these (target_modules_to_tie) whatever target_modules says
    exclude = config.exclude_modules
    if exclude:
        if isinstance(exclude, str):
            if _regex(config, "exclude_modules", exclude).fullmatch(key):
                return "excluded by exclude_modules"
        elif key in exclude or any(key.endswith(f".{name}") for name in exclude):
            return "excluded by exclude_modules"
    for saved in config.modules_to_save or ():
        if _regex(config, "modules_to_save", rf"(^|.*\.){saved}($|\..*)").match(key):
            return f"inside modules_to_save '{saved}', which PEFT never adapts"
    targets = config.target_modules
    if targets is None:
        if config.target_parameters:
            return "not a target_parameters module, and target_modules is not set"
        # PEFT takes its default targets for the model type: not known here, so every saved module counts
    elif isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            return _all_linear(config, pair, leaf)
        if _regex(config, "target_modules", targets).fullmatch(key):
            return None
        return "not matched by target_modules"
    elif key in targets:
        return None  # named in full: layers_to_transform does not apply (as in PEFT)
    elif not any(key.endswith(f".{name}") for name in targets):
        return "not in target_modules"
    return _layer_filter(config, key)


def _all_linear(config: LoraConfig, pair: LoraPair, leaf: str) -> str | None:
    if pair.embedding or pair.kernel:
        return "not a linear layer, which is all target_modules='all-linear' adapts"
    if leaf in OUTPUT_LAYERS or (config.task_type == "SEQ_CLS" and leaf in SEQ_CLS_HEADS):
        return "the output layer, which target_modules='all-linear' leaves out"
    return None


def _layer_filter(config: LoraConfig, key: str) -> str | None:
    """layers_to_transform (with layers_pattern): the module's layer number must be one of them."""
    wanted = config.layers_to_transform
    if wanted is None or wanted == ():
        return None
    patterns = config.layers_pattern
    digits = None
    if not patterns:
        digits = layer_number(key, None)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            if is_plain(pattern):
                digits = layer_number(key, pattern)
            else:
                regex = _regex(config, "layers_pattern", rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.")
                try:
                    found = regex.re_match(key)
                except PatternTooComplex as exc:
                    raise pattern_refusal(config.path, "layers_pattern", pattern, exc) from exc
                digits = found.group("idx") if found is not None else None
            if digits is not None:
                break
    shown = list(wanted) if isinstance(wanted, tuple) else wanted
    if digits is None:
        return f"no layer number to check against layers_to_transform {shown}"
    layer = int(digits) if len(digits) <= 18 else -1  # beyond any layer list, and int() refuses 4300+ digits
    if layer == wanted if isinstance(wanted, int) else layer in wanted:
        return None
    return f"layer {layer} is not in layers_to_transform {shown}"


def layer_number(key: str, pattern: str | None) -> str | None:
    r"""The digits PEFT takes as the layer of module `key`: `re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)` without
    layers_pattern (the first number after a named part, not a later one, an expert's), else
    `re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)` for a plain `pattern` (its `.` a wildcard), found
    in linear time: the lazy `.*?` tries each dot from the left (never past a newline, which `.` does not match),
    and the greedy runs after it cannot give anything back."""
    n = len(key)
    newline = key.find("\n")
    limit = n if newline < 0 else newline  # where `.*?` must stop: the dot it ends on is before any newline
    starts = [0] if pattern is not None else []
    starts += [i + 1 for i in range(min(limit, n)) if key[i] == "."]
    for start in starts:
        if pattern is None:
            end = key.find(".", start)  # `[^.]*` takes the whole part, so `\.` is the next dot
            if end < 0:
                return None
        else:
            end = start + len(pattern)
            if end >= n or not all(
                c != "\n" if p == "." else p == c for p, c in zip(pattern, key[start:end], strict=True)
            ):
                continue
            if key[end] != ".":
                continue
        digits_end = end + 1
        while digits_end < n and key[digits_end].isdecimal():
            digits_end += 1
        if digits_end > end + 1 and digits_end < n and key[digits_end] == ".":
            return key[end + 1 : digits_end]
    return None


class _Bounded:
    """A config regex matched in bounded time, its refusal naming the file and field."""

    def __init__(self, config: LoraConfig, field: str, pattern: str) -> None:
        self.config, self.field, self.pattern = config, field, pattern
        self.regex = safe_regex(pattern)

    def fullmatch(self, text: str) -> bool:
        try:
            return self.regex.fullmatch(text)
        except PatternTooComplex as exc:
            raise pattern_refusal(self.config.path, self.field, self.pattern, exc) from exc

    def match(self, text: str) -> bool:
        try:
            return self.regex.match(text)
        except PatternTooComplex as exc:
            raise pattern_refusal(self.config.path, self.field, self.pattern, exc) from exc

    def re_match(self, text: str) -> re.Match[str] | None:
        return self.regex.re_match(text)


def _regex(config: LoraConfig, field: str, pattern: str) -> _Bounded:
    check_regex(config.path, field, pattern)
    return _Bounded(config, field, pattern)


def strip_base_layers(module: str) -> str:
    """PEFT nests one ParamWrapper per adapted parameter of a module: `experts.base_layer.base_layer` -> `experts`."""
    while module.endswith(".base_layer"):
        module = module.removesuffix(".base_layer")
    return module


def unselected_error(config: LoraConfig, weights: AdapterWeights, unselected: dict[str, str]) -> AdapterFormatError:
    """The refusal for an adapter whose file holds LoRA modules its config does not select (`unselected`: their
    keys, and why)."""
    modules: dict[str, str] = {}
    for key, why in unselected.items():
        modules.setdefault(module_of(key), why)
    module, why = next(iter(modules.items()))
    more = f" (and {len(modules) - 1} more modules)" if len(modules) > 1 else ""
    if not weights.pairs:
        return AdapterFormatError(
            f"{config.path}: adapter_config.json selects none of the {len(modules)} LoRA modules in "
            f"{weights.path.name} (target_modules {_shown(config.target_modules)}; '{module}': {why}); PEFT "
            "refuses to load such an adapter; pass --allow-unused to merge without them"
        )
    return AdapterFormatError(
        f"{config.path}: module '{module}' is not selected by adapter_config.json ({why}) but {weights.path.name} "
        f"holds its LoRA factors{more}; PEFT leaves them out when it loads the adapter: pass --allow-unused to "
        "merge without them as it does"
    )


def warn_unselected(config: LoraConfig, unselected: dict[str, str]) -> None:
    """One warning line for the modules left out with --allow-unused, naming the first and why."""
    modules: dict[str, str] = {}
    for key, why in unselected.items():
        modules.setdefault(module_of(key), why)
    module, why = next(iter(modules.items()))
    more = f" and {len(modules) - 1} more modules" if len(modules) > 1 else ""
    log.warning(
        "%s: module '%s'%s not selected by adapter_config.json ('%s': %s); their LoRA factors are left out "
        "(--allow-unused)",
        config.path,
        module,
        more,
        module,
        why,
    )


def module_of(key: str) -> str:
    name = key.removeprefix(PEFT_PREFIX)
    for marker in (".lora_", ".base_layer."):
        if marker in name:
            return name.split(marker)[0]
    return name.rpartition(".")[0] or name


def _shown(value: object, limit: int = 60) -> str:
    shown = repr(list(value) if isinstance(value, tuple) else value)
    return shown if len(shown) <= limit else f"{shown[: limit - 3]}..."


def check_patterns(config: LoraConfig, modules: Iterable[str]) -> None:
    """Match every module against rank_pattern and alpha_pattern now: a key that cannot be matched safely is
    refused naming the file and field, and keys that both match a module with different values are warned about:
    PEFT takes the first key in the saved file, whose keys save_pretrained sorted, while training took the first
    in the order they were given."""
    modules = list(modules)
    for field, patterns in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        if len(patterns) < 2 and all(is_plain(key) for key in patterns):
            continue
        keys = pattern_keys(tuple(patterns))
        overlapping: list[tuple[str, list[str]]] = []
        for module in modules:
            try:
                found = keys.all(module)
            except PatternError as exc:
                reason = exc.reason if isinstance(exc.reason, PatternTooComplex) else PatternTooComplex(str(exc))
                raise pattern_refusal(config.path, field, exc.key, reason) from exc
            if len({patterns[key] for key in found}) > 1:
                overlapping.append((module, found))
        if not overlapping:
            continue
        module, found = overlapping[0]
        more = f" (and {len(overlapping) - 1} more modules)" if len(overlapping) > 1 else ""
        values = ", ".join(f"{key!r}: {patterns[key]:g}" for key in found[:3])
        log.warning(
            "%s: %s keys %s all match '%s'%s; PEFT uses the first in the file (%r), and save_pretrained sorts "
            "the keys, so training may have used another",
            config.path,
            field,
            values,
            module,
            more,
            found[0],
        )
