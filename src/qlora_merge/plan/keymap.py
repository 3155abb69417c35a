"""Match adapter module names to base checkpoint tensors, across prefix differences between the two.

An adapter names modules as the model class it was trained on saw them (`model.layers.0.self_attn.q_proj`);
the checkpoint on disk may nest the same module deeper or shallower (`model.language_model.layers.0...` in a
multimodal checkpoint, `transformer.h.0` vs `h.0` in old GPT-2 files). We look for the base tensor whose module
path ends with the longest tail of the adapter's module path, and demand exactly one such tensor.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import KeyMatchError, MergeError

# --loader names that select a known multimodal layout, and the prefix their language model lives under.
LANGUAGE_MODEL_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.")
NAMED_LOADERS = {
    "qwen3.5": ("Qwen3_5ForConditionalGeneration", ("model.language_model.",)),
    "qwen3_5": ("Qwen3_5ForConditionalGeneration", ("model.language_model.",)),
}
_ARCHITECTURE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Loader:
    """How the base is laid out: the architecture the adapter targets and where its language model lives."""

    architecture: str
    prefer_prefixes: tuple[str, ...] = ()


def resolve_loader(requested: str, base_config: dict[str, Any]) -> Loader:
    """--loader auto|qwen3.5|<architecture> -> the layout used to match adapter keys."""
    architectures = base_config.get("architectures") or []
    model_type = str(base_config.get("model_type", ""))
    if requested == "auto":
        architecture = architectures[0] if architectures else (model_type or "unknown")
        multimodal = "ForConditionalGeneration" in architecture or "qwen3_5" in model_type
        return Loader(architecture, LANGUAGE_MODEL_PREFIXES if multimodal else ())
    if requested.lower() in NAMED_LOADERS:
        architecture, prefixes = NAMED_LOADERS[requested.lower()]
        return Loader(architecture, prefixes)
    if _ARCHITECTURE.fullmatch(requested):
        multimodal = "ForConditionalGeneration" in requested
        return Loader(requested, LANGUAGE_MODEL_PREFIXES if multimodal else ())
    raise MergeError(f"--loader {requested!r}: expected auto, qwen3.5 or an architecture name like LlamaForCausalLM")


def match_tensors(
    names: Iterable[str],
    base_tensor_names: Iterable[str],
    loader: Loader,
    adapter_file: str,
    optional: Iterable[str] = (),
) -> dict[str, str | None]:
    """Map each tensor name as the adapter's model saw it to the one base tensor it stands for; one-to-one.

    A name whose module path is ambiguous (layer 0 of the language model and of an `mtp.` block both end in
    `layers.0.mlp.down_proj`) follows the prefix rewrite that the unambiguous names agree on, then the loader's
    preferred prefixes; only if neither decides is it an error. A name that matches no base tensor is a
    KeyMatchError, unless it is in `optional`: then it maps to None.
    """
    optional = set(optional)
    by_tail: dict[tuple[str, str], list[str]] = {}
    for name in base_tensor_names:
        module, _, leaf = name.rpartition(".")
        parts = module.split(".")
        for i in range(len(parts)):
            by_tail.setdefault((".".join(parts[i:]), leaf), []).append(name)
    candidates = {name: _candidates(name, by_tail, adapter_file, name in optional) for name in names}
    agreed = {_rewrite(name, found[0]) for name, found in candidates.items() if len(found) == 1}
    mapping: dict[str, str | None] = {}
    claimed: dict[str, str] = {}
    for name, found in candidates.items():
        if not found:
            mapping[name] = None
            continue
        target = _choose(name, found, agreed, loader, adapter_file)
        if target in claimed:
            raise KeyMatchError(
                f"{adapter_file}: '{_module(claimed[target])}' and '{_module(name)}' both match base tensor '{target}'"
            )
        claimed[target] = name
        mapping[name] = target
    return mapping


def _module(name: str) -> str:
    return name.removesuffix(".weight")


def _candidates(name: str, by_tail: dict[tuple[str, str], list[str]], adapter_file: str, optional: bool) -> list[str]:
    """The base tensors sharing the longest module tail and the leaf with `name` (just one when identical)."""
    module, _, leaf = name.rpartition(".")
    parts = module.split(".")
    for i in range(len(parts)):
        tail = parts[i:]
        # A tail that starts at a layer number (or is a bare leaf name) no longer says which stack it is in.
        if i > 0 and (tail[0].isdigit() or len(tail) < 2):
            break
        found = by_tail.get((".".join(tail), leaf), [])
        if name in found:
            return [name]
        if found:
            return sorted(found)
    if optional:
        return []
    raise KeyMatchError(f"{adapter_file}: module '{_module(name)}' matches no tensor of the base checkpoint")


def _rewrite(name: str, target: str) -> tuple[str, str]:
    """The prefix swap that turns `name` into `target`: ('model.', 'model.language_model.') and the like."""
    name_parts = name.split(".")
    target_parts = target.split(".")
    common = 0
    while common < min(len(name_parts), len(target_parts)) and name_parts[-1 - common] == target_parts[-1 - common]:
        common += 1
    return ".".join(name_parts[: len(name_parts) - common]), ".".join(target_parts[: len(target_parts) - common])


def _choose(name: str, found: list[str], agreed: set[tuple[str, str]], loader: Loader, adapter_file: str) -> str:
    if len(found) == 1:
        return found[0]
    consistent = [target for target in found if _rewrite(name, target) in agreed] or found
    if len(consistent) > 1 and loader.prefer_prefixes:
        consistent = [target for target in consistent if target.startswith(loader.prefer_prefixes)] or consistent
    if len(consistent) == 1:
        return consistent[0]
    shown = ", ".join(consistent[:3])
    raise KeyMatchError(
        f"{adapter_file}: module '{_module(name)}' matches several base tensors ({shown}); "
        "pick the layout with --loader"
    )


@dataclass(frozen=True)
class ExpertLayout:
    """How a checkpoint stores a fused 3-D expert parameter of transformers v5 as per-expert Linear weights.

    transformers v5 holds each MoE layer's experts as `experts.gate_up_proj` (E, 2I, H) and `experts.down_proj`
    (E, H, I), but save_pretrained writes most architectures back in the per-expert v4 layout
    (`experts.{e}.gate_proj.weight`, ...): `projections` are the Linear modules the parameter's rows are split into,
    in order (transformers' conversion mapping concatenates them on dim 1), `rename` the module path rewrite.
    """

    parameter: str
    projections: tuple[str, ...]
    rename: tuple[str, str] = ("", "")

    def names(self, owner: str, experts: int) -> list[list[str]]:
        """Per expert, the weight names of its projections, for the experts module `owner` as the adapter names it."""
        module = owner.replace(*self.rename) if self.rename[0] else owner
        return [[f"{module}.{e}.{projection}.weight" for projection in self.projections] for e in range(experts)]


# Architectures transformers v5 loads with fused experts from a per-expert checkpoint, tested against PEFT: PEFT
# rewrites an adapter trained on their per-expert Linear layers (transformers v4) into LoRA on the fused parameters.
MOE_FUSED_MODEL_TYPES = frozenset({"mixtral", "qwen2_moe", "qwen3_moe"})

# qwen2_moe and the many architectures transformers maps onto it (qwen3_moe, olmoe, deepseek_v3, ...), then Mixtral.
EXPERT_LAYOUTS = (
    ExpertLayout("gate_up_proj", ("gate_proj", "up_proj")),
    ExpertLayout("down_proj", ("down_proj",)),
    ExpertLayout("gate_up_proj", ("w1", "w3"), (".mlp.", ".block_sparse_moe.")),
    ExpertLayout("down_proj", ("w2",), (".mlp.", ".block_sparse_moe.")),
)


def is_expert_linear(name: str, model_type: str | None) -> bool:
    """Whether base tensor `name` is one expert's Linear weight of a checkpoint that transformers v5 fuses."""
    if model_type not in MOE_FUSED_MODEL_TYPES:
        return False
    module, _, leaf = name.rpartition(".")
    parts = module.split(".")
    return (
        leaf == "weight"
        and len(parts) >= 3
        and parts[-3] == "experts"
        and parts[-2].isdigit()
        and any(parts[-1] in layout.projections for layout in EXPERT_LAYOUTS)
    )
