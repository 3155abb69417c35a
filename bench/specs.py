"""Model shapes the benchmark generates, and the tensor names and shapes they imply.

Pure standard library on purpose: the runner imports this module and must stay free of torch so that
its own small resident set does not leak into the peak RSS that its children report (on Linux a
child's ``ru_maxrss`` starts from the parent's high-water mark at ``exec``).
"""

from __future__ import annotations

from dataclasses import dataclass

LORA_RANK = 16
LORA_ALPHA = 32
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BF16_BYTES = 2


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a Llama-architecture decoder, enough to lay out its checkpoint."""

    name: str
    label: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float
    max_positions: int
    bos_token_id: int
    eos_token_id: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


SPECS: dict[str, ModelSpec] = {
    "1b": ModelSpec("1b", "TinyLlama-1.1B", 2048, 5632, 22, 32, 4, 32000, 10000.0, 2048, 1, 2),
    "3b": ModelSpec("3b", "Llama-3.2-3B", 3072, 8192, 28, 24, 8, 128256, 500000.0, 131072, 128000, 128001),
    "8b": ModelSpec("8b", "Llama-3-8B", 4096, 14336, 32, 32, 8, 128256, 500000.0, 8192, 128000, 128001),
}


@dataclass(frozen=True)
class QuantizedVariant:
    """A bitsandbytes 4-bit copy of a generated bf16 size, quantized and saved by transformers on CPU.

    Its adapter is the source size's; the benchmark merges it into the quantized base to a bf16 checkpoint.
    """

    name: str
    source: str
    quant_type: str
    double_quant: bool


QUANTIZED: dict[str, QuantizedVariant] = {
    "1b-nf4": QuantizedVariant("1b-nf4", "1b", "nf4", double_quant=True),
}
# Every name ``--sizes`` accepts: the generated bf16 sizes, then their quantized variants.
SIZES: tuple[str, ...] = (*SPECS, *QUANTIZED)


def spec_of(size: str) -> ModelSpec:
    """The model shape behind a size name; a quantized variant has its source size's shape."""
    return SPECS[QUANTIZED[size].source] if size in QUANTIZED else SPECS[size]


def projection_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """Map each LoRA-targeted module (relative to a decoder layer) to its weight shape (out, in)."""
    h, i, kv = spec.hidden, spec.intermediate, spec.kv_dim
    return {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def layer_tensors(spec: ModelSpec, index: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensors of decoder layer ``index`` in Hugging Face naming."""
    prefix = f"model.layers.{index}"
    tensors: list[tuple[str, tuple[int, ...]]] = [(f"{prefix}.input_layernorm.weight", (spec.hidden,))]
    tensors += [(f"{prefix}.{module}.weight", shape) for module, shape in projection_shapes(spec).items()]
    tensors.append((f"{prefix}.post_attention_layernorm.weight", (spec.hidden,)))
    return tensors


def base_tensors(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the base checkpoint in file order (embeddings, layers, final norm, untied head)."""
    tensors: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (spec.vocab, spec.hidden))]
    for index in range(spec.layers):
        tensors += layer_tensors(spec, index)
    tensors.append(("model.norm.weight", (spec.hidden,)))
    tensors.append(("lm_head.weight", (spec.vocab, spec.hidden)))
    return tensors


def numel(shape: tuple[int, ...]) -> int:
    """Number of elements of a tensor of this shape."""
    count = 1
    for dim in shape:
        count *= dim
    return count


def base_bytes(spec: ModelSpec) -> int:
    """Size in bytes of all bf16 base weights (the checkpoint's ``total_size``)."""
    return sum(numel(shape) for _, shape in base_tensors(spec)) * BF16_BYTES


def spot_check_names(spec: ModelSpec) -> list[str]:
    """Merged tensors compared between tools: two LoRA targets plus one untouched tensor."""
    last = spec.layers - 1
    return [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        f"model.layers.{last}.mlp.down_proj.weight",
        "model.norm.weight",
    ]
