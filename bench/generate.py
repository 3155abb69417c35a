"""Generate a reproducible random base checkpoint and LoRA adapter in Hugging Face / PEFT layout.

The base is written as ~2 GB safetensors shards plus ``model.safetensors.index.json`` and a
``config.json`` that ``transformers.LlamaForCausalLM`` accepts; every tensor is produced and written
one at a time from its own seeded generator, so generation needs one tensor's worth of RAM and the
bytes depend only on (seed, tensor name). The adapter is written directly in PEFT's format, without
PEFT. A ``complete.json`` marker written last makes later runs reuse the files.

Deliberately independent of the code under test: shard packing and naming, the index and the safetensors
header (``stream_writer.py``) are written here again rather than imported from qlora_merge, so a bug there
cannot make the benchmark's inputs agree with it.

A quantized variant (``--size 1b-nf4``, see ``specs.QUANTIZED``) is made from its source size's bf16 base, itself
generated first when not cached: transformers loads it with a ``BitsAndBytesConfig`` on CPU (bitsandbytes quantizes
every linear layer but ``lm_head`` as it loads) and ``save_pretrained`` writes it as a ``*-bnb-4bit`` repository holds
it; the source's adapter is copied next to it. That step uses transformers and bitsandbytes on purpose: the quantized
bytes are what users download, not something this file re-implements.

Usage: python bench/generate.py --size 1b --workdir /tmp/qlora-bench [--seed 0]
       python bench/generate.py --size 1b-nf4 --workdir /tmp/qlora-bench [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from specs import (
    LORA_ALPHA,
    LORA_RANK,
    QUANTIZED,
    SIZES,
    SPECS,
    TARGET_MODULES,
    ModelSpec,
    QuantizedVariant,
    base_tensors,
    projection_shapes,
)
from stream_writer import TensorEntry, write_streaming

GENERATOR_VERSION = 1
SHARD_LIMIT_BYTES = 2_000_000_000
INIT_STD = 0.02
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class CheckpointPaths:
    """Where one size's generated files live inside the workdir."""

    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def marker(self) -> Path:
        return self.root / "complete.json"


def checkpoint_paths(workdir: Path, size: str) -> CheckpointPaths:
    """Layout of the generated checkpoint for ``size`` under ``workdir``."""
    return CheckpointPaths(workdir / "models" / size)


def seeded_generator(seed: int, name: str) -> torch.Generator:
    """A generator whose stream depends only on ``seed`` and the tensor ``name``."""
    digest = hashlib.sha256(f"{GENERATOR_VERSION}:{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))


def random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Small-magnitude normal values (std 0.02) for tensor ``name``."""
    return torch.empty(shape, dtype=dtype).normal_(0.0, INIT_STD, generator=seeded_generator(seed, name))


def tensor_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of a bf16 tensor of this shape."""
    return torch.Size(shape).numel() * torch.bfloat16.itemsize


def plan_shards(entries: list[TensorEntry], limit: int) -> list[list[TensorEntry]]:
    """Greedily pack tensors, in order, into shards of at most ``limit`` bytes (as Hugging Face does)."""
    shards: list[list[TensorEntry]] = [[]]
    filled = 0
    for entry in entries:
        size = tensor_bytes(entry[1])
        if shards[-1] and filled + size > limit:
            shards.append([])
            filled = 0
        shards[-1].append(entry)
        filled += size
    return shards


def shard_filename(index: int, count: int) -> str:
    """Hugging Face shard naming, 1-based."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def llama_config(spec: ModelSpec) -> dict[str, object]:
    """A ``config.json`` for ``LlamaForCausalLM`` with the spec's shapes and an untied head."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab,
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": spec.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": INIT_STD,
        "tie_word_embeddings": False,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


def write_json(path: Path, payload: object) -> None:
    """Write ``payload`` as indented JSON."""
    path.write_text(json.dumps(payload, indent=2) + "\n")


def write_base(spec: ModelSpec, base_dir: Path, seed: int) -> dict[str, int]:
    """Write shards, index and config; return the written files' sizes by name."""
    base_dir.mkdir(parents=True)
    entries = base_tensors(spec)
    shards = plan_shards(entries, SHARD_LIMIT_BYTES)
    sizes: dict[str, int] = {}
    weight_map: dict[str, str] = {}

    def factory(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return random_tensor(name, shape, torch.bfloat16, seed)

    for index, shard in enumerate(shards, start=1):
        filename = shard_filename(index, len(shards))
        sizes[filename] = write_streaming(base_dir / filename, shard, torch.bfloat16, factory)
        weight_map.update(dict.fromkeys((name for name, _ in shard), filename))
        print(f"  wrote {filename} ({sizes[filename] / 1e9:.2f} GB)", flush=True)
    total = sum(tensor_bytes(shape) for _, shape in entries)
    write_json(base_dir / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    write_json(base_dir / "config.json", llama_config(spec))
    return sizes


def adapter_tensors(spec: ModelSpec, seed: int) -> dict[str, torch.Tensor]:
    """PEFT-named float32 LoRA factors: A is (r, in), B is (out, r), both non-zero."""
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(spec.layers):
        for module, (out_features, in_features) in projection_shapes(spec).items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            factors = {"lora_A": (LORA_RANK, in_features), "lora_B": (out_features, LORA_RANK)}
            for factor, shape in factors.items():
                name = f"{prefix}.{factor}.weight"
                tensors[name] = random_tensor(name, shape, torch.float32, seed)
    return tensors


def adapter_config(base_dir: Path) -> dict[str, object]:
    """``adapter_config.json`` as PEFT writes it for a plain LoRA on all linear projections."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        "r": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "target_modules": list(TARGET_MODULES),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
        "revision": None,
    }


def write_adapter(spec: ModelSpec, paths: CheckpointPaths, seed: int) -> dict[str, int]:
    """Write the adapter weights and config; return the weight file's size."""
    paths.adapter.mkdir(parents=True)
    weights = paths.adapter / "adapter_model.safetensors"
    save_file(adapter_tensors(spec, seed), str(weights), metadata={"format": "pt"})
    write_json(paths.adapter / "adapter_config.json", adapter_config(paths.base))
    return {weights.name: weights.stat().st_size}


def marker_payload(spec: ModelSpec, seed: int) -> dict[str, object]:
    """What a complete generation is keyed on; any change forces regeneration."""
    return {"version": GENERATOR_VERSION, "seed": seed, "spec": asdict(spec)}


def is_complete(paths: CheckpointPaths, payload: dict[str, object]) -> bool:
    """True when the marker matches ``payload`` (see ``marker_payload``) and every recorded file has its size."""
    if not paths.marker.is_file():
        return False
    marker = json.loads(paths.marker.read_text())
    if {key: marker.get(key) for key in payload} != payload:
        return False
    files: dict[str, int] = marker.get("files", {})
    return bool(files) and all(
        (paths.root / name).is_file() and (paths.root / name).stat().st_size == size for name, size in files.items()
    )


def generate(spec: ModelSpec, paths: CheckpointPaths, seed: int) -> None:
    """Write base and adapter from scratch, then the completion marker."""
    shutil.rmtree(paths.root, ignore_errors=True)
    base_sizes = write_base(spec, paths.base, seed)
    adapter_sizes = write_adapter(spec, paths, seed)
    files = {f"base/{name}": size for name, size in base_sizes.items()}
    files |= {f"adapter/{name}": size for name, size in adapter_sizes.items()}
    write_json(paths.marker, {**marker_payload(spec, seed), "files": files})


def ensure_checkpoint(spec: ModelSpec, workdir: Path, seed: int) -> CheckpointPaths:
    """Generate the checkpoint for ``spec`` unless a complete one is already cached."""
    paths = checkpoint_paths(workdir, spec.name)
    if is_complete(paths, marker_payload(spec, seed)):
        print(f"[{spec.name}] using cached checkpoint in {paths.root}", flush=True)
        return paths
    print(f"[{spec.name}] generating {spec.label}-shaped checkpoint in {paths.root}", flush=True)
    started = time.perf_counter()
    generate(spec, paths, seed)
    print(f"[{spec.name}] generated in {time.perf_counter() - started:.1f} s", flush=True)
    return paths


def quantized_payload(variant: QuantizedVariant, seed: int) -> dict[str, object]:
    """The source's marker payload plus the quantization and the library versions that produced the bytes."""
    import bitsandbytes
    import transformers

    versions = {"bitsandbytes": bitsandbytes.__version__, "transformers": transformers.__version__}
    return {**marker_payload(SPECS[variant.source], seed), "quantization": asdict(variant), "versions": versions}


def quantize(variant: QuantizedVariant, source: CheckpointPaths, paths: CheckpointPaths) -> dict[str, int]:
    """Load the source base 4-bit quantized by transformers + bitsandbytes on CPU, save it, copy the adapter."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=variant.quant_type,
        bnb_4bit_use_double_quant=variant.double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        source.base, quantization_config=config, device_map="cpu", dtype=torch.bfloat16
    )
    print(f"  loaded and quantized in {time.perf_counter() - started:.1f} s", flush=True)
    model.save_pretrained(paths.base)
    del model
    shutil.copytree(source.adapter, paths.adapter)
    written = [*paths.base.iterdir(), *paths.adapter.iterdir()]
    return {str(path.relative_to(paths.root)): path.stat().st_size for path in written if path.is_file()}


def ensure_quantized(variant: QuantizedVariant, workdir: Path, seed: int) -> CheckpointPaths:
    """Quantize the source size's base (generated first if needed) unless a complete variant is cached."""
    source = ensure_checkpoint(SPECS[variant.source], workdir, seed)
    paths = checkpoint_paths(workdir, variant.name)
    payload = quantized_payload(variant, seed)
    if is_complete(paths, payload):
        print(f"[{variant.name}] using cached checkpoint in {paths.root}", flush=True)
        return paths
    print(f"[{variant.name}] quantizing {source.base} ({variant.quant_type}) into {paths.root}", flush=True)
    started = time.perf_counter()
    shutil.rmtree(paths.root, ignore_errors=True)
    paths.root.mkdir(parents=True)
    files = quantize(variant, source, paths)
    write_json(paths.marker, {**payload, "files": files})
    print(f"[{variant.name}] quantized in {time.perf_counter() - started:.1f} s", flush=True)
    return paths


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", required=True, choices=SIZES)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.size in QUANTIZED:
        ensure_quantized(QUANTIZED[args.size], args.workdir, args.seed)
    else:
        ensure_checkpoint(SPECS[args.size], args.workdir, args.seed)


if __name__ == "__main__":
    main()
