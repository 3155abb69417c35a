"""Render benchmark results as a PNG: wall time and peak RSS against model size, one line per tool.

Reads one or more JSON files written by ``run.py``; a size measured in several files takes its numbers
from the last file given. Each point is a tool's fastest successful run at that size (with that run's
peak RSS). Floors (``cp``, direct-I/O write, read, and both at once) and our start-up appear in the time panel
only, dashed. Runs on
cold input are labelled "(cold)". The runner calls this as a child process, so matplotlib never enters
the runner's memory.

Usage: python bench/plot.py RESULTS.json... [-o bench/plot.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use(): the backend must be chosen first
from matplotlib.ticker import FuncFormatter, LogLocator
from tools import AXOLOTL, DIRECT_READ, DIRECT_READ_WRITE, DIRECT_WRITE, OURS, PEFT, STARTUP

GB = 1e9
BF16_BYTES = 2
FLOORS = ("cp", DIRECT_WRITE, DIRECT_READ, DIRECT_READ_WRITE, STARTUP)
STYLES: dict[str, dict[str, object]] = {
    OURS: {"color": "#d62728", "linewidth": 2.5, "marker": "o", "zorder": 5},
    PEFT: {"color": "#1f77b4", "linewidth": 1.8, "marker": "s"},
    AXOLOTL: {"color": "#2ca02c", "linewidth": 1.8, "marker": "^"},
    "cp": {"color": "#7f7f7f", "linewidth": 1.2, "marker": ".", "linestyle": "--"},
    DIRECT_WRITE: {"color": "#9467bd", "linewidth": 1.2, "marker": ".", "linestyle": "--"},
    DIRECT_READ: {"color": "#8c564b", "linewidth": 1.2, "marker": ".", "linestyle": ":"},
    DIRECT_READ_WRITE: {"color": "#e377c2", "linewidth": 1.2, "marker": ".", "linestyle": "--"},
    STARTUP: {"color": "#bcbd22", "linewidth": 1.0, "marker": ".", "linestyle": ":"},
}

# Value labels: PEFT's below its points, the others above, so close peers (PEFT, axolotl) stay readable.
LABEL_OFFSETS = {PEFT: (5, -11)}

# (series label, tool) -> {billions of parameters: (wall s, peak RSS bytes)}
Series = dict[tuple[str, str], dict[float, tuple[float, int]]]


def fastest(runs: list[dict]) -> dict | None:
    """The successful run with the least wall time, if any."""
    return min((run for run in runs if run["ok"]), key=lambda run: run["wall_s"], default=None)


def collect(paths: list[Path]) -> tuple[Series, dict[float, str]]:
    """Points per (label, tool) and a tick label per model size, later files overriding earlier ones."""
    series: Series = {}
    ticks: dict[float, str] = {}
    for path in paths:
        results = json.loads(path.read_text())
        cold = bool(results.get("args", {}).get("cold", False))
        for record in results.get("sizes", []):
            # A quantized base (e.g. 1b-nf4) has a third of the bf16 bytes of its shape: its x would be wrong.
            if "runs" not in record or "quantization" in record:
                continue
            params = record["shard_bytes"] / BF16_BYTES / GB
            ticks[params] = f"{record['label']}\n{record['shard_bytes'] / GB:.1f} GB"
            for tool, runs in record["runs"].items():
                best = fastest(runs)
                if best is None:
                    continue
                label = f"{tool} (cold)" if cold else tool
                series.setdefault((label, tool), {})[params] = (best["wall_s"], best["peak_rss_bytes"])
    return series, ticks


def draw(series: Series, ticks: dict[float, str], output: Path) -> None:
    """Two panels (time, peak RSS) on a log scale, saved as a PNG."""
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.8), dpi=100)
    # Ours first, then the other merges, then the floors.
    order = sorted(series.items(), key=lambda item: (item[0][1] in FLOORS, item[0][1] != OURS, item[0][0]))
    for (label, tool), points in order:
        sizes = sorted(points)
        style = dict(STYLES.get(tool, {"marker": "o"}))
        if label.endswith("(cold)"):
            style["linestyle"] = "-."
        walls = [points[size][0] for size in sizes]
        time_axis.plot(sizes, walls, label=label, **style)
        if tool not in FLOORS:
            offset = LABEL_OFFSETS.get(tool, (4, 4))
            memory_axis.plot(sizes, [points[size][1] / GB for size in sizes], label=label, **style)
            for size, wall in zip(sizes, walls, strict=True):
                time_axis.annotate(f"{wall:.1f}", (size, wall), textcoords="offset points", xytext=offset, fontsize=7)
            for size in sizes:
                rss = points[size][1] / GB
                memory_axis.annotate(f"{rss:.2f}", (size, rss), textcoords="offset points", xytext=offset, fontsize=7)
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for axis, title, unit in (
        (time_axis, "Merge + save wall time (lower is better)", "seconds"),
        (memory_axis, "Peak RSS of the merge process", "GB"),
    ):
        axis.set_yscale("log")
        axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.yaxis.set_major_formatter(plain)
        axis.set_xscale("log")
        axis.set_xticks(sorted(ticks), [ticks[size] for size in sorted(ticks)], fontsize=8)
        axis.minorticks_off()
        axis.set_xlabel("model (bf16 shards)")
        axis.set_ylabel(unit)
        axis.set_title(title, fontsize=10)
        axis.grid(True, which="major", alpha=0.3)
        if ticks:
            low, high = min(ticks), max(ticks)
            axis.set_xlim(low / 1.4, high * 1.6)
    # One legend for both panels (the time panel has every line), below them so it hides no point.
    handles, labels = time_axis.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.08, 1, 1))
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    plt.close(figure)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="JSON files written by run.py")
    parser.add_argument("-o", "--output", type=Path, default=Path(__file__).resolve().parent / "plot.png")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    series, ticks = collect(args.results)
    if not series:
        raise SystemExit("no successful runs in the given results")
    draw(series, ticks, args.output)


if __name__ == "__main__":
    main()
