"""Describe a LoRA adapter from its config and file headers (no weights loaded), and check it against a base."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .adapter import read_adapter
from .adapter.selection import module_of
from .errors import KeyMatchError, MergeError, ShapeMismatch
from .fourbit import QUANT_TYPES
from .inputs.quantized import is_quantized
from .inputs.resolve import resolve_adapter
from .merging.variants import lora_scaling, module_rank_alpha
from .names import ADAPTER_CONFIG_NAME
from .plan.tasks import ExpertUpdate, LoraUpdate

if TYPE_CHECKING:
    from .quant_error import QuantErrorReport

# The first number in a module name is its layer: model.layers.12.self_attn.q_proj, transformer.h.3.attn.c_attn.
LAYER_NUMBER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class AdapterReport:
    """What `inspect_adapter` found; `to_dict()` is what `qlora-merge inspect --json` prints.

    `scaling` is alpha / r (alpha / sqrt(r) with rsLoRA) from the config's defaults; `module_scaling` lists the
    modules whose rank_pattern/alpha_pattern gives them another one (with a base, as the planner applies the
    patterns, which also places MoE expert factors; without one, from the module names alone). With a base,
    `base_matches` tells whether the merge would be planned without error, and `mismatches` says why not
    (adapter tensors that match no base tensor, or the planner's first shape error).
    """

    adapter: Path
    base_model_name_or_path: str | None
    r: int
    lora_alpha: float
    scaling: float
    module_scaling: dict[str, float]
    variants: tuple[str, ...]  # rsLoRA, DoRA, lora_bias, bias=..., fan_in_fan_out, embedding LoRA, mica
    target_modules: tuple[str, ...] | str | None
    target_parameters: tuple[str, ...]  # parameters adapted directly (MoE experts)
    module_kinds: tuple[str, ...]  # last name part of each LoRA module: q_proj, v_proj ...
    layers: tuple[int, int] | None  # first and last layer number a LoRA module sits in
    lora_modules: int
    modules_to_save: tuple[str, ...]  # tensors the adapter replaces whole
    trainable_tokens: dict[str, int]  # module ("" = input embedding) -> number of trained token rows
    parameters: int  # every tensor in the adapter file
    # LoRA modules the file holds but adapter_config.json does not select (PEFT leaves them out), and why
    unselected: dict[str, str] = field(default_factory=dict)
    base: str | None = None  # as given: a directory or a repo id
    base_matches: bool | None = None
    mismatches: tuple[str, ...] = field(default_factory=tuple)
    # with --quant-error: what rounding the base through 4-bit costs next to each adapted weight's delta
    quant_error: QuantErrorReport | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["adapter"] = str(self.adapter)
        data["quant_error"] = self.quant_error.to_dict() if self.quant_error is not None else None
        return data


def inspect_adapter(
    adapter: str | Path,
    base: str | Path | None = None,
    *,
    loader: str = "auto",
    hf_token: str | None = None,
    quant_error: str | None = None,
) -> AdapterReport:
    """Rank, alpha, scaling, variants, targeted modules and layers and parameter count of a LoRA adapter, read
    from adapter_config.json and the weights file's header only.

    With `base` (a local directory or a repo id), the merge is planned exactly as `merge(..., dry_run=True)` plans
    it, writing nothing, and the report says whether every adapter tensor finds a base tensor of the right shape.
    A mismatch is reported, not raised; inputs that cannot be read raise MergeError as for a merge.

    With `quant_error` ("nf4" or "fp4", and a full-precision `base`), every adapted weight is read and the report
    adds ‖W − dequant(Q(W))‖ / ‖ΔW‖ per weight and per layer (quant_error.py): the base's weights are downloaded
    for that, not just their headers.
    """
    adapter_dir = resolve_adapter(str(adapter), hf_token)
    config, weights = read_adapter(adapter_dir)
    raw = json.loads((adapter_dir / ADAPTER_CONFIG_NAME).read_text())  # read_adapter validated it already
    default = lora_scaling(config.lora_alpha, config.r, config.use_rslora)
    module_scaling = {}
    for module in weights.pairs:
        r, alpha = module_rank_alpha(module, config.r, config.lora_alpha, config.rank_pattern, config.alpha_pattern)
        scaling = lora_scaling(alpha, r, config.use_rslora)
        if scaling != default:
            module_scaling[module] = scaling
    layers = sorted({int(m.group(1)) for module in weights.pairs if (m := LAYER_NUMBER.search(f".{module}."))})
    report = AdapterReport(
        adapter=adapter_dir,
        base_model_name_or_path=raw.get("base_model_name_or_path") or None,
        r=config.r,
        lora_alpha=config.lora_alpha,
        scaling=default,
        module_scaling=module_scaling,
        variants=_variants(config, weights),
        target_modules=config.target_modules,
        target_parameters=config.target_parameters,
        module_kinds=tuple(dict.fromkeys(_kind(module) for module in weights.pairs)),
        layers=(layers[0], layers[-1]) if layers else None,
        lora_modules=len(weights.pairs),
        modules_to_save=tuple(weights.replacements),
        trainable_tokens={module: len(ids) for module, ids in config.trainable_token_indices.items()},
        parameters=sum(math.prod(shape) for shape in weights.shapes.values()),
        unselected={module_of(key): why for key, why in weights.unselected.items()},
    )
    if base is None:
        return report
    from .api import plan_merge  # the merge imports much more; inspecting without a base needs none of it

    if quant_error is not None and quant_error not in QUANT_TYPES:
        raise MergeError(f"--quant-error {quant_error!r}: expected one of {', '.join(QUANT_TYPES)}")
    try:
        inputs = plan_merge(
            base, adapter_dir, loader=loader, hf_token=hf_token, allow_unused=True, headers_only=quant_error is None
        )
    except (KeyMatchError, ShapeMismatch) as exc:
        return _with_base(report, base, [str(exc)])
    if quant_error is not None:
        if is_quantized(inputs.base_config):
            raise MergeError(
                f"{inputs.base_dir / 'config.json'}: --quant-error measures rounding a full-precision base; this "
                "base is already quantized (give the full-precision model it was made from)"
            )
        from .quant_error import quantization_error

        report = replace(report, quant_error=quantization_error(inputs, quant_type=quant_error))
    reasons = inputs.plan.unused_reasons
    mismatches = [
        f"'{key}' is {reasons[key]}" if key in reasons else f"'{key}' matches no tensor of the base"
        for key in inputs.plan.unused
    ]
    # The planner knows which parameter each expert factor updates, so its scalings are the ones a merge uses.
    planned = {
        task.update.pair.module: task.update.scaling
        for task in inputs.plan.tasks
        if isinstance(task.update, LoraUpdate | ExpertUpdate)
    }
    scalings = {module: scaling for module, scaling in planned.items() if scaling != report.scaling}
    return replace(_with_base(report, base, mismatches), module_scaling=scalings)


def _with_base(report: AdapterReport, base: str | Path, mismatches: list[str]) -> AdapterReport:
    return replace(report, base=str(base), base_matches=not mismatches, mismatches=tuple(mismatches))


def _kind(module: str) -> str:
    """The last part of a module name, past PEFT's nesting: `mlp.experts.base_layer` -> `experts`."""
    while module.endswith(".base_layer"):
        module = module.removesuffix(".base_layer")
    return module.rsplit(".", 1)[-1]


def _variants(config: Any, weights: Any) -> tuple[str, ...]:
    flags = (
        ("rsLoRA", config.use_rslora),
        ("DoRA", config.use_dora),
        ("lora_bias", config.lora_bias),
        (f"bias={config.bias}", config.bias != "none"),
        ("fan_in_fan_out", config.fan_in_fan_out),
        ("rank_pattern", bool(config.rank_pattern)),
        ("alpha_pattern", bool(config.alpha_pattern)),
        ("embedding LoRA", any(pair.embedding for pair in weights.pairs.values())),
        ("modules_to_save", bool(weights.replacements)),
        ("trainable_token_indices", bool(config.trainable_token_indices)),
        ("mica", config.mica),
        ("target_parameters", bool(config.target_parameters)),
    )
    return tuple(name for name, on in flags if on)
