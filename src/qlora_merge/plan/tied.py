"""The output head of a tied base (one without a head tensor): kept tied while it equals the merged embedding,
else written as a tensor of its own, as the unmerged PeftModel computes it."""

from __future__ import annotations

from collections.abc import Callable

from ..adapter.config import LoraConfig
from ..adapter.weights import AdapterTensor, AdapterWeights, CombinedFactor, LoraPair, Replacement
from ..errors import UnsupportedAdapter
from ..inputs.index import CheckpointIndex
from .embeddings import DEFAULT_HEAD, OUTPUT_HEADS, Embeddings, leaf_module
from .tasks import LoraUpdate, TensorTask, TokenUpdate, Update, Updates
from .updates import LoraRules, rank_and_scaling, tensor_task, token_rows_update

# Tells whether two adapter tensors hold the same values (the second transposed when asked).
SameValues = Callable[[AdapterTensor, AdapterTensor, bool], bool]


def tied_head(unmatched: list[str], embeddings: Embeddings) -> str | None:
    """The adapter's name for the output head of a tied base (which has no head tensor of its own)."""
    if not embeddings.tied:
        return None
    heads = sorted({n for n in unmatched if leaf_module(n) in OUTPUT_HEADS and n.endswith(".weight")})
    return heads[0] if len(heads) == 1 else None


def tied_head_task(
    base: CheckpointIndex,
    input_name: str,
    head: str | None,
    lora_names: dict[str, LoraPair],
    weights: AdapterWeights,
    replacements: dict[str, Replacement],
    updates: dict[str, Update],
    config: LoraConfig,
    rules: LoraRules,
    out_dtype: str,
    embeddings: Embeddings,
    same_values: SameValues | None,
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
        token_rows_update(config, head_tokens, head_values_shape, embeddings, entry)
        if head_tokens is not None
        else None
    )
    if _same_weight(head_values, embed_replacement, same_values) and _same_update(
        head_pair, token_update, embed_update, config, same_values
    ):
        return None, head_keys, {}
    name = head or DEFAULT_HEAD
    update: Update | None = token_update
    lora: Updates = {}
    if head_pair is not None:
        lora = rules.updates(head_pair, name, entry, head_values)
        update, lora_keys = lora.pop(name)
        head_keys = lora_keys + tuple(t.key for t in (head_replacement, head_tokens) if t is not None)
    note = f"untied from {entry.name}"
    task = tensor_task(
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
    if rank_and_scaling(head_pair, config)[1] != embed_update.scaling:
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
