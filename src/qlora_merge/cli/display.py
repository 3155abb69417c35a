"""What the command line shows: the stage log on stdout, the progress bar on stderr, a dry run's plan, a
verification's verdict and an adapter's description."""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import TYPE_CHECKING, TextIO

from ..progress import ProgressEvent, human_bytes

if TYPE_CHECKING:  # the merge's modules (and torch) load when a command runs, not for --help or a bad flag
    from ..api import MergeResult
    from ..inspection import AdapterReport
    from ..quant_error import QuantErrorReport
    from ..verification.tensors import VerifyReport

STAGE_TEXT = {
    "base": ("Loading base model (streaming: headers only, no model class)", "Base model indexed"),
    "tokenizer": ("Loading tokenizer", "Tokenizer files found"),
    "adapter": ("Loading LoRA adapter", "Adapter loaded"),
    "merge": ("Merging adapter into base weights", "Merged"),
    "save": ("Saving merged model to '{detail}'", "Saved"),
    "gguf": ("Converting to GGUF with llama.cpp ({detail})", "GGUF written"),
}
# The same stages with several adapters, or with the adapters' deltas taken out.
SEVERAL_TEXT = {
    "adapter": ("Loading LoRA adapters", "Adapters loaded"),
    "merge": ("Merging adapters into base weights", "Merged"),
}
SUBTRACT_TEXT = {"merge": ("Subtracting the adapters' deltas from the base weights", "Subtracted")}


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
            timing = f"  ({event.elapsed:.0f}s)" if event.stage in ("base", "merge", "save", "gguf") else ""
            self.line(f"{self.mark('done')} {finished}{detail}{timing}")

    def adapters(self, adapters: list[tuple[str, float]], combine: str, subtract: bool) -> None:
        """The `adapter :` header lines, with each weight when any is not 1, and how they combine."""
        weighted = len(adapters) > 1 or adapters[0][1] != 1.0
        for ref, weight in adapters:
            self.line(f"adapter : {ref}" + (f"  (weight {weight:g})" if weighted else ""))
        if len(adapters) > 1:
            self.line(f"combine : {combine}")
        if subtract:
            self.line("subtract: the adapters' deltas are taken out of the base")

    def verdict(self, report: VerifyReport) -> None:
        if report.ok:
            self.line(
                f"{self.mark('done')} Verified: {report.tensors_checked} tensors byte-identical to base + adapter "
                f"({report.tensors_merged} merged), no LoRA keys left"
            )
        else:
            from ..publishing import failure_summary

            self.line(f"{self.mark('fail')} Not verified: {failure_summary(report)}")

    def merged(self, result: MergeResult) -> None:
        """After the merge: a dry run's plan, or what was written."""
        if result.dry_run:
            _print_coverage(result, self)
            return
        self.line(
            f"   {result.tensors_merged} tensors merged, {result.tensors_copied + result.tensors_converted} copied, "
            f"{human_bytes(result.bytes_written)} in {len(result.shards)} shard(s), peak RSS {peak_rss_gb():.2f} GB"
        )
        if result.checksums:
            self.line(f"   SHA-256 of {len(result.checksums)} shard(s) in {result.output / 'README.md'}")
        for path in result.gguf:
            self.line(f"   GGUF: {path}")


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


def peak_rss_gb() -> float:
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


def describe(report: AdapterReport) -> list[str]:
    """`inspect`'s lines: the adapter, and with --base, whether it fits."""
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
    if report.quant_error is not None:
        lines += _quant_error_lines(report.quant_error)
    return lines


def _quant_error_lines(report: QuantErrorReport) -> list[str]:
    """The 4-bit round trip's error over the adapter's delta: overall, and the layers where it is least and most."""
    if not report.weights:
        return [f"{report.quant_type} error: no plain LoRA weight to measure"]
    layers = sorted(report.by_layer().items(), key=lambda item: item[1])
    name = {None: "outside layers"}
    low, high = layers[0], layers[-1]
    return [
        f"{report.quant_type} error: ||W - {report.quant_type}(W)|| / ||delta W|| = {report.overall:.3g} over "
        f"{len(report.weights)} weights; per layer {low[1]:.3g} (layer {name.get(low[0], low[0])}) to "
        f"{high[1]:.3g} (layer {name.get(high[0], high[0])})",
        "             near or above 1, the round trip moves the weights as much as the adapter does: the base "
        "a merge uses matters (--base-quant)",
    ]
