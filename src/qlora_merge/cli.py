"""Command line: parse flags, call the library, print stages. The only module that prints or exits."""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import resource
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TextIO, TypeVar

from . import __version__
from .api import COMBINATIONS, MergeResult, merge, verify
from .axolotl import read_axolotl_config
from .dtypes import CANONICAL_DTYPES, canonical_dtype
from .errors import MergeError
from .inputs.base_choice import default_base
from .inputs.resolve import with_revision
from .inspection import AdapterReport, inspect_adapter
from .outputs.upload import UploadResult, check_push, push_to_hub
from .progress import ProgressEvent, human_bytes, ignore_progress
from .verification.logits import compare_logits
from .verification.tensors import VerifyReport

T = TypeVar("T")

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1
EXIT_NOT_VERIFIED = 3  # the inputs were fine; the merged checkpoint is not base + adapter

STAGE_TEXT = {
    "base": ("Loading base model (streaming: headers only, no model class)", "Base model indexed"),
    "tokenizer": ("Loading tokenizer", "Tokenizer files found"),
    "adapter": ("Loading LoRA adapter", "Adapter loaded"),
    "merge": ("Merging adapter into base weights", "Merged"),
    "save": ("Saving merged model to '{detail}'", "Saved"),
}
# The same stages with several adapters, or with the adapters' deltas taken out.
SEVERAL_TEXT = {
    "adapter": ("Loading LoRA adapters", "Adapters loaded"),
    "merge": ("Merging adapters into base weights", "Merged"),
}
SUBTRACT_TEXT = {"merge": ("Subtracting the adapters' deltas from the base weights", "Subtracted")}
USAGE = """qlora-merge [--base BASE] --adapter ADAPTER[:WEIGHT] ... --output OUTPUT [options]
       qlora-merge --config AXOLOTL.yml [options]
       qlora-merge verify [--base BASE] --adapter ADAPTER --merged MERGED [options]
       qlora-merge inspect ADAPTER [--base BASE] [options]
       qlora-merge help [verify|inspect]"""
SUBCOMMANDS = ("verify", "inspect")


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
            message = _unrecognized(self, message.removeprefix("unrecognized arguments: ").split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _unrecognized(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """`unrecognized argument --ouput: did you mean --output?`: the first unknown flag and the nearest real one."""
    flags = [word for word in unknown if word.startswith("-")]
    if not flags:
        return f"unrecognized argument {unknown[0]!r}"
    flag = flags[0].split("=", 1)[0]
    known = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
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
        "base; `qlora-merge verify --base B --adapter A --merged M` proves a merge took (each has --help)",
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
        help="local path or HF repo id (org/name[@revision]) of the full-precision base model (default: the base "
        "the adapter was trained on, base_model_name_or_path in its adapter_config.json)",
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
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of the stage log")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("--version", action="version", version=f"qlora-merge {__version__}")
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


class StageLog:
    """Seed-style staged output on stdout; a progress bar on stderr when it is a terminal."""

    def __init__(
        self, out: TextIO, err: TextIO, requested_loader: str, several: bool = False, subtract: bool = False
    ) -> None:
        self.out, self.err, self.requested_loader = out, err, requested_loader
        self.fancy = _can_print(out, "⏳✅💾❌…")
        self.bar = err.isatty()
        self.texts = STAGE_TEXT | (SEVERAL_TEXT if several else {}) | (SUBTRACT_TEXT if subtract else {})

    def line(self, text: str) -> None:
        try:
            print(text, file=self.out, flush=True)
        except BrokenPipeError:  # `qlora-merge ... | head`: the reader left; the merge itself goes on to the end
            self.out = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the log)
            sys.stdout = self.out

    def mark(self, kind: str) -> str:
        marks = (
            {"start": "⏳", "done": "✅", "save": "💾", "fail": "❌"}
            if self.fancy
            else {"start": "..", "done": "ok", "save": ">>", "fail": "!!"}
        )
        return marks[kind]

    def __call__(self, event: ProgressEvent) -> None:
        if event.stage == "resolve":
            if event.status == "done":
                self.line(f"loader  : {event.detail}  (resolved from --loader={self.requested_loader})")
                self.line("")
                self.line(_memory_line())
            return
        starting, finished = self.texts[event.stage]
        if event.status == "start":
            mark = self.mark("save" if event.stage == "save" else "start")
            self.line(f"{mark} {starting.format(detail=event.detail)} {'…' if self.fancy else '...'}")
        elif event.status == "update":
            if self.bar:
                self.err.write("\r" + _bar(event))
                self.err.flush()
        else:
            if self.bar and event.stage == "merge":
                self.err.write("\r" + " " * 78 + "\r")
            detail = f": {event.detail}" if event.detail and event.stage != "save" else ""
            timing = f"  ({event.elapsed:.0f}s)" if event.stage in ("base", "merge", "save") else ""
            self.line(f"{self.mark('done')} {finished}{detail}{timing}")


def _print_coverage(result: MergeResult, log: StageLog) -> None:
    """--dry-run: what every adapter tensor does, what changes in config.json, what would be written."""
    log.line("")
    log.line("adapter tensor -> output tensor")
    for row in result.coverage:
        target = f"{row.target} {_shape(row.target_shape)}" if row.target else "-"
        log.line(f"  {row.adapter_key} {_shape(row.adapter_shape)} -> {target}  [{row.role}; {row.action}]")
    for line in result.reshaped:
        log.line(f"output: {line}")
    for key, value in result.config_changes.items():
        log.line(f"config.json: {key} -> {json.dumps(value)}")
    if result.unused:
        log.line(f"unused adapter tensors (left out): {len(result.unused)}")
    log.line(
        f"would write {human_bytes(result.bytes_written)} in {len(result.shards)} shard(s): "
        f"{result.tensors_merged} merged, {result.tensors_replaced} replaced, "
        f"{result.tensors_copied + result.tensors_converted} copied"
    )
    log.line("dry run: nothing was written")


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"


def _bar(event: ProgressEvent, width: int = 30) -> str:
    fraction = event.bytes_done / event.bytes_total if event.bytes_total else 1.0
    filled = int(width * fraction)
    rate = event.bytes_done / event.elapsed / 1e9 if event.elapsed > 0 else 0.0
    return (
        f"  [{'#' * filled}{'.' * (width - filled)}] {event.tensors_done}/{event.tensors_total} tensors  "
        f"{human_bytes(event.bytes_done)}/{human_bytes(event.bytes_total)}  {rate:.2f} GB/s"
    )


def _can_print(stream: TextIO, text: str) -> bool:
    try:
        text.encode(stream.encoding or "utf-8")  # no encoding: an in-memory stream holds any text
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _memory_line() -> str:
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for row in f:
                key, value = row.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
    except OSError:
        return "RAM : unknown"
    return f"RAM : {info.get('MemAvailable', 0) / 1e9:.1f} GB free / {info.get('MemTotal', 0) / 1e9:.1f} GB total"


def _peak_rss_gb() -> float:
    """This process's peak resident memory. VmHWM where Linux has it: ru_maxrss also counts the parent's peak
    inherited at exec, so a merge started from a big process (a notebook, pytest) would report that one's."""
    try:
        with open("/proc/self/status") as f:
            for row in f:
                if row.startswith("VmHWM:"):
                    return int(row.split()[1]) * 1024 / 1e9
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["help"]:  # `qlora-merge help [verify|inspect]`, as git and pip take it
        argv = [*argv[1:2], "--help"] if argv[1:2] and argv[1] in SUBCOMMANDS else ["--help"]
    if argv[:1] == ["verify"]:
        return _verify_main(argv[1:], out, err)
    if argv[:1] == ["inspect"]:
        return _inspect_main(argv[1:], out, err)
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.debug, err)
    if args.private and args.push_to_hub is None:
        parser.error("--private needs --push-to-hub REPO")
    if args.push_to_hub is not None and args.dry_run:
        parser.error("--push-to-hub uploads a finished merge; --dry-run writes none")
    if args.config is not None:
        if args.adapter is not None and (len(args.adapter) > 1 or adapter_refs(args.adapter)[0][1] != 1.0):
            parser.error("--config merges the one adapter its config names at weight 1; --adapter may replace it")
        code, settings = _guarded(
            lambda: read_axolotl_config(
                args.config,
                base=args.base,
                adapter=args.adapter[0] if args.adapter else None,
                output_dir=args.output_dir,
                output=args.output,
                dtype=args.dtype,
            ),
            args.debug,
            err,
        )
        if settings is None:
            return code
        args.base, args.adapter, args.output, args.dtype = (
            settings.base,
            [settings.adapter],
            str(settings.output),
            settings.dtype,
        )
        args.hf_token = args.hf_token or settings.hf_token
    else:
        missing = [f"--{name}" for name in ("adapter", "output") if getattr(args, name) is None]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)} (or --config)")
        if args.output_dir is not None:
            parser.error("--output_dir needs --config (it overrides the axolotl config's output_dir)")
        args.dtype = args.dtype or "bf16"
    adapters = adapter_refs(args.adapter)
    log = StageLog(out, err, args.loader, several=len(adapters) > 1, subtract=args.subtract)
    if args.push_to_hub is not None:  # a push that cannot happen is said before the merge, not after it
        code, pushed = _guarded(lambda: check_push(args.push_to_hub, args.hf_token), args.debug, err)
        if pushed is None:
            return code
    code, base_line = _choose_base(args, adapters, err)
    if base_line is None:
        return code
    if not args.json:
        log.line(base_line)
        _adapter_lines(log, adapters, args.combine, args.subtract)
        log.line(f"output  : {args.output}")
        log.line(f"dtype   : {args.dtype}")
    code, result = _guarded(
        lambda: merge(
            args.base,
            adapters,
            args.output,
            dtype=args.dtype,
            loader=args.loader,
            hf_token=args.hf_token,
            adapter_name=args.adapter_name,
            combine=args.combine,
            subtract=args.subtract,
            revision=args.revision,
            adapter_revision=args.adapter_revision,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            allow_unused=args.allow_unused,
            dry_run=args.dry_run,
            allow_nonfinite=args.allow_nonfinite,
            checksum=args.checksum,
            progress=ignore_progress if args.json else log,
        ),
        args.debug,
        err,
    )
    if result is None:
        return code
    report: dict[str, object] = result.to_dict() | {"peak_rss_gb": round(_peak_rss_gb(), 3)}
    if args.json:
        pass  # printed last, with the verification's and the upload's outcome
    elif result.dry_run:
        _print_coverage(result, log)
    else:
        log.line(
            f"   {result.tensors_merged} tensors merged, {result.tensors_copied + result.tensors_converted} copied, "
            f"{human_bytes(result.bytes_written)} in {len(result.shards)} shard(s), peak RSS {_peak_rss_gb():.2f} GB"
        )
        if result.checksums:
            log.line(f"   SHA-256 of {len(result.checksums)} shard(s) in {result.output / 'README.md'}")
    code = _after_merge(args, adapters, result.output, report, log, err) if not result.dry_run else 0
    if args.json:
        print(json.dumps(report, indent=2), file=out)
    elif code == 0 and not result.dry_run:
        log.line(f"{log.mark('done')} Done. Merged model: {result.output}")
    return code


def _after_merge(
    args: argparse.Namespace,
    adapters: list[tuple[str, float]],
    output: Path,
    report: dict[str, object],
    log: StageLog,
    err: TextIO,
) -> int:
    """--verify, then --push-to-hub (only a verified merge is uploaded); their outcome goes into `report`."""
    if args.verify:
        code = _verify_and_report(args, adapters, output, log, err, json_out=None, completed=output)
        report["verified"] = code == 0
        if code:
            return code
    if args.push_to_hub is None:
        return 0
    code, upload = _guarded(lambda: _push(args, output), args.debug, err, output)
    if upload is None:
        if code < 128:  # an interrupt has said so in its own line
            print(f"qlora-merge: the merged model is complete at {output}; only the upload failed", file=err)
        return code
    report["upload"] = upload.to_dict()
    if not args.json:
        log.line(f"{log.mark('done')} Uploaded {upload.files} files to {upload.url}")
    return 0


def _push(args: argparse.Namespace, output: Path) -> UploadResult:
    repo_id, branch = check_push(args.push_to_hub, args.hf_token)
    return push_to_hub(output, repo_id, private=args.private, token=args.hf_token, revision=branch)


def _choose_base(args: argparse.Namespace, adapters: list[tuple[str, float]], err: TextIO) -> tuple[int, str | None]:
    """The `base    :` header line; without --base, the base the adapters name is taken (and said where from),
    and set on `args`. Returns (exit code, line), the line None when no base can be taken."""
    if args.base is not None:
        return 0, f"base    : {args.base}"
    code, named = _guarded(
        lambda: default_base([ref for ref, _ in adapters], args.hf_token, args.adapter_name, args.adapter_revision),
        args.debug,
        err,
    )
    if named is None:
        return code, None
    args.base = named.ref
    return 0, f"base    : {named.ref}  (base_model_name_or_path in {named.source})"


def _adapter_lines(log: StageLog, adapters: list[tuple[str, float]], combine: str, subtract: bool) -> None:
    weighted = len(adapters) > 1 or adapters[0][1] != 1.0
    for ref, weight in adapters:
        log.line(f"adapter : {ref}" + (f"  (weight {weight:g})" if weighted else ""))
    if len(adapters) > 1:
        log.line(f"combine : {combine}")
    if subtract:
        log.line("subtract: the adapters' deltas are taken out of the base")


def _verify_main(argv: list[str], out: TextIO, err: TextIO) -> int:
    """`qlora-merge verify`: exit 0 when the merged checkpoint is base + adapter, 3 when it is not."""
    parser = ArgumentParser(
        prog="qlora-merge verify",
        description="Prove a merge took: derive every tensor of the merged checkpoint again from base and adapter "
        "(streaming, flat memory) and compare them byte for byte; no LoRA key may remain.",
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
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    args = parser.parse_args(argv)
    _configure_logging(args.debug, err)
    adapters = adapter_refs(args.adapter)
    log = StageLog(out, err, args.loader, several=len(adapters) > 1, subtract=args.subtract)
    if args.logits and (len(adapters) > 1 or adapters[0][1] != 1.0 or args.subtract):
        parser.error("--logits compares against PEFT's base + one adapter at weight 1, not a combination")
    code, base_line = _choose_base(args, adapters, err)
    if base_line is None:
        return code
    if not args.json:
        log.line(base_line)
        _adapter_lines(log, adapters, args.combine, args.subtract)
        log.line(f"merged  : {args.merged}")
    json_out = out if args.json else None
    code = _verify_and_report(args, adapters, args.merged, log, err, json_out=None if args.logits else json_out)
    if code == EXIT_BAD_INPUT or not args.logits:
        return code
    tensors_code = code
    code, logits = _guarded(
        lambda: compare_logits(
            with_revision(args.base, args.revision),
            with_revision(adapters[0][0], args.adapter_revision, "--adapter-revision"),
            args.merged,
            tolerance=args.logits_tolerance,
            hf_token=args.hf_token,
            adapter_name=args.adapter_name,
        ),
        args.debug,
        err,
    )
    if logits is None:
        return code
    if json_out is not None:
        print(json.dumps({"tensors_ok": tensors_code == 0, "logits": logits.to_dict()}, indent=2), file=json_out)
    else:
        mark = log.mark("done" if logits.ok else "fail")
        log.line(
            f"{mark} Logits: max difference {logits.max_abs_diff:.3g} over {logits.tokens} tokens: {logits.reason}"
        )
    if not logits.ok:
        print(f"qlora-merge: logits check failed: {logits.reason}", file=err)
        return EXIT_NOT_VERIFIED
    return tensors_code


def _inspect_main(argv: list[str], out: TextIO, err: TextIO) -> int:
    """`qlora-merge inspect`: describe an adapter; with --base, exit 2 unless it fits that base."""
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
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    args = parser.parse_args(argv)
    _configure_logging(args.debug, err)
    code, report = _guarded(
        lambda: inspect_adapter(args.adapter, args.base, loader=args.loader, hf_token=args.hf_token), args.debug, err
    )
    if report is None:
        return code
    if args.json:
        print(json.dumps(report.to_dict(), indent=2), file=out)
    else:
        for line in _describe(report):
            print(line, file=out)
    if report.base_matches is False:
        print(f"qlora-merge: error: {args.adapter} does not fit {args.base}: {report.mismatches[0]}", file=err)
        return EXIT_BAD_INPUT
    return 0


def _describe(report: AdapterReport) -> list[str]:
    layers = f", layers {report.layers[0]}-{report.layers[1]}" if report.layers else ""
    lines = [
        f"adapter    : {report.adapter}",
        f"trained on : {report.base_model_name_or_path or 'unknown (no base_model_name_or_path)'}",
        f"rank       : r={report.r}, alpha={report.lora_alpha:g}, scaling={report.scaling:g}",
        f"variants   : {', '.join(report.variants) or 'none (plain LoRA)'}",
        f"modules    : {report.lora_modules} LoRA modules ({', '.join(report.module_kinds) or '-'}){layers}",
        f"parameters : {report.parameters:,}",
    ]
    scalings: dict[float, int] = {}
    for value in report.module_scaling.values():
        scalings[value] = scalings.get(value, 0) + 1
    lines += [
        f"             scaling={value:g} on {count} module(s) (rank/alpha pattern)" for value, count in scalings.items()
    ]
    if report.modules_to_save:
        lines.append(f"replaces   : {', '.join(report.modules_to_save)} (modules_to_save)")
    for module, count in report.trainable_tokens.items():
        lines.append(f"tokens     : {count} trained token rows of {module or 'the input embedding'}")
    if report.base is not None:
        verdict = "matches: every adapter tensor fits a base tensor" if report.base_matches else "does NOT match"
        lines.append(f"base       : {report.base}: {verdict}")
        lines += [f"  - {mismatch}" for mismatch in report.mismatches]
    return lines


def _verify_and_report(
    args: argparse.Namespace,
    adapters: list[tuple[str, float]],
    merged: str | Path,
    log: StageLog,
    err: TextIO,
    json_out: TextIO | None,
    completed: Path | None = None,
) -> int:
    """verify() with the flags the merge and `verify` share; the verdict goes to the log (or the report as JSON to
    `json_out`), a failure to stderr as one line. Returns the exit code. `completed`: the merge that just wrote
    `merged` (--verify), so that a Ctrl-C says the output is complete."""
    code, report = _guarded(
        lambda: verify(
            args.base,
            adapters,
            merged,
            loader=args.loader,
            hf_token=args.hf_token,
            adapter_name=args.adapter_name,
            allow_unused=args.allow_unused,
            combine=args.combine,
            subtract=args.subtract,
            revision=args.revision,
            adapter_revision=args.adapter_revision,
        ),
        args.debug,
        err,
        completed,
    )
    if report is None:
        return code
    if json_out is not None:
        print(json.dumps(report.to_dict(), indent=2), file=json_out)
    elif not args.json:
        log.line(_verdict(report, log))
    if not report.ok:
        print(f"qlora-merge: verification failed: {_failures(report)}", file=err)
        return EXIT_NOT_VERIFIED
    return 0


def _verdict(report: VerifyReport, log: StageLog) -> str:
    if report.ok:
        return (
            f"{log.mark('done')} Verified: {report.tensors_checked} tensors byte-identical to base + adapter "
            f"({report.tensors_merged} merged), no LoRA keys left"
        )
    return f"{log.mark('fail')} Not verified: {_failures(report)}"


def _failures(report: VerifyReport) -> str:
    """One line: what differs, with the first few names and why."""
    parts = []
    for label, names in (
        ("differ", report.mismatched),
        ("missing", report.missing),
        ("unexpected", report.unexpected),
        ("LoRA keys left", report.lora_keys),
    ):
        if names:
            shown = ", ".join(f"{n} ({report.details[n]})" if n in report.details else n for n in names[:2])
            parts.append(f"{len(names)} {label}: {shown}{' …' if len(names) > 2 else ''}")
    return "; ".join(parts)


def _guarded(call: Callable[[], T], debug: bool, err: TextIO, completed: Path | None = None) -> tuple[int, T | None]:
    """Run the library call; a MergeError is one line and exit 2, anything else an internal error (exit 1). A Ctrl-C
    is one line and 128 + the signal; `completed` is the output already written (--verify and --push-to-hub run
    after the merge), which that line names instead of saying nothing was written."""
    try:
        return 0, call()
    except MergeError as exc:
        print(f"qlora-merge: error: {exc}", file=err)
        return EXIT_BAD_INPUT, None
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM under run_console: the call has cleaned up after itself
        from .interrupts import Interrupted, exit_code, interrupted_line

        if completed is not None and getattr(exc, "output", None) is None:
            exc = Interrupted(int(getattr(exc, "signum", signal.SIGINT)), output=completed)
        print(interrupted_line(exc), file=err)
        return exit_code(exc), None
    except Exception as exc:
        if debug:
            traceback.print_exc(file=err)
        print(f"qlora-merge: internal error: {type(exc).__name__}: {exc} (re-run with --debug)", file=err)
        return EXIT_INTERNAL, None


def _configure_logging(debug: bool, err: TextIO) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="qlora-merge: %(levelname)s: %(message)s",
        stream=err,
    )
