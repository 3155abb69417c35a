"""The command line's flags: one parser per command, usage errors on one line, and the flags -> MergeOptions
settings (`merge_settings`), the one place a command's flags become options for the library."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .. import __version__
from ..dtypes import CANONICAL_DTYPES, canonical_dtype
from ..errors import MergeError
from ..options import BASE_QUANTS, COMBINATIONS, REQUANTIZE_TYPES, MergeOptions

if TYPE_CHECKING:
    from ..axolotl import AxolotlMerge

USAGE = """qlora-merge [--base BASE] --adapter ADAPTER[:WEIGHT] ... --output OUTPUT [options]
       qlora-merge --config AXOLOTL.yml [options]
       qlora-merge verify [--base BASE] --adapter ADAPTER --merged MERGED [options]
       qlora-merge inspect ADAPTER [--base BASE] [options]
       qlora-merge help [verify|inspect]"""
SUBCOMMANDS = ("verify", "inspect", "gguf", "gguf-lora", "setup-gguf")
# The flags that are MergeOptions fields, under the field's name (--max-shard-size is max_shard_size ...).
OPTION_NAMES = tuple(field.name for field in dataclasses.fields(MergeOptions))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with every usage error on one line (no usage block), and the closest flag for a mistyped one."""

    def parse_args(self, args: Sequence[str] | None = None, namespace: object = None) -> argparse.Namespace:  # type: ignore[override]
        # A mistyped flag is named first: argparse would report the required flag it failed to give instead.
        words = list(sys.argv[1:] if args is None else args)
        known = [option for action in self._actions for option in action.option_strings]
        for word in words[: words.index("--")] if "--" in words else words:
            flag = word.split("=", 1)[0]
            if flag.startswith("--") and not any(option.startswith(flag) for option in known):
                self.error(f"unrecognized arguments: {word}")
        return super().parse_args(words, namespace)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments: "):
            message = self.unrecognized(message.removeprefix("unrecognized arguments: ").split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def unrecognized(self, unknown: list[str]) -> str:
        """`unrecognized argument --ouput: did you mean --output?`: the first unknown flag and the nearest real one."""
        flags = [word for word in unknown if word.startswith("-")]
        if not flags:
            return f"unrecognized argument {unknown[0]!r}"
        flag = flags[0].split("=", 1)[0]
        known = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
        return f"unrecognized argument {flag}" + (f": did you mean {close[0]}?" if close else "")


def _dtype_flag(text: str) -> str:
    try:
        return canonical_dtype(text)
    except MergeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a dtype: use {', '.join(CANONICAL_DTYPES)} (or fp16, float16, half, bfloat16, fp32, "
            "float32)"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="qlora-merge",
        usage=USAGE,
        description="Merge a LoRA adapter into its base model and write a standalone safetensors checkpoint. "
        "The base is streamed tensor by tensor: memory stays small whatever the model size.",
        epilog="other commands: `qlora-merge inspect ADAPTER [--base B]` describes an adapter and checks it fits a "
        "base; `qlora-merge verify --base B --adapter A --merged M` proves a merge took; `qlora-merge gguf MERGED "
        "--types T` converts a merge to GGUF, `qlora-merge gguf-lora` the adapter itself (each has --help)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="an axolotl training config (YAML): base_model, lora_model_dir or output_dir, bf16/fp16/torch_dtype; "
        "writes {output_dir}/merged/ as `axolotl merge-lora` does. Flags given here override the file",
    )
    parser.add_argument(
        "--base",
        default=None,
        help="local path or HF repo id (org/name[@revision]) of the base model, full precision or bitsandbytes "
        "4-bit/8-bit (default: the base the adapter was trained on, base_model_name_or_path in its "
        "adapter_config.json)",
    )
    _add_adapter_flags(parser, required=False)
    parser.add_argument(
        "--output", default=None, help="output directory for the merged model (required unless --config)"
    )
    parser.add_argument(
        "--output_dir",
        "--output-dir",
        dest="output_dir",
        default=None,
        help="with --config: overrides its output_dir (the adapter when lora_model_dir is unset; output in merged/)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        type=_dtype_flag,
        help="output dtype: bf16, f16 or f32 (also fp16, float16, half, bfloat16, fp32, float32; default: bf16, or "
        "from --config)",
    )
    parser.add_argument(
        "--loader",
        default="auto",
        help="key layout of the base: auto (from config.json), qwen3.5 (text adapter into the multimodal "
        "checkpoint), or an architecture name (default: auto)",
    )
    parser.add_argument(
        "--base-quant",
        default=None,
        choices=BASE_QUANTS,
        help="merge into the base as QLoRA training saw it: the weights a 4-bit load quantizes round-tripped "
        "through bitsandbytes 4-bit nf4 or fp4 (blocks of 64, double quantization; needs transformers); "
        "none: into the weights as stored (default: none, or nf4 with a --config that trains 4-bit)",
    )
    parser.add_argument(
        "--base-quant-all",
        action="store_true",
        default=None,
        help="with --base-quant: round-trip every tensor of two or more dimensions, embeddings and lm_head too, "
        "exactly as axolotl merge-lora does (default: only the weights QLoRA training quantized)",
    )
    parser.add_argument(
        "--requantize",
        default=None,
        choices=REQUANTIZE_TYPES,
        help="write the merged model as a bitsandbytes 4-bit checkpoint (nf4 or fp4, double quantization) that "
        "transformers loads with its quantization_config",
    )
    parser.add_argument(
        "--gguf",
        metavar="TYPES",
        default=None,
        help="also convert the merge with llama.cpp's own converter and quantizer to <output-name>-<type>.gguf in "
        "the output, for each of a comma list: f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k or another "
        "llama-quantize type (pip install 'qlora-merge[gguf]', then `qlora-merge setup-gguf` once); the tokenizer "
        "and architecture are checked before the merge",
    )
    parser.add_argument(
        "--gguf-only",
        dest="keep_safetensors",
        action="store_false",
        default=None,
        help="with --gguf: keep only the GGUF files (the safetensors merge is staged, converted and removed)",
    )
    parser.add_argument(
        "--llama-cpp",
        dest="llama_cpp",
        metavar="DIR",
        default=None,
        help="a llama.cpp checkout whose convert_hf_to_gguf.py to use (default: setup-gguf's, or "
        "QLORA_MERGE_LLAMA_CPP)",
    )
    _add_hub_flags(parser)
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 2GiB (default: 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output directory")
    parser.add_argument(
        "--allow-unused",
        action="store_true",
        help="merge even if some adapter tensors match nothing in the base (they are listed and left out)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="plan only: print each adapter tensor and the base tensor it changes, shape, vocab and tying "
        "changes and the bytes to write; write nothing",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="after the merge, read the output back and prove every tensor equals base + adapter "
        "(as `qlora-merge verify` does); exit 3 if not",
    )
    parser.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="write merged tensors even if they hold NaN or infinite values, or values beyond float16's range "
        "with --dtype f16 (default: fail naming the tensor); each is reported in a warning",
    )
    parser.add_argument(
        "--checksum",
        action="store_true",
        help="add the SHA-256 of every output shard to the model card (README.md, always written: base, adapter, "
        "scaling, dtype, version and a hash of each input)",
    )
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO",
        default=None,
        help="after the merge, upload the output to this Hugging Face model repo (org/name[@branch]); created if "
        "missing (with --hf-token or HF_TOKEN)",
    )
    parser.add_argument(
        "--private",
        action="store_true",
        help="with --push-to-hub: create the repo private (an existing public repo is refused)",
    )
    _add_output_flags(parser, "print the result as JSON instead of the stage log")
    parser.add_argument("--version", action="version", version=f"qlora-merge {__version__}")
    return parser


def check_merge_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The usage errors of a merge's flags that argparse cannot see: each exits 2 with one line."""
    if args.private and args.push_to_hub is None:
        parser.error("--private needs --push-to-hub REPO")
    if args.push_to_hub is not None and args.dry_run:
        parser.error("--push-to-hub uploads a finished merge; --dry-run writes none")
    if args.config is not None:
        if args.adapter is not None and (len(args.adapter) > 1 or adapter_refs(args.adapter)[0][1] != 1.0):
            parser.error("--config merges the one adapter its config names at weight 1; --adapter may replace it")
        return
    missing = [f"--{name}" for name in ("adapter", "output") if getattr(args, name) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or --config)")
    if args.output_dir is not None:
        parser.error("--output_dir needs --config (it overrides the axolotl config's output_dir)")


def verify_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="qlora-merge verify",
        description="Prove a merge took: derive every tensor of the merged checkpoint again from base and adapter "
        "(streaming, flat memory) and compare them byte for byte; no LoRA key may remain.",
        epilog="a GGUF: `qlora-merge verify --gguf FILE --merged DIR` (or --base B --adapter A) compares llama.cpp's "
        "logits of it with transformers' (see `qlora-merge verify --gguf FILE --help`)",
    )
    parser.add_argument(
        "--base", default=None, help="local path or HF repo id of the base model (default: the one the adapter names)"
    )
    _add_adapter_flags(parser, required=True)
    parser.add_argument("--merged", required=True, help="the merged model directory to check")
    parser.add_argument("--loader", default="auto", help="key layout of the base, as for the merge (default: auto)")
    _add_hub_flags(parser)
    parser.add_argument("--allow-unused", action="store_true", help="as for the merge: adapter tensors may go unused")
    parser.add_argument(
        "--base-quant",
        default=None,
        choices=BASE_QUANTS,
        help="as for the merge: the base was round-tripped through bitsandbytes 4-bit (nf4, fp4) before merging",
    )
    parser.add_argument(
        "--base-quant-all",
        action="store_true",
        default=None,
        help="with --base-quant: round-trip every tensor of two or more dimensions, embeddings and lm_head too, "
        "exactly as axolotl merge-lora does (default: only the weights QLoRA training quantized)",
    )
    parser.add_argument(
        "--logits",
        action="store_true",
        help="also run a prompt through the merged model and through base + adapter (PEFT, unmerged) and compare "
        "the logits: loads each model whole in float32; needs transformers and peft (pip install "
        "'qlora-merge[verify]'); one adapter at weight 1",
    )
    parser.add_argument(
        "--logits-tolerance",
        type=float,
        default=None,
        help="largest logit difference allowed, relative to the largest logit (default: from the merged dtype, "
        "16 unit roundoffs: 0.0625 for bf16)",
    )
    _add_output_flags(parser, "print the report as JSON")
    return parser


def verify_gguf_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="qlora-merge verify --gguf",
        description="Run a GGUF with llama.cpp and compare its logits with transformers' on the merged model "
        "(--merged) or PEFT's base + unmerged adapter (--base, --adapter); exit 3 if they differ.",
    )
    parser.add_argument("--gguf", required=True, help="the .gguf file to check")
    parser.add_argument("--merged", default=None, help="the merged model directory the GGUF was made from")
    parser.add_argument("--base", default=None, help="without --merged: the base model")
    parser.add_argument("--adapter", default=None, help="without --merged: the adapter")
    return parser


def inspect_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="qlora-merge inspect",
        description="Describe a LoRA adapter from its config and file header (no weights are loaded): rank, alpha, "
        "scaling, variants, targeted modules and layers, parameters, the base it was trained on. With --base, plan "
        "the merge without writing anything and say whether every adapter tensor fits a base tensor.",
    )
    parser.add_argument("adapter", help="local path or HF repo id (org/name[@revision]) of the LoRA adapter")
    parser.add_argument("--base", default=None, help="local path or HF repo id of a base model to check it against")
    parser.add_argument("--loader", default="auto", help="key layout of the base, as for the merge (default: auto)")
    parser.add_argument("--hf-token", default=None, help="HF access token (default: HF_TOKEN or the stored login)")
    parser.add_argument(
        "--quant-error",
        nargs="?",
        const="nf4",
        default=None,
        choices=("nf4", "fp4"),
        help="with a full-precision --base: read every adapted weight and report ||W - dequant(Q(W))|| / "
        "||delta W||, per layer, for a 4-bit round trip (default nf4): how far merging into W is from the model "
        "QLoRA trained",
    )
    _add_output_flags(parser, "print the report as JSON")
    return parser


def gguf_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="qlora-merge gguf",
        description="Convert a merged model directory to GGUF with llama.cpp's own converter and quantizer: one "
        "<name>-<type>.gguf per type, each written whole or not at all.",
    )
    parser.add_argument("merged", help="the merged model directory (safetensors, config.json, tokenizer)")
    parser.add_argument("--types", required=True, help="comma list: f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k ...")
    parser.add_argument("--output", default=None, help="directory for the GGUF files (default: the merged one)")
    parser.add_argument("--name", default=None, help="file name stem (default: the merged directory's name)")
    parser.add_argument("--llama-cpp", dest="llama_cpp", metavar="DIR", default=None, help="as for the merge")
    parser.add_argument("--overwrite", action="store_true", help="replace GGUF files that exist")
    parser.add_argument(
        "--allow-nonfinite", action="store_true", help="write f16 even where values exceed float16's range"
    )
    parser.add_argument("--threads", type=int, default=None, help="quantizer threads (default: all cores)")
    _add_output_flags(parser, "print the files written as JSON")
    return parser


def gguf_lora_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="qlora-merge gguf-lora",
        description="Write a LoRA adapter as a GGUF LoRA for llama.cpp's runtime --lora (llama.cpp's own "
        "convert_lora_to_gguf.py), instead of merging it: one base GGUF, adapters switched at load time.",
    )
    parser.add_argument("--adapter", required=True, help="the local PEFT adapter directory (safetensors)")
    parser.add_argument(
        "--base", default=None, help="the base's local model directory, for its config.json (default: the adapter's)"
    )
    parser.add_argument("--output", required=True, help="the .gguf file to write")
    parser.add_argument("--type", default="f16", choices=("f32", "f16", "bf16", "q8_0"), help="default: f16")
    parser.add_argument("--llama-cpp", dest="llama_cpp", metavar="DIR", default=None, help="as for the merge")
    parser.add_argument("--overwrite", action="store_true", help="replace the file if it exists")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    return parser


def setup_gguf_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="qlora-merge setup-gguf",
        description="Fetch llama.cpp's converter (convert_hf_to_gguf.py, its conversion/ package and gguf-py) from "
        "the sdist of the pinned llama-cpp-python release into the cache qlora-merge looks in.",
    )
    parser.add_argument("--sdist", default=None, help="a downloaded llama-cpp-python sdist to unpack instead")
    parser.add_argument("--force", action="store_true", help="unpack again even if the cache has it")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    return parser


def _add_adapter_flags(parser: argparse.ArgumentParser, required: bool) -> None:
    """The flags that say which adapters, and how they combine: the same for a merge and its verification."""
    parser.add_argument(
        "--adapter",
        action="append",
        required=required,
        metavar="ADAPTER[:WEIGHT]",
        help="local path or HF repo id (org/name[@revision]) of a trained LoRA adapter"
        + ("" if required else " (required unless --config)")
        + "; repeat it to merge several in one pass, each with an optional weight (--adapter a --adapter b:0.5)",
    )
    parser.add_argument(
        "--combine",
        default="cat",
        choices=list(COMBINATIONS),
        help="how several adapters combine, as PEFT's add_weighted_adapter: cat, the exact weighted sum of their "
        "deltas (default), or linear, PEFT's averaged factors (equal ranks only)",
    )
    parser.add_argument(
        "--subtract",
        action="store_true",
        help="take the adapters' deltas out instead: --base is a model they were merged into (plain LoRA only; "
        "recovers the original up to rounding)",
    )
    parser.add_argument(
        "--adapter-name",
        default=None,
        help="which of several adapters saved in one directory (PEFT keeps non-default ones in sub-folders)",
    )


def _add_hub_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", default=None, help="branch, tag or commit of a hub --base (same as org/name@rev)")
    parser.add_argument("--adapter-revision", default=None, help="branch, tag or commit of hub --adapter repos")
    parser.add_argument("--hf-token", default=None, help="HF access token (default: HF_TOKEN or the stored login)")


def _add_output_flags(parser: argparse.ArgumentParser, json_help: str) -> None:
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")


def adapter_refs(values: Sequence[str]) -> list[tuple[str, float]]:
    """--adapter values as (reference, weight): `org/name@rev:0.5` or `./dir:-1` carry a weight, unless the whole
    text names an existing path (a directory may have a colon in its name)."""
    refs = []
    for text in values:
        ref, colon, weight = text.rpartition(":")
        if colon and ref and not Path(text).exists():
            try:
                refs.append((ref, float(weight)))
                continue
            except ValueError:
                pass  # a colon that is part of the reference (a Windows drive, a URL-like name)
        refs.append((text, 1.0))
    return refs


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that override an axolotl --config's own keys: read_axolotl_config's keywords."""
    return {
        "base": args.base,
        "adapter": args.adapter[0] if args.adapter else None,
        "output_dir": args.output_dir,
        "output": args.output,
        "dtype": args.dtype,
        "base_quant": args.base_quant,
    }


def merge_settings(args: argparse.Namespace, config: AxolotlMerge | None = None) -> dict[str, Any]:
    """The MergeOptions settings the flags give: every flag that is an option of this command (verify's are fewer),
    those left unset out; with --config, its dtype and token by axolotl's rules (`AxolotlMerge.settings`).
    `MergeOptions(**settings)` checks them: the merge does that after the header, so a bad --max-shard-size is
    reported as the merge's own error."""
    given = {name: value for name in OPTION_NAMES if (value := getattr(args, name, None)) is not None}
    return config.settings(**given) if config is not None else given
