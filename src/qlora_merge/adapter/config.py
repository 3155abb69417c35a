"""adapter_config.json -> a typed, validated LoRA config with PEFT's defaults for missing fields."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AdapterFormatError, InputNotFound, UnsupportedAdapter
from ..names import ADAPTER_CONFIG_NAME
from .patterns import PatternError, PatternTooComplex, pattern_keys

log = logging.getLogger(__name__)

# Every field of PEFT's LoraConfig up to 0.21, and a few older ones. A field not listed here comes from a PEFT
# newer than this tool: it is reported (it may change what the merge means) but does not stop the merge.
KNOWN_FIELDS = frozenset(
    {
        "alora_invocation_tokens",
        "alpha_pattern",
        "arrow_config",
        "auto_mapping",
        "base_model_name_or_path",
        "bias",
        "corda_config",
        "ensure_weight_tying",
        "eva_config",
        "exclude_modules",
        "fan_in_fan_out",
        "inference_mode",
        "init_lora_weights",
        "kasa_config",
        "layer_replication",
        "layers_pattern",
        "layers_to_transform",
        "loftq_config",
        "lora_alpha",
        "lora_bias",
        "lora_dropout",
        "lora_ga_config",
        "megatron_config",
        "megatron_core",
        "modules_to_save",
        "monteclora_config",
        "peft_type",
        "peft_version",
        "qalora_group_size",
        "r",
        "rank_pattern",
        "revision",
        "runtime_config",
        "target_modules",
        "target_parameters",
        "task_type",
        "trainable_token_indices",
        "use_bdlora",
        "use_dora",
        "use_qalora",
        "use_rslora",
        "velora_config",
        # older PEFT versions
        "enable_lora",
        "lora_embedding_init",
        "use_original_init",
        "modules_to_tie",
        "target_modules_to_tie",
    }
)
# LoRA variants whose merge is not W + scale * B @ A (or DoRA): refused by name rather than merged wrongly.
# (use_qalora is not one: PEFT applies it to GPTQ layers only, and merges it into any other base as plain LoRA.)
UNSUPPORTED_VARIANTS = {
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "kasa_config": "KaSA (kasa_config)",
    "megatron_config": "Megatron parallel LoRA (megatron_config)",
}
# init_lora_weights values that rewrite the base weights when training starts: the adapter is relative to that
# residual model, not to the base on disk, unless PEFT converted it on save (which resets the field to true).
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass(frozen=True)
class LoraConfig:
    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    fan_in_fan_out: bool = False
    use_dora: bool = False
    bias: str = "none"
    lora_bias: bool = False
    mica: bool = False  # init_lora_weights="mica": Minor Component Adaptation, which PEFT merges its own way
    # trainable_token_indices as a mapping: module name (or "" for the input embedding) -> token rows
    trainable_token_indices: dict[str, tuple[int, ...]] = field(default_factory=dict)
    target_modules: tuple[str, ...] | str | None = None
    # `<module>.<parameter>` names of parameters adapted directly (MoE experts' fused 3-D weights)
    target_parameters: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] | None = None
    # layer_replication: [start, end) ranges of base layers stacked into the adapted model's layers
    layer_replication: tuple[tuple[int, int], ...] = ()
    # PEFT's selection of the modules it adapts (see adapter.selection)
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | int | None = None
    layers_pattern: tuple[str, ...] | str | None = None
    ensure_weight_tying: bool = False
    task_type: str | None = None


def read_adapter_config(directory: Path) -> LoraConfig:
    """Read and validate `directory/adapter_config.json`; refuse PEFT types and features not merged here.

    Missing fields take PEFT's defaults; unknown ones (from a newer PEFT) are logged in one warning line.
    """
    path = directory / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise InputNotFound(f"{path}: adapter_config.json not found (is '{directory}' a PEFT adapter directory?)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: also a 5000-digit number
        raise AdapterFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object")
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise UnsupportedAdapter(
            f"{path}: peft_type {_short(peft_type)} is not supported; qlora-merge merges LORA adapters"
        )
    for name, what in UNSUPPORTED_VARIANTS.items():
        if raw.get(name):
            raise UnsupportedAdapter(f"{path}: {what} is not supported yet; qlora-merge cannot merge this adapter")
    init = raw.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise UnsupportedAdapter(
            f"{path}: init_lora_weights={init!r} trains against a rewritten base, so merging into the original base "
            "would be wrong; re-save the adapter with PEFT's path_initial_model_for_weight_conversion"
        )
    unknown = sorted(set(raw) - KNOWN_FIELDS)
    if unknown:
        log.warning("%s: unknown adapter_config.json fields ignored (newer PEFT?): %s", path, ", ".join(unknown))
    bias = raw.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise AdapterFormatError(f"{path}: 'bias' must be 'none', 'all' or 'lora_only', got {_short(bias)}")
    # Whether a head LoRA mirrors the embedding's is checked by value, not taken from here; the flag only tells
    # which modules PEFT adapts.
    ensure_weight_tying = _bool(path, "ensure_weight_tying", raw.get("ensure_weight_tying", False))
    target_modules = _names(path, "target_modules", raw.get("target_modules"), regex_allowed=True)
    target_parameters = tuple(
        _names(path, "target_parameters", raw.get("target_parameters"), regex_allowed=False) or ()
    )
    modules_to_save = raw.get("modules_to_save")
    selection = _selection_fields(path, raw, target_modules, target_parameters)
    return LoraConfig(
        path=path,
        r=_positive_int(path, "r", raw.get("r", 8)),
        lora_alpha=_finite(path, "lora_alpha", raw.get("lora_alpha", 8)),
        use_rslora=_bool(path, "use_rslora", raw.get("use_rslora", False)),
        rank_pattern={k: _positive_int(path, f"rank_pattern[{k!r}]", v) for k, v in _dict(path, raw, "rank_pattern")},
        alpha_pattern={k: _finite(path, f"alpha_pattern[{k!r}]", v) for k, v in _dict(path, raw, "alpha_pattern")},
        fan_in_fan_out=_bool(path, "fan_in_fan_out", raw.get("fan_in_fan_out", False)),
        use_dora=_bool(path, "use_dora", raw.get("use_dora", False)),
        bias=bias,
        lora_bias=_bool(path, "lora_bias", raw.get("lora_bias", False)),
        mica=isinstance(init, str) and init.lower() == "mica",
        trainable_token_indices=_token_indices(path, raw.get("trainable_token_indices")),
        target_modules=target_modules,
        modules_to_save=_names(path, "modules_to_save", modules_to_save, regex_allowed=False),
        target_parameters=target_parameters,
        layer_replication=_layer_ranges(path, raw.get("layer_replication")),
        ensure_weight_tying=ensure_weight_tying,
        task_type=raw.get("task_type") if isinstance(raw.get("task_type"), str) else None,
        **selection,
    )


def _selection_fields(
    path: Path, raw: dict[str, Any], target_modules: tuple[str, ...] | str | None, target_parameters: tuple[str, ...]
) -> dict[str, Any]:
    """exclude_modules, layers_to_transform and layers_pattern, checked as PEFT's LoraConfig checks them (its
    ValueErrors are refusals here: PEFT cannot load such an adapter)."""
    if target_modules == () and not target_parameters:
        raise AdapterFormatError(
            f"{path}: 'target_modules' is empty and there are no target_parameters: the adapter adapts nothing "
            "(PEFT refuses to load it)"
        )
    exclude = _names(path, "exclude_modules", raw.get("exclude_modules"), regex_allowed=True)
    layers = raw.get("layers_to_transform")
    if layers is not None and not _is_int(layers):
        if not isinstance(layers, list) or not all(_is_int(i) for i in layers):
            raise AdapterFormatError(
                f"{path}: 'layers_to_transform' must be a layer number or a list of them, got {_short(layers)}"
            )
        layers = tuple(layers)
    pattern = raw.get("layers_pattern")
    if pattern is not None and not isinstance(pattern, str):
        if not isinstance(pattern, list) or not all(isinstance(p, str) for p in pattern):
            raise AdapterFormatError(
                f"{path}: 'layers_pattern' must be a string or a list of them, got {_short(pattern)}"
            )
        pattern = tuple(pattern)
    if isinstance(target_modules, str) and layers is not None:
        raise AdapterFormatError(f"{path}: 'layers_to_transform' cannot be used when 'target_modules' is a str")
    if isinstance(target_modules, str) and pattern is not None:
        raise AdapterFormatError(f"{path}: 'layers_pattern' cannot be used when 'target_modules' is a str")
    if pattern and layers is None:
        raise AdapterFormatError(f"{path}: 'layers_pattern' is set, so 'layers_to_transform' must be set too")
    return {"exclude_modules": exclude, "layers_to_transform": layers, "layers_pattern": pattern}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer_ranges(path: Path, value: Any) -> tuple[tuple[int, int], ...]:
    """layer_replication: a list of [start, end) pairs of base layer indices, 0 <= start < end."""
    if value is None:
        return ()
    if isinstance(value, list) and all(
        isinstance(pair, list | tuple)
        and len(pair) == 2
        and all(isinstance(i, int) and not isinstance(i, bool) for i in pair)
        and 0 <= pair[0] < pair[1]
        for pair in value
    ):
        return tuple((int(start), int(end)) for start, end in value)
    raise AdapterFormatError(
        f"{path}: 'layer_replication' must be a list of [start, end) layer ranges, got {_short(value)}"
    )


def _names(path: Path, key: str, value: Any, regex_allowed: bool) -> tuple[str, ...] | str | None:
    """A list of module names (or, for target_modules, one regex string as PEFT allows), else an error: a name
    list read wrongly would change what is merged without a word."""
    if value is None or (regex_allowed and isinstance(value, str)):
        return value
    if isinstance(value, list) and all(isinstance(name, str) for name in value):
        return tuple(value)
    kind = "a list of module names" + (" or a regex string" if regex_allowed else "")
    raise AdapterFormatError(f"{path}: '{key}' must be {kind}, got {_short(value)}")


def _token_indices(path: Path, value: Any) -> dict[str, tuple[int, ...]]:
    """A list of token ids (for the input embedding, keyed "") or a mapping of module names to lists."""
    if value is None:
        return {}
    mapping = {"": value} if isinstance(value, list) else value
    if not isinstance(mapping, dict):
        raise AdapterFormatError(f"{path}: 'trainable_token_indices' must be a list or an object of lists")
    indices: dict[str, tuple[int, ...]] = {}
    for module, ids in mapping.items():
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise AdapterFormatError(
                f"{path}: 'trainable_token_indices' for {module or 'the input embedding'!r} must be a list of token "
                f"ids, got {_short(ids)}"
            )
        if len(set(ids)) != len(ids):
            raise AdapterFormatError(f"{path}: 'trainable_token_indices' repeats a token id: {_short(ids)}")
        indices[module] = tuple(ids)
    return indices


def _dict(path: Path, raw: dict[str, Any], key: str) -> list[tuple[str, Any]]:
    """A rank_pattern/alpha_pattern object; its keys are regexes (PEFT matches them unescaped), so they must compile."""
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise AdapterFormatError(f"{path}: '{key}' must be an object, got {type(value).__name__}")
    try:
        pattern_keys(tuple(value))
    except PatternError as exc:
        raise AdapterFormatError(
            f"{path}: '{key}' key {_short(exc.key, 80)} is not a usable regular expression ({exc.reason})"
        ) from exc
    return list(value.items())


def check_regex(path: Path, key: str, pattern: str) -> None:
    """A regex-valued field must compile (PEFT would raise re.error loading it)."""
    try:
        re.compile(pattern)
    except re.error as exc:
        raise AdapterFormatError(
            f"{path}: '{key}' {_short(pattern, 80)} is not a usable regular expression ({exc})"
        ) from exc


def pattern_refusal(path: Path, key: str, pattern: str, exc: PatternTooComplex) -> UnsupportedAdapter:
    return UnsupportedAdapter(f"{path}: '{key}' {_short(pattern, 80)}: {exc}; simplify the regular expression")


def _positive_int(path: Path, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterFormatError(f"{path}: '{key}' must be a positive integer, got {_short(value)}")
    return value


def _finite(path: Path, key: str, value: Any) -> float:
    try:
        finite = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    except OverflowError:  # an integer too large for a float, e.g. 1e400 written without a decimal point
        finite = False
    if not finite:
        raise AdapterFormatError(f"{path}: '{key}' must be a finite number, got {_short(value)}")
    return value


def _bool(path: Path, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise AdapterFormatError(f"{path}: '{key}' must be true or false, got {_short(value)}")
    return value


def _short(value: Any, limit: int = 40) -> str:
    """repr() cut to fit an error line (a 400-digit integer or a long list would drown the message)."""
    shown = repr(value)
    return shown if len(shown) <= limit else f"{shown[: limit - 3]}..."
