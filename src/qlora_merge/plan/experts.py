"""LoRA on target_parameters (PEFT's ParamWrapper): MoE expert parameters, fused 3-D or stored per expert."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..adapter.config import LoraConfig
from ..adapter.selection import strip_base_layers
from ..adapter.weights import PEFT_PREFIX, AdapterWeights, LoraPair
from ..errors import KeyMatchError, ShapeMismatch, UnsupportedAdapter
from ..inputs.format import FLOAT_DTYPES
from ..inputs.index import CheckpointIndex
from ..merging.variants import MOE_TRANSPOSED_MODEL_TYPES, lora_scaling, module_rank_alpha
from .keymap import EXPERT_LAYOUTS, Loader, match_tensors
from .tasks import ExpertUpdate, Updates


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


def target_parameter_updates(
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
        owner = strip_base_layers(module)
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
