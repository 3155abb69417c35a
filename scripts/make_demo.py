"""Generate the tiny bundled example under ``examples/tiny-llama``: a sharded base model and two LoRA adapters.

The output is deterministic: running the script twice yields byte-identical safetensors files.

Usage::

    python scripts/make_demo.py [--out examples/tiny-llama]
"""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

VOCAB_SIZE = 1024
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
BASE_SEED = 0
ADAPTER_SEED = 1
# A second, smaller adapter on the attention only, for the several-adapters example: (r, alpha, targets, seed).
SECOND_ADAPTER = (4, 8, ["q_proj", "v_proj"], 2)
LORA_STD = 0.02
NUM_SHARDS = 2
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

CORPUS = [
    "The lighthouse keeper climbed the narrow stairs every evening at dusk. He trimmed the wick, "
    "polished the great glass lens, and watched the beam sweep across the dark water. Ships far "
    "out at sea saw the light and knew where the rocks were hidden beneath the waves.",
    "In the spring the village held a market in the square. Farmers brought baskets of apples, "
    "onions, carrots and fresh bread. Children ran between the stalls while their parents argued "
    "about the price of cheese and the weather that was coming from the west.",
    "A small model can still teach us a great deal. When we merge a low rank adapter into the "
    "weights of a base model, each target matrix receives the product of two thin matrices, "
    "scaled by alpha divided by the rank. The result should behave exactly like the adapter.",
    "She opened the old notebook and found a list of questions written in pencil. Why do rivers "
    "bend? How far away is the moon? What makes the sky turn orange in the evening? Under each "
    "question she had written an answer, and under some answers, another question.",
    "Good software is read far more often than it is written. Clear names, small functions and "
    "honest tests make a project easier to change. When something breaks, a short error message "
    "that says what went wrong and how to fix it saves everyone time.",
    "The train left the station at seven in the morning. Through the window the fields were "
    "covered in frost, and the sun rose slowly over the hills. By noon the passengers had "
    "reached the coast, where the air smelled of salt and the gulls were calling.",
]


def train_sentencepiece() -> bytes:
    """A SentencePiece BPE model, as Llama ships (byte fallback, identity normalisation, ``<unk>``/``<s>``/``</s>``/
    ``<pad>`` = 0/1/2/3), trained on the in-script corpus: the same bytes on every run (one thread, seeded).

    SentencePiece, not a home-made byte-level BPE: llama.cpp's converter reads ``tokenizer.model`` directly, while a
    BPE tokenizer it has no pre-tokenizer hash for is refused, so the demo would not convert to GGUF."""
    import sentencepiece as spm

    sentences = [s for paragraph in CORPUS for s in re.split(r"(?<=[.?!])\s+", paragraph) if s]
    if hasattr(spm, "set_random_generator_seed"):
        spm.set_random_generator_seed(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=VOCAB_SIZE, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, num_threads=1, unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2,
    )  # fmt: skip
    return model.getvalue()


def save_tokenizer(base_dir: Path) -> PreTrainedTokenizerBase:
    """Write ``tokenizer.model`` and, converted from it by transformers, ``tokenizer.json`` with the chat template.

    Both files ship: llama.cpp's converter reads ``tokenizer.model``, and transformers v5 writes none on save; the
    fast tokenizer loads without sentencepiece (or the protobuf its conversion needs)."""
    (base_dir / "tokenizer.model").write_bytes(train_sentencepiece())
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False}
    (base_dir / "tokenizer_config.json").write_text(json.dumps(config | SPECIAL_TOKENS))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 512
    tokenizer.save_pretrained(base_dir)
    # transformers 5 records its backend, where it loaded from, and the special tokens again as a list (transformers 4
    # wants a dict there); the generic class loads from tokenizer.json alone, under transformers 4 and 5.
    tokenizer_config_path = base_dir / "tokenizer_config.json"
    saved = json.loads(tokenizer_config_path.read_text())
    for key in ("is_local", "local_files_only", "backend", "extra_special_tokens"):
        saved.pop(key, None)
    saved["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return AutoTokenizer.from_pretrained(base_dir)


def build_base(tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """Build the randomly initialised bfloat16 base model."""
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(BASE_SEED)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=32,
    )
    return model


def save_base(model: LlamaForCausalLM, base_dir: Path) -> None:
    """Save the base model as exactly ``NUM_SHARDS`` safetensors shards beside the tokenizer."""
    sizes = [p.numel() * p.element_size() for p in model.state_dict().values()]
    # Greedy sharding: a limit of half the total plus the largest tensor yields exactly two shards.
    max_shard_size = sum(sizes) // NUM_SHARDS + 1 + max(sizes)
    model.save_pretrained(base_dir, max_shard_size=max_shard_size, safe_serialization=True)
    shards = sorted(base_dir.glob("*.safetensors"))
    if len(shards) != NUM_SHARDS or not (base_dir / "model.safetensors.index.json").is_file():
        raise RuntimeError(f"expected {NUM_SHARDS} shards and an index in {base_dir}, got {shards}")


def build_adapter(
    base_dir: Path,
    adapter_dir: Path,
    r: int = 8,
    alpha: int = 16,
    targets: list[str] = TARGET_MODULES,
    seed: int = ADAPTER_SEED,
) -> None:
    """Attach a LoRA adapter to the saved base, fill it with seeded noise and save it."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    lora_config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora_config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * LORA_STD
                param.copy_(noise.to(param.dtype))
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    (adapter_dir / "README.md").unlink(missing_ok=True)
    config_path = adapter_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = "../base"
    adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def verify(base_dir: Path, adapter_dir: Path) -> float:
    """Reload everything through the public APIs and return the max |adapted - base| logit difference."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if len(tokenizer) > VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size={VOCAB_SIZE}")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Why do rivers bend?"}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(**inputs).logits
    adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        adapted_logits = adapted(**inputs).logits
    diff = (adapted_logits - base_logits).abs().max().item()
    if diff == 0.0:
        raise RuntimeError("adapter does not change the logits")
    return diff


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("examples/tiny-llama"), help="output directory")
    args = parser.parse_args()

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    base_dir: Path = args.out / "base"
    adapter_dir: Path = args.out / "adapter"
    second_dir: Path = args.out / "adapter-attention"
    for directory in (base_dir, adapter_dir, second_dir):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)

    tokenizer = save_tokenizer(base_dir)
    save_base(build_base(tokenizer), base_dir)
    build_adapter(base_dir, adapter_dir)
    build_adapter(base_dir, second_dir, *SECOND_ADAPTER)
    for directory in (adapter_dir, second_dir):
        diff = verify(base_dir, directory)
        print(f"wrote {directory}; max |adapted - base| logit difference = {diff:.4g}")


if __name__ == "__main__":
    main()
