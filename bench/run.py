"""Benchmark runner: per model size, generate inputs, run every tool on the same warm files, spot-check, report.

For each size: ensure the generated checkpoint (``generate.py``), then run the floors (``cp``, direct-I/O
write and read), our merge, PEFT's merge and optionally axolotl's, one after another, each as a child
measured by ``measure.run_child``. Each merge's output is reduced to a few spot-check tensors and deleted
before the next tool runs, so at most one output is on disk. Prints a table per size and writes all
results to ``bench/results/<timestamp>.json``.

The runner imports no torch, and neither do the modules it imports: on Linux a child's peak RSS starts
at the parent's high-water mark, so a small runner keeps every child's number honest.

Usage: python bench/run.py [--sizes 1b,3b] [--workdir /tmp/qlora-bench] [--repeats 1] [--axolotl-python PY]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from measure import own_peak_rss_bytes, run_child
from specs import SPECS, spot_check_names
from tools import BENCH_DIR, OURS, PEFT, Case, Tool, all_tools, child_env

GB = 1e9
# Warm reads reuse one small buffer: whatever the runner holds becomes every later child's RSS floor.
WARM_CHUNK_BYTES = 1 << 20
INDEX_NAME = "model.safetensors.index.json"
RESULTS_DIR = BENCH_DIR / "results"


@dataclass(frozen=True)
class Run:
    """One measured child: its numbers, or the line that says why it failed."""

    name: str
    argv: list[str]
    ok: bool
    wall_s: float
    peak_rss_bytes: int
    rss_floor_bytes: int
    error: str
    log_stem: str


def run_measured(name: str, argv: Sequence[str], log_stem: Path, env: Mapping[str, str]) -> Run:
    """Run a child to completion; a child that fails or cannot start is recorded, never raised."""
    try:
        child = run_child(argv, log_stem, env)
    except OSError as exc:
        return Run(name, list(argv), False, 0.0, 0, own_peak_rss_bytes(), f"cannot start: {exc}", str(log_stem))
    error = "" if child.ok else child.error_line()
    numbers = (child.wall_s, child.peak_rss_bytes, child.rss_floor_bytes)
    return Run(name, child.argv, child.ok, *numbers, error, str(log_stem))


def stdout_json(run: Run) -> dict:
    """The JSON summary a helper child (spot_check.py) prints as its last stdout line."""
    lines = Path(run.log_stem).with_suffix(".out").read_text().strip().splitlines()
    return json.loads(lines[-1])


def load_case(size: str, workdir: Path) -> Case:
    """The generated files of ``size``; mirrors generate.checkpoint_paths, which cannot be imported (torch)."""
    root = workdir / "models" / size
    base, adapter = root / "base", root / "adapter"
    index = json.loads((base / INDEX_NAME).read_text())
    shards = tuple(base / name for name in sorted(set(index["weight_map"].values())))
    return Case(size=size, base=base, adapter=adapter, shards=shards)


def warm(files: Sequence[Path]) -> float:
    """Read ``files`` once so they sit in the page cache; return the seconds it took."""
    buffer = bytearray(WARM_CHUNK_BYTES)
    started = time.perf_counter()
    for path in files:
        with path.open("rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    return time.perf_counter() - started


def mem_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 when unknown)."""
    try:
        for row in Path("/proc/meminfo").read_text().splitlines():
            if row.startswith("MemAvailable:"):
                return int(row.split()[1]) * 1024
    except OSError:
        pass
    return 0


def clear_output(out: Path) -> None:
    """Delete a tool's output and flush dirty pages, so its writeback is not billed to the next tool."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()


def snapshot(source: Path, dest: Path, names: list[str], logs: Path) -> str:
    """Copy the spot-check tensors of ``source`` into ``dest``; return an error text, empty when complete."""
    argv = [sys.executable, str(BENCH_DIR / "spot_check.py"), "snapshot", str(source), str(dest), *names]
    run = run_measured("snapshot", argv, logs / f"snapshot-{dest.stem}", child_env({}))
    if not run.ok:
        return run.error
    missing = stdout_json(run)["missing"]
    return f"missing in output: {', '.join(missing)}" if missing else ""


def best(runs: list[Run]) -> Run | None:
    """Fastest successful run, if any."""
    return min((run for run in runs if run.ok), key=lambda run: run.wall_s, default=None)


def run_tools(
    case: Case, tools: list[Tool], args: argparse.Namespace, logs: Path
) -> tuple[dict[str, list[Run]], dict[str, str]]:
    """Run every tool ``repeats`` times in rounds; return runs per tool and snapshot errors/paths per merge tool."""
    out_root, snap_dir = args.workdir / "out" / case.size, args.workdir / "snapshots" / case.size
    names = spot_check_names(SPECS[case.size])
    runs: dict[str, list[Run]] = {tool.name: [] for tool in tools}
    snapshots: dict[str, str] = {}
    for repeat in range(args.repeats):
        for tool in tools:
            out = out_root / tool.name
            clear_output(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            if tool.precreate_output:
                out.mkdir()
            # Re-warm before every tool (a no-op read when still cached): a previous tool may have evicted input.
            warm(case.input_files)
            env = child_env(tool.env)
            run = run_measured(tool.name, tool.command(case, out), logs / f"{tool.name}-{repeat}", env)
            runs[tool.name].append(run)
            status = f"{run.wall_s:.2f} s, peak RSS {run.peak_rss_bytes / GB:.2f} GB" if run.ok else run.error
            print(f"[{case.size}] {tool.name:<13} {status}", flush=True)
            if run.ok and tool.is_merge and tool.name not in snapshots:
                dest = snap_dir / f"{tool.name}.safetensors"
                error = snapshot(out / tool.merged_subdir, dest, names, logs)
                snapshots[tool.name] = f"snapshot failed: {error}" if error else str(dest)
            clear_output(out)
    failed = {tool.name: "merge failed" for tool in tools if tool.is_merge and tool.name not in snapshots}
    return runs, snapshots | failed


def spot_check(case: Case, snapshots: dict[str, str], logs: Path, workdir: Path) -> dict:
    """Compare each merge's snapshot with PEFT's, tensor by tensor; verdicts keyed by tool, or an error."""
    snap_dir = workdir / "snapshots" / case.size
    reference = snapshots.get(PEFT, "")
    if not reference.endswith(".safetensors"):
        return {"error": f"no PEFT reference ({reference})"}
    candidates = [path for name, path in snapshots.items() if name != PEFT and path.endswith(".safetensors")]
    if not candidates:
        return {name: {"error": text} for name, text in snapshots.items() if name != PEFT}
    base_snapshot = snap_dir / "base.safetensors"
    error = snapshot(case.base, base_snapshot, spot_check_names(SPECS[case.size]), logs)
    if error:
        return {"error": f"base snapshot: {error}"}
    argv = [sys.executable, str(BENCH_DIR / "spot_check.py"), "compare", "--base", str(base_snapshot)]
    run = run_measured("compare", [*argv, "--reference", reference, *candidates], logs / "compare", child_env({}))
    if not run.ok:
        return {"error": f"compare failed: {run.error}"}
    # Candidates are keyed by file stem, which is the tool name; merges that left no snapshot keep their error.
    failed = {name: {"error": text} for name, text in snapshots.items() if name != PEFT and text not in candidates}
    return failed | stdout_json(run)


def ratio(numerator: Run | None, denominator: Run | None) -> str:
    """``numerator.wall / denominator.wall`` as ``1.23x``, or ``-`` when either is missing."""
    if numerator is None or denominator is None or denominator.wall_s <= 0:
        return "-"
    return f"{numerator.wall_s / denominator.wall_s:.2f}x"


def print_table(case: Case, tools: list[Tool], runs: dict[str, list[Run]]) -> None:
    """One row per tool: best wall, its peak RSS, throughput, PEFT wall / wall, wall / cp wall."""
    peft, cp = best(runs.get(PEFT, [])), best(runs.get("cp", []))
    header = ("tool", "wall s", "peak RSS GB", "GB/s", "PEFT/tool", "tool/cp", "note")
    rows: list[tuple[str, ...]] = [header]
    for tool in tools:
        tool_runs = runs[tool.name]
        fastest = best(tool_runs)
        if fastest is None:
            rows.append((tool.name, "-", "-", "-", "-", "-", f"FAILED: {tool_runs[-1].error}"))
            continue
        note = "all: " + ", ".join(f"{run.wall_s:.2f}" if run.ok else "failed" for run in tool_runs)
        rows.append(
            (
                tool.name,
                f"{fastest.wall_s:.2f}",
                f"{fastest.peak_rss_bytes / GB:.2f}",
                f"{case.shard_bytes / GB / fastest.wall_s:.2f}",
                ratio(peft, fastest),
                ratio(fastest, cp),
                note if len(tool_runs) > 1 else "",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header) - 1)]
    for row in rows:
        numbers = [cell.rjust(width) for cell, width in zip(row[1:-1], widths[1:], strict=True)]
        print("  ".join([row[0].ljust(widths[0]), *numbers, row[-1]]).rstrip())


def print_spot_check(verdicts: dict) -> None:
    """Per tensor equal / not equal for each merge tool, then one bit-identity line for ours."""
    if "error" in verdicts:
        print(f"spot check: not run: {verdicts['error']}")
        return
    for tool, tensors in verdicts.items():
        if "error" in tensors:
            print(f"spot check {tool}: not run: {tensors['error']}")
            continue
        for name, verdict in tensors.items():
            state = "equal" if verdict["equal"] else "NOT equal"
            details = [key for key in ("mismatch", "missing") if key in verdict]
            if "max_abs_diff" in verdict:
                details.append(f"max |diff| {verdict['max_abs_diff']:.3g}, {verdict['differing_fraction']:.2%} differ")
            if "changed_vs_base" in verdict:
                details.append("changed vs base" if verdict["changed_vs_base"] else "unchanged vs base")
            print(f"  {tool} vs {PEFT}: {name}: {state} ({'; '.join(details)})")
    ours = verdicts.get(OURS, {})
    if "error" in ours or not ours:
        print(f"{OURS} vs {PEFT}: no verdict ({ours.get('error') or verdicts.get('error') or 'not compared'})")
    elif all(verdict["equal"] for verdict in ours.values()):
        print(f"{OURS} is bit-identical to {PEFT} on all {len(ours)} spot-checked tensors")
    else:
        differing = sum(not verdict["equal"] for verdict in ours.values())
        print(f"{OURS} is NOT bit-identical to {PEFT}: {differing} of {len(ours)} spot-checked tensors differ")


def bench_size(size: str, args: argparse.Namespace) -> dict:
    """Everything for one size: generation, warm-up, tool runs, spot check, table; returns the record."""
    spec = SPECS[size]
    logs = args.workdir / "logs" / size
    record: dict = {"size": size, "label": spec.label}
    argv = [sys.executable, str(BENCH_DIR / "generate.py"), "--size", size, "--workdir", str(args.workdir)]
    generated = run_measured("generate", [*argv, "--seed", str(args.seed)], logs / "generate", child_env({}))
    record["generate"] = asdict(generated)
    if not generated.ok:
        print(f"[{size}] generation failed: {generated.error}", flush=True)
        return record
    case = load_case(size, args.workdir)
    # Stale outputs of an interrupted run would eat the disk budget of one output at a time.
    clear_output(args.workdir / "out" / size)
    input_bytes = sum(path.stat().st_size for path in case.input_files)
    available = mem_available_bytes()
    record |= {"shards": [str(path) for path in case.shards], "shard_bytes": case.shard_bytes}
    record |= {"input_bytes": input_bytes, "mem_available_bytes": available}
    record["warm_s"] = warm(case.input_files)
    print(
        f"[{size}] input (shards + adapter) {input_bytes / GB:.2f} GB read once in {record['warm_s']:.1f} s to warm "
        "the page cache; re-read before every tool so each one starts on warm input",
        flush=True,
    )
    if available and input_bytes > available // 2:
        print(f"[{size}] warning: input is over half of available RAM; tools may evict it mid-run", flush=True)
    tools = all_tools(args.axolotl_python, args.workdir / "configs")
    runs, snapshots = run_tools(case, tools, args, logs)
    record["runs"] = {name: [asdict(run) for run in tool_runs] for name, tool_runs in runs.items()}
    record["snapshots"] = snapshots
    record["spot_check"] = spot_check(case, snapshots, logs, args.workdir)
    record["runner_peak_rss_bytes"] = own_peak_rss_bytes()
    shards = f"{case.shard_bytes / GB:.2f} GB in {len(case.shards)} shards"
    print(f"\n== {size} ({spec.label}-shaped, bf16): {shards}, input warm in page cache ==")
    print_table(case, tools, runs)
    print(
        f"runner RSS floor: {record['runner_peak_rss_bytes'] / GB:.3f} GB (no child's peak RSS can read below it); "
        f"best of {args.repeats}"
    )
    print_spot_check(record["spot_check"])
    print(flush=True)
    return record


def size_list(text: str) -> list[str]:
    """Parse ``1b,3b`` into known size names."""
    sizes = [item.strip() for item in text.split(",") if item.strip()]
    unknown = sorted(set(sizes) - set(SPECS))
    if unknown or not sizes:
        raise argparse.ArgumentTypeError(f"unknown sizes {unknown}; choose from {', '.join(SPECS)}")
    return sizes


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=size_list, default=["1b", "3b"], help="comma-separated: 1b,3b,8b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-bench"))
    parser.add_argument("--repeats", type=positive, default=1, help="runs per tool; the table shows the best")
    parser.add_argument("--axolotl-python", type=Path, default=None, help="python of an env with axolotl")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated checkpoints")
    return parser.parse_args()


def machine(workdir: Path) -> dict[str, object]:
    """What the numbers were measured on."""
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "mem_available_bytes": mem_available_bytes(),
        "workdir_free_bytes": shutil.disk_usage(workdir).free,
    }


def main() -> None:
    args = parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results_path = RESULTS_DIR / f"{stamp}.json"
    results: dict = {"started": stamp, "argv": sys.argv, "args": vars(args), "machine": machine(args.workdir)}
    results["sizes"] = []
    for size in args.sizes:
        results["sizes"].append(bench_size(size, args))
        # Rewritten after every size so a later failure or interrupt keeps the finished sizes.
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"results: {results_path}")


if __name__ == "__main__":
    main()
