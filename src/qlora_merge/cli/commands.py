"""The commands: a merge (from flags or an axolotl --config; then --verify and --push-to-hub), `verify` and
`inspect`. Each parses its flags, calls the public API and prints what it returns."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from ..inputs.prefetch import prefetch_base
from ..options import MergeOptions
from ..progress import ignore_progress
from .display import StageLog, describe, peak_rss_gb
from .guard import EXIT_BAD_INPUT, EXIT_NOT_VERIFIED, configure_logging, guarded
from .parser import (
    SUBCOMMANDS,
    adapter_refs,
    build_parser,
    check_merge_flags,
    config_overrides,
    gguf_lora_parser,
    gguf_parser,
    inspect_parser,
    merge_settings,
    setup_gguf_parser,
    verify_parser,
)

if TYPE_CHECKING:
    from ..api import MergeResult
    from ..outputs.upload import UploadResult
    from ..verification.tensors import VerifyReport

Adapters = list[tuple[str, float]]


def main(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["help"]:  # `qlora-merge help [verify|inspect]`, as git and pip take it
        argv = [*argv[1:2], "--help"] if argv[1:2] and argv[1] in SUBCOMMANDS else ["--help"]
    if argv[:1] == ["verify"]:
        return verify_command(argv[1:], out, err)
    if argv[:1] == ["inspect"]:
        return inspect_command(argv[1:], out, err)
    if argv[:1] == ["gguf"]:
        return gguf_command(argv[1:], out, err)
    if argv[:1] == ["gguf-lora"]:
        return gguf_lora_command(argv[1:], out, err)
    if argv[:1] == ["setup-gguf"]:
        return setup_gguf_command(argv[1:], out, err)
    return merge_command(argv, out, err)


def merge_command(argv: list[str], out: TextIO, err: TextIO) -> int:
    """`qlora-merge [--config C] ...`: merge(), then --verify and --push-to-hub; the stage log, or --json last."""
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.debug, err)
    check_merge_flags(parser, args)
    # The merge's modules, torch among them, load once the flags are known good: --help and a bad flag answer
    # without them (about a second). Meanwhile the disk starts on a local base (a cold one waits on it).
    if not args.dry_run and args.config is None:
        prefetch_base(args.base)
    from ..api import merge
    from ..axolotl import read_axolotl_config
    from ..outputs.upload import check_push

    config = None
    if args.config is not None:
        code, config = guarded(lambda: read_axolotl_config(args.config, **config_overrides(args)), args.debug, err)
        if config is None:
            return code
        args.base, args.adapter, args.output = config.base, [config.adapter], str(config.output)
    settings = merge_settings(args, config)
    adapters = adapter_refs(args.adapter)
    log = StageLog(out, err, args.loader, several=len(adapters) > 1, subtract=args.subtract)
    target = None
    if args.push_to_hub is not None:  # a push that cannot happen is said before the merge, not after it
        code, target = guarded(lambda: check_push(args.push_to_hub, settings.get("hf_token")), args.debug, err)
        if target is None:
            return code
    dtype = settings.get("dtype") or MergeOptions().dtype
    code = _header(args, adapters, log, err, f"output  : {args.output}", f"dtype   : {dtype}")
    if code:
        return code

    def run() -> tuple[MergeOptions, MergeResult]:
        options = MergeOptions(**settings)  # checked here: a bad --max-shard-size fails as the merge, after the header
        return options, merge(args.base, adapters, args.output, options, progress=ignore_progress if args.json else log)

    code, done = guarded(run, args.debug, err)
    if done is None:
        return code
    options, result = done
    report: dict[str, object] = result.to_dict() | {"peak_rss_gb": round(peak_rss_gb(), 3)}
    if not args.json:  # --json prints last, with the verification's and the upload's outcome
        log.merged(result)
    code = 0 if result.dry_run else _after_merge(args, adapters, options, target, result.output, report, log, err)
    if args.json:
        print(json.dumps(report, indent=2), file=out)
    elif code == 0 and not result.dry_run:
        log.line(f"{log.mark('done')} Done. Merged model: {result.output}")
    return code


def _after_merge(
    args: argparse.Namespace,
    adapters: Adapters,
    options: MergeOptions,
    target: tuple[str, str | None] | None,
    output: Path,
    report: dict[str, object],
    log: StageLog,
    err: TextIO,
) -> int:
    """--verify, then --push-to-hub (repo id and branch in `target`): only a verified merge is uploaded, as
    publishing.push_verified has it. Their outcome goes into `report`."""
    from ..outputs.upload import push_to_hub
    from ..publishing import NotVerified, push_verified

    if target is None:
        if not args.verify:
            return 0
        code = _verify_and_report(args, adapters, options, output, log, err, json_out=None, completed=output)
        report["verified"] = code == 0
        return code
    repo_id, branch = target
    verdicts: list[int] = []  # the verification's exit code, once it has one

    def shown(found: VerifyReport) -> None:
        verdicts.append(_show_verdict(found, args.json, log, err, json_out=None))

    def upload() -> UploadResult | None:
        if not args.verify:
            return push_to_hub(output, repo_id, private=args.private, token=options.hf_token, revision=branch)
        try:
            published = push_verified(
                args.base, adapters, output, repo_id, options, private=args.private, revision=branch, on_verified=shown
            )
        except NotVerified as exc:
            shown(exc.report)
            return None
        return published.upload

    code, uploaded = guarded(upload, args.debug, err, output)
    if args.verify:
        report["verified"] = verdicts == [0]
        if verdicts != [0]:  # not base + adapter (exit 3), or the verification itself failed: nothing was pushed
            return verdicts[0] if verdicts else code
    if uploaded is None:
        if code < 128:  # an interrupt has said so in its own line
            print(f"qlora-merge: the merged model is complete at {output}; only the upload failed", file=err)
        return code
    report["upload"] = uploaded.to_dict()
    if not args.json:
        log.line(f"{log.mark('done')} Uploaded {uploaded.files} files to {uploaded.url}")
    return 0


def _header(args: argparse.Namespace, adapters: Adapters, log: StageLog, err: TextIO, *lines: str) -> int:
    """The header, unless --json: the base, the adapters, then `lines`. Without --base, the base the adapters name
    is taken (and said where from), and set on `args`. Returns 0, or the exit code when no base can be taken."""
    from ..inputs.base_choice import default_base

    base_line = f"base    : {args.base}"
    if args.base is None:
        code, named = guarded(
            lambda: default_base([ref for ref, _ in adapters], args.hf_token, args.adapter_name, args.adapter_revision),
            args.debug,
            err,
        )
        if named is None:
            return code
        args.base = named.ref
        base_line = f"base    : {named.ref}  (base_model_name_or_path in {named.source})"
    if not args.json:
        log.line(base_line)
        log.adapters(adapters, args.combine, args.subtract)
        for line in lines:
            log.line(line)
    return 0


def verify_command(argv: list[str], out: TextIO, err: TextIO) -> int:
    """`qlora-merge verify`: exit 0 when the merged checkpoint is base + adapter, 3 when it is not."""
    if any(a == "--gguf" or a.startswith("--gguf=") for a in argv):
        return _verify_gguf_command(argv, out, err)
    parser = verify_parser()
    args = parser.parse_args(argv)
    configure_logging(args.debug, err)
    adapters = adapter_refs(args.adapter)
    log = StageLog(out, err, args.loader, several=len(adapters) > 1, subtract=args.subtract)
    if args.logits and (len(adapters) > 1 or adapters[0][1] != 1.0 or args.subtract):
        parser.error("--logits compares against PEFT's base + one adapter at weight 1, not a combination")
    code = _header(args, adapters, log, err, f"merged  : {args.merged}")
    if code:
        return code
    json_out = out if args.json else None
    options = MergeOptions(**merge_settings(args))
    code = _verify_and_report(args, adapters, options, args.merged, log, err, None if args.logits else json_out)
    if code == EXIT_BAD_INPUT or not args.logits:
        return code
    return _compare_logits(args, adapters[0][0], options, code, log, err, json_out)


def _verify_gguf_command(argv: list[str], out: TextIO, err: TextIO) -> int:
    """`qlora-merge verify --gguf FILE`: llama.cpp's logits against transformers' (--merged) or PEFT's."""
    from ..errors import MergeError
    from ..verification.gguf import verify_gguf
    from .parser import verify_gguf_parser

    args = verify_gguf_parser().parse_args(argv)
    try:
        report = verify_gguf(args.gguf, merged=args.merged, base=args.base, adapter=args.adapter)
    except MergeError as error:
        print(f"qlora-merge: {error}", file=err)
        return EXIT_BAD_INPUT
    print(report.line(), file=out)
    return 0 if report.ok else EXIT_NOT_VERIFIED


def _compare_logits(
    args: argparse.Namespace,
    adapter: str,
    options: MergeOptions,
    tensors_code: int,
    log: StageLog,
    err: TextIO,
    json_out: TextIO | None,
) -> int:
    """`verify --logits`, after the tensors' verdict (`tensors_code`): the merged model's logits against PEFT's."""
    from ..inputs.resolve import with_revision
    from ..verification.logits import compare_logits

    base = with_revision(args.base, options.revision)
    pinned = with_revision(adapter, options.adapter_revision, "--adapter-revision")
    code, logits = guarded(
        lambda: compare_logits(
            base,
            pinned,
            args.merged,
            tolerance=args.logits_tolerance,
            hf_token=options.hf_token,
            adapter_name=options.adapter_name,
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


def inspect_command(argv: list[str], out: TextIO, err: TextIO) -> int:
    """`qlora-merge inspect`: describe an adapter; with --base, exit 2 unless it fits that base."""
    args = inspect_parser().parse_args(argv)
    if args.quant_error is not None and args.base is None:
        inspect_parser().error("--quant-error needs --base (the full-precision base to measure)")
    configure_logging(args.debug, err)
    from ..inspection import inspect_adapter

    code, report = guarded(
        lambda: inspect_adapter(
            args.adapter, args.base, loader=args.loader, hf_token=args.hf_token, quant_error=args.quant_error
        ),
        args.debug,
        err,
    )
    if report is None:
        return code
    if args.json:
        print(json.dumps(report.to_dict(), indent=2), file=out)
    else:
        for line in describe(report):
            print(line, file=out)
    if report.base_matches is False:
        print(f"qlora-merge: error: {args.adapter} does not fit {args.base}: {report.mismatches[0]}", file=err)
        return EXIT_BAD_INPUT
    return 0


def gguf_command(argv: list[str], out: TextIO, err: TextIO) -> int:
    """`qlora-merge gguf MERGED --types T`: convert an existing merge with llama.cpp's converter and quantizer."""
    args = gguf_parser().parse_args(argv)
    configure_logging(args.debug, err)
    from ..gguf import convert

    code, files = guarded(
        lambda: convert(
            args.merged,
            args.types,
            args.output,
            name=args.name,
            converter=args.llama_cpp,
            overwrite=args.overwrite,
            allow_f16_overflow=args.allow_nonfinite,
            threads=args.threads,
        ),
        args.debug,
        err,
    )
    if files is None:
        return code
    if args.json:
        written = [{"type": f.gguf_type, "path": str(f.path), "bytes": f.bytes, "seconds": f.seconds} for f in files]
        print(json.dumps(written, indent=2), file=out)
    else:
        for f in files:
            print(f"{f.path}  ({f.gguf_type}, {f.bytes / 1e6:.1f} MB, {f.seconds:.0f}s)", file=out)
    return 0


def gguf_lora_command(argv: list[str], out: TextIO, err: TextIO) -> int:
    """`qlora-merge gguf-lora --adapter A --output F`: the adapter as a GGUF LoRA for llama.cpp's --lora."""
    args = gguf_lora_parser().parse_args(argv)
    configure_logging(args.debug, err)
    from ..gguf import export_lora

    code, written = guarded(
        lambda: export_lora(
            args.adapter,
            args.output,
            args.base,
            gguf_type=args.type,
            converter=args.llama_cpp,
            overwrite=args.overwrite,
        ),
        args.debug,
        err,
    )
    if written is None:
        return code
    print(
        f"{written.path}  (LoRA, {written.gguf_type}, {written.bytes / 1e6:.1f} MB, {written.seconds:.0f}s)", file=out
    )
    return 0


def setup_gguf_command(argv: list[str], out: TextIO, err: TextIO) -> int:
    """`qlora-merge setup-gguf`: llama.cpp's converter from the pinned llama-cpp-python sdist, into the cache."""
    args = setup_gguf_parser().parse_args(argv)
    configure_logging(args.debug, err)
    from ..gguf import setup_converter

    code, found = guarded(lambda: setup_converter(args.sdist, force=args.force), args.debug, err)
    if found is None:
        return code
    print(f"llama.cpp's converter (llama-cpp-python {found.version}) in {found.root}", file=out)
    return 0


def _verify_and_report(
    args: argparse.Namespace,
    adapters: Adapters,
    options: MergeOptions,
    merged: str | Path,
    log: StageLog,
    err: TextIO,
    json_out: TextIO | None,
    completed: Path | None = None,
) -> int:
    """verify() with the options of the merge (or of `verify`'s flags); its verdict shown as `_show_verdict` shows
    it. Returns the exit code. `completed`: the merge that just wrote `merged` (--verify), so that a Ctrl-C says
    the output is complete."""
    from ..api import verify

    code, report = guarded(lambda: verify(args.base, adapters, merged, options), args.debug, err, completed)
    if report is None:
        return code
    return _show_verdict(report, args.json, log, err, json_out)


def _show_verdict(report: VerifyReport, as_json: bool, log: StageLog, err: TextIO, json_out: TextIO | None) -> int:
    """The verdict goes to the log (or the report as JSON to `json_out`; nothing with --json otherwise), a failure
    to stderr as one line. Returns the exit code: 0, or 3 when the merge is not base + adapter."""
    from ..publishing import failure_summary

    if json_out is not None:
        print(json.dumps(report.to_dict(), indent=2), file=json_out)
    elif not as_json:
        log.verdict(report)
    if not report.ok:
        print(f"qlora-merge: verification failed: {failure_summary(report)}", file=err)
        return EXIT_NOT_VERIFIED
    return 0
