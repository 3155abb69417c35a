"""Which base should a QLoRA adapter be merged into? Measured on tiny llama and qwen2 models, on CPU.

For each architecture: a random full-precision base W (bf16), the same model loaded 4-bit by transformers +
bitsandbytes (nf4, double quantization, float32 compute: the model QLoRA trains), and a LoRA adapter on every
linear layer whose delta is about 1% of each weight (a fine-tune's usual size). The reference is the training-time
model: PEFT's unmerged model over the 4-bit base (its weights as bitsandbytes dequantizes them), float32 logits.
Each merge is compared with it:

- into W16: `qlora-merge --base W` (what unsloth does);
- into dequant(NF4(W)): `qlora-merge --base W --base-quant nf4` (the weights a 4-bit load quantizes), and with
  `--base-quant-all` (every 2-D tensor, embeddings and head too: what `axolotl merge-lora` does for 4-bit configs);
- into the 4-bit checkpoint itself: `qlora-merge --base <bnb nf4 repo>`;
- re-quantized: `--base-quant nf4 --requantize nf4`, loaded 4-bit by transformers (the "dequantize, merge,
  re-quantize" chain);

as the largest absolute logit difference over 4 x 32 random tokens (and the largest logit, for scale), plus
`inspect --quant-error`'s ||W - dequant(Q(W))|| / ||delta W||. Merges are f32 so that only the base differs.

Usage: python scripts/qlora_evidence.py [--workdir /tmp/qlora-evidence] [--delta 0.01]
Prints a markdown table (the README's) and writes results.json in the workdir.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

ARCHITECTURES = ("llama", "qwen2")


def tiny_config(arch: str) -> object:
    import transformers

    # rows (in_features) are multiples of 64: bitsandbytes' CPU kernel mis-dequantizes other shapes on AVX-512
    common = dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=128,
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False)
    return transformers.Qwen2Config(**common, tie_word_embeddings=True)


def quantization_config() -> object:
    import transformers

    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def make_inputs(arch: str, root: Path, delta: float) -> tuple[Path, Path, Path]:
    """The bf16 base, its bitsandbytes nf4 checkpoint, and an adapter trained (here: drawn) on the 4-bit model."""
    import peft
    import transformers

    torch.manual_seed(0)
    base = root / "base"
    transformers.AutoModelForCausalLM.from_config(tiny_config(arch)).to(torch.bfloat16).save_pretrained(base)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        base, quantization_config=quantization_config(), device_map="cpu"
    )
    bnb_base = root / "base-bnb-nf4"
    quantized.save_pretrained(bnb_base)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(quantized, peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            # ||W|| of the random base: its weights are N(0, 0.02) (transformers' initializer_range)
            size = (b.shape[0] * a.shape[1]) ** 0.5 * 0.02
            with torch.no_grad():
                b.copy_(torch.randn(b.shape, generator=generator))
                scaled = (b @ a) * module.scaling["default"]
                b.mul_(delta * size / scaled.norm())
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return base, bnb_base, adapter


def training_logits(bnb_base: Path, adapter: Path, tokens: torch.Tensor, dequantized: bool) -> torch.Tensor:
    """PEFT's unmerged model over the 4-bit base, float32. `dequantized`: the base's weights as bitsandbytes
    dequantizes them (the training-time model's math); else through bitsandbytes' CPU 4-bit matmul, which rounds
    activations to bf16 on the way (shown for scale: it is what a 4-bit runtime adds)."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(bnb_base, device_map="cpu", dtype=torch.float32)
    if dequantized:
        model = model.dequantize().float()
    model = peft.PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def logits_of(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(directory, device_map="cpu", dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def run(arch: str, root: Path, delta: float) -> dict[str, float]:
    from qlora_merge import inspect_adapter, merge

    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    base, bnb_base, adapter = make_inputs(arch, root, delta)
    tokens = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(2))
    reference = training_logits(bnb_base, adapter, tokens, dequantized=True)
    merges = {
        "W16": dict(base=base),
        "--base-quant nf4": dict(base=base, base_quant="nf4"),
        "--base-quant nf4 --base-quant-all (axolotl)": dict(base=base, base_quant="nf4", base_quant_all=True),
        "the 4-bit checkpoint": dict(base=bnb_base),
        "--base-quant nf4 --requantize nf4": dict(base=base, base_quant="nf4", requantize="nf4"),
    }
    row: dict[str, float] = {"max |logit|": reference.abs().max().item()}
    row["bnb CPU 4-bit kernel"] = (
        (training_logits(bnb_base, adapter, tokens, dequantized=False) - reference).abs().max().item()
    )
    for label, settings in merges.items():
        out = root / "".join(c if c.isalnum() else "-" for c in label).strip("-")
        merge(settings.pop("base"), adapter, out, dtype="f32", **settings)
        row[label] = (logits_of(out, tokens) - reference).abs().max().item()
    report = inspect_adapter(adapter, base, quant_error="nf4")
    assert report.quant_error is not None
    layers = report.quant_error.by_layer().values()
    row["ratio overall"] = report.quant_error.overall
    row["ratio per layer min"] = min(layers)
    row["ratio per layer max"] = max(layers)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-evidence"))
    parser.add_argument("--delta", type=float, default=0.01, help="||delta W|| / ||W|| of the adapter")
    args = parser.parse_args()
    results = {arch: run(arch, args.workdir / arch, args.delta) for arch in ARCHITECTURES}
    (args.workdir / "results.json").write_text(json.dumps(results, indent=2))
    columns = list(next(iter(results.values())))
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for arch, row in results.items():
        print(f"| {arch} | " + " | ".join(f"{row[c]:.3g}" for c in columns) + " |")


if __name__ == "__main__":
    main()
