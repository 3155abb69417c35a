"""Where the base keeps its input embedding and output head, whether they are tied, and what resizing them changes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ShapeMismatch
from ..inputs.index import CheckpointIndex
from .tasks import TensorTask

# Module names of a language model's input embedding and output head, as transformers names them.
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in")
OUTPUT_HEADS = ("lm_head", "embed_out")
DEFAULT_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class Embeddings:
    """Where the base keeps its input embedding and output head, and whether they share one tensor."""

    input: str | None
    output: str | None
    tied: bool


def find_embeddings(base: CheckpointIndex, base_config: dict[str, Any]) -> Embeddings:
    """The input embedding and output head tensors by their usual names; tied when the checkpoint has no head
    (transformers does not save a tied head) and the config does not say otherwise."""
    inputs = [n for n in base.tensors if leaf_module(n) in INPUT_EMBEDDINGS and n.endswith(".weight")]
    outputs = [n for n in base.tensors if leaf_module(n) in OUTPUT_HEADS and n.endswith(".weight")]
    # The shortest name is the language model's own (`model.embed_tokens`, not `mtp.layers.0.embed_tokens`).
    input_name = min(inputs, key=lambda n: (n.count("."), n)) if inputs else None
    output_name = min(outputs, key=lambda n: (n.count("."), n)) if outputs else None
    tie = base_config.get("tie_word_embeddings")
    text_tie = (base_config.get("text_config") or {}).get("tie_word_embeddings")
    explicitly_untied = tie is False or (tie is None and text_tie is False)
    return Embeddings(input_name, output_name, input_name is not None and output_name is None and not explicitly_untied)


def leaf_module(name: str) -> str:
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else ""


def vocab_changes(
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
