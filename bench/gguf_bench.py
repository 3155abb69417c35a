"""Benchmark base + adapter -> GGUF (q8_0, q4_k_m) at the 1.1B shape: qlora-merge --gguf against the usual pipeline.

Usual pipeline: PEFT merge_and_unload + save_pretrained (bench/peft_reference.py), the tokenizer file copied beside
it, then llama.cpp's convert_hf_to_gguf.py --outtype q8_0; for q4_k_m, convert to bf16 then llama_model_quantize
(qlora_merge.gguf._quantize, a child, as our export does). Ours: `qlora-merge ... --dtype bf16 --gguf TYPE`, with
and without --gguf-only.

Every step is a child process measured with measure.run_child (wall time, peak RSS). While it runs the runner polls
the step's own work directory every 0.1 s: "written" is the sum over every file (by inode, so a rename is not
counted twice) of the largest size it was seen at; "staged peak" is the largest total size of the directory seen
(inputs live elsewhere, hard-linked, not counted). The runner imports no torch, so its RSS floor stays small.

The 1b checkpoint of bench/generate.py has no tokenizer: a SentencePiece model (unigram, vocab 1000, trained
single-threaded on seeded pseudo-words, so reproducible) is written into a sibling base directory of hard links to the
shards plus config.json; llama.cpp's converter pads the vocab to the config's 32000 with pad tokens.

Finally the two q8_0 files are compared with the converter's own gguf-py GGUFReader: tensor names, types, shapes
and data bytes must all be equal (they are if our merge equals PEFT's bit for bit).

Usage: python bench/gguf_bench.py [--workdir /tmp/qlora-bench] [--size 1b] [--repeats 1] [--keep]
Helpers run as children of this file: --make-tokenizer DIR, --compare A B.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from measure import own_peak_rss_bytes, run_child  # noqa: E402
from tools import REPO_ROOT, child_env, ours_env  # noqa: E402

GB = 1e9
RESULTS_DIR = BENCH_DIR / "results"
VOCAB = 1000
POLL_S = 0.1


# -- children -------------------------------------------------------------------------------------------------------


def make_tokenizer(directory: Path) -> None:
    """Train a reproducible SentencePiece model into ``directory``/tokenizer.model."""
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(4000)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))) for _ in range(20000)]
    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), vocab_size=VOCAB, model_type="unigram",
        num_threads=1, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        shuffle_input_sentence=False, minloglevel=2,
    )  # fmt: skip
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink(missing_ok=True)
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )


def compare(first: Path, second: Path) -> dict[str, object]:
    """Compare two GGUF files' tensors (names, types, shapes, data bytes) with gguf-py's GGUFReader."""
    import hashlib

    from gguf import GGUFReader

    def table(path: Path) -> dict[str, tuple[str, list[int], str]]:
        reader = GGUFReader(str(path))
        return {
            t.name: (t.tensor_type.name, [int(x) for x in t.shape], hashlib.sha256(t.data.tobytes()).hexdigest())
            for t in reader.tensors
        }

    a, b = table(first), table(second)
    differing = sorted(name for name in a.keys() & b.keys() if a[name] != b[name])
    return {
        "files": [str(first), str(second)],
        "tensors": [len(a), len(b)],
        "only_in_first": sorted(a.keys() - b.keys()),
        "only_in_second": sorted(b.keys() - a.keys()),
        "differing": differing,
        "identical": a == b,
    }


# -- measuring ------------------------------------------------------------------------------------------------------


class DiskWatch:
    """Poll a directory tree: the largest size each inode reached, and the largest total."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sizes: dict[tuple[int, int], int] = {}
        self.peak = 0

    def poll(self) -> None:
        total = 0
        stack = [self.root]
        while stack:
            try:
                entries = list(os.scandir(stack.pop()))
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.is_symlink():
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                key = (st.st_dev, st.st_ino)
                self.sizes[key] = max(self.sizes.get(key, 0), st.st_size)
                total += st.st_size
        self.peak = max(self.peak, total)

    @property
    def written(self) -> int:
        return sum(self.sizes.values())


def measured(name: str, argv: list[str], workdir: Path, logs: Path, env: dict[str, str]) -> dict[str, object]:
    """Run one child with its disk use watched in ``workdir``; return its numbers."""
    watch = DiskWatch(workdir)
    before = set(watch.sizes)
    watch.poll()
    baseline_sizes = dict(watch.sizes)
    baseline_total = watch.peak
    watch.peak = 0
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["child"] = run_child(argv, logs / name, env)
        except OSError as exc:  # pragma: no cover - reported below
            box["error"] = str(exc)

    thread = threading.Thread(target=target)
    thread.start()
    while thread.is_alive():
        watch.poll()
        thread.join(POLL_S)
    watch.poll()
    del before
    # Files already there before the step (an earlier step's output) are not written by it; growth would be.
    written = sum(size - baseline_sizes.get(key, 0) for key, size in watch.sizes.items())
    child = box.get("child")
    result: dict[str, object] = {
        "name": name, "argv": argv, "written_bytes": written, "staged_peak_bytes": watch.peak,
        "dir_before_bytes": baseline_total,
    }  # fmt: skip
    if child is None:
        result.update(ok=False, error=f"cannot start: {box.get('error')}")
        return result
    result.update(
        ok=child.ok, wall_s=child.wall_s, peak_rss_bytes=child.peak_rss_bytes, rss_floor_bytes=child.rss_floor_bytes,
        error="" if child.ok else child.error_line(),
    )  # fmt: skip
    status = f"{child.wall_s:7.1f} s {child.peak_rss_bytes / GB:5.2f} GB RSS {written / GB:5.2f} GB written"
    print(f"  {name:28s} {status}" + ("" if child.ok else f"  FAILED: {result['error']}"), flush=True)
    return result


# -- setup ----------------------------------------------------------------------------------------------------------


def converter_root() -> Path:
    """The converter dir qlora_merge.gguf.tools.find_converter() uses, asked of a child (keeps the runner light)."""
    code = "from qlora_merge.gguf.tools import find_converter; print(find_converter().root)"
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", code], env=child_env(ours_env()), capture_output=True, text=True, check=True
    )
    return Path(done.stdout.strip())


def prepare_base(workdir: Path, size: str) -> tuple[Path, Path]:
    """Generate (cached) the checkpoint, then a sibling base dir: hard-linked shards, config, a tokenizer."""
    import subprocess

    subprocess.run(
        [sys.executable, str(BENCH_DIR / "generate.py"), "--size", size, "--workdir", str(workdir)], check=True
    )
    models = workdir / "models" / size
    base, adapter = models / "base", models / "adapter"
    tok_base = workdir / "gguf" / f"{size}-base-tok"
    if not (tok_base / "tokenizer.model").is_file():
        shutil.rmtree(tok_base, ignore_errors=True)
        tok_base.mkdir(parents=True)
        subprocess.run([sys.executable, __file__, "--make-tokenizer", str(tok_base)], check=True)
    for source in base.iterdir():
        link = tok_base / source.name
        if source.suffix == ".safetensors":
            # Hard links: qlora-merge refuses weight files that are symlinks out of the checkpoint directory.
            if not link.exists():
                try:
                    os.link(source, link)
                except OSError:
                    link.symlink_to(source)
        elif not link.exists():
            shutil.copy2(source, link)
    return tok_base, adapter


# -- pipelines ------------------------------------------------------------------------------------------------------


def ours(base: Path, adapter: Path, gguf_type: str, only: bool, root: Path, logs: Path) -> dict[str, object]:
    name = f"ours-{gguf_type}" + ("-only" if only else "")
    work = root / name
    shutil.rmtree(work, ignore_errors=True)
    (work / "tmp").mkdir(parents=True)
    out = work / "merged"
    argv = [
        sys.executable, "-m", "qlora_merge", "--base", str(base), "--adapter", str(adapter), "--output", str(out),
        "--dtype", "bf16", "--gguf", gguf_type, *(["--gguf-only"] if only else []),
    ]  # fmt: skip
    env = child_env({**ours_env(), "TMPDIR": str(work / "tmp")})
    step = measured(name, argv, work, logs, env)
    files = sorted(out.glob("*.gguf"))
    return {"pipeline": name, "steps": [step], "gguf": str(files[0]) if files else None, "work": str(work)}


def usual(base: Path, adapter: Path, converter: Path, root: Path, logs: Path) -> list[dict[str, object]]:
    """PEFT merge + save, then q8_0 by the converter and q4_k_m by bf16 + quantizer: two pipelines sharing step 1."""
    work = root / "usual"
    shutil.rmtree(work, ignore_errors=True)
    (work / "tmp").mkdir(parents=True)
    hf = work / "merged"
    env = child_env({"TMPDIR": str(work / "tmp")})
    conv_env = dict(env)
    conv_env.pop("NO_LOCAL_GGUF", None)
    conv_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(converter / "gguf-py"), env.get("PYTHONPATH", "")]))
    script = str(converter / "convert_hf_to_gguf.py")
    merge = measured(
        "usual-peft-merge-save",
        [sys.executable, str(BENCH_DIR / "peft_reference.py"), "--base", str(base), "--adapter", str(adapter),
         "--output", str(hf)],
        work, logs, env,
    )  # fmt: skip
    # save_pretrained writes no tokenizer: the user copies it (not timed: a cp of a few kB).
    for tok in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy2(base / tok, hf / tok)
    q8 = work / "merged-q8_0.gguf"
    convert_q8 = measured(
        "usual-convert-q8_0", [sys.executable, script, str(hf), "--outfile", str(q8), "--outtype", "q8_0"],
        work, logs, conv_env,
    )  # fmt: skip
    # Out of the work dir, so that the q4_k_m pipeline's disk peak does not count the q8_0 pipeline's file.
    kept = root / "usual-kept"
    kept.mkdir(exist_ok=True)
    if q8.exists():
        q8 = q8.rename(kept / q8.name)
    bf16 = work / "merged-bf16.gguf"
    convert_bf16 = measured(
        "usual-convert-bf16", [sys.executable, script, str(hf), "--outfile", str(bf16), "--outtype", "bf16"],
        work, logs, conv_env,
    )  # fmt: skip
    q4 = work / "merged-q4_k_m.gguf"
    threads = str(os.cpu_count() or 1)
    quantize = measured(
        "usual-quantize-q4_k_m",
        [sys.executable, "-m", "qlora_merge.gguf._quantize", str(bf16), str(q4), "q4_k_m", threads],
        work, logs, child_env({**ours_env(), "TMPDIR": str(work / "tmp")}),
    )  # fmt: skip
    return [
        {"pipeline": "usual-q8_0", "steps": [merge, convert_q8], "gguf": str(q8), "work": str(work)},
        {"pipeline": "usual-q4_k_m", "steps": [merge, convert_bf16, quantize], "gguf": str(q4), "work": str(work)},
    ]


def summarize(pipeline: dict[str, object]) -> dict[str, object]:
    steps = pipeline["steps"]
    ok = all(s.get("ok") for s in steps)
    return {
        "pipeline": pipeline["pipeline"],
        "ok": ok,
        "wall_s": sum(s.get("wall_s", 0.0) for s in steps),
        "peak_rss_bytes": max(s.get("peak_rss_bytes", 0) for s in steps),
        "written_bytes": sum(s["written_bytes"] for s in steps),
        # Peak on disk at once within a pipeline: each step's peak counts what earlier steps left there.
        "staged_peak_bytes": max(s["staged_peak_bytes"] for s in steps),
        "gguf_bytes": Path(pipeline["gguf"]).stat().st_size if pipeline["gguf"] and Path(pipeline["gguf"]).exists()
        else 0,
    }  # fmt: skip


def print_table(rows: list[dict[str, object]]) -> None:
    print()
    print("| pipeline | wall s | peak RSS GB | disk written GB | peak on disk GB | GGUF GB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['pipeline']}{'' if r['ok'] else ' (FAILED)'} | {r['wall_s']:.1f} | {r['peak_rss_bytes'] / GB:.2f} "
            f"| {r['written_bytes'] / GB:.2f} | {r['staged_peak_bytes'] / GB:.2f} | {r['gguf_bytes'] / GB:.3f} |"
        )
    by = {r["pipeline"]: r for r in rows}
    print()
    print("| type | ours (variant) | wall usual/ours | RSS usual/ours | written usual/ours | peak disk usual/ours |")
    print("|---|---|---|---|---|---|")
    for t in ("q8_0", "q4_k_m"):
        u = by.get(f"usual-{t}")
        for variant in (f"ours-{t}", f"ours-{t}-only"):
            o = by.get(variant)
            if not u or not o or not o["ok"] or not u["ok"]:
                continue
            ratio = [
                u[k] / o[k] if o[k] else float("nan")
                for k in ("wall_s", "peak_rss_bytes", "written_bytes", "staged_peak_bytes")
            ]
            print(f"| {t} | {variant} | " + " | ".join(f"{x:.1f}x" for x in ratio) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-bench"))
    parser.add_argument("--size", default="1b")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the outputs under WORKDIR/gguf/runs")
    parser.add_argument("--make-tokenizer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--compare", type=Path, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_tokenizer:
        make_tokenizer(args.make_tokenizer)
        return
    if args.compare:
        print(json.dumps(compare(*args.compare)))
        return

    import subprocess

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base, adapter = prepare_base(args.workdir, args.size)
    converter = converter_root()
    root = args.workdir / "gguf" / "runs"
    logs = args.workdir / "logs" / f"gguf-{stamp}"
    print(f"base {base}\nadapter {adapter}\nconverter {converter}\nrunner RSS floor {own_peak_rss_bytes() / GB:.3f} GB")
    repeats = []
    for repeat in range(args.repeats):
        print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
        pipelines = usual(base, adapter, converter, root, logs)
        for gguf_type in ("q8_0", "q4_k_m"):
            for only in (False, True):
                pipelines.append(ours(base, adapter, gguf_type, only, root, logs))
        rows = [summarize(p) for p in pipelines]
        print_table(rows)
        by = {p["pipeline"]: p for p in pipelines}
        equality: dict[str, object] = {}
        pairs = [("usual-q8_0", "ours-q8_0"), ("usual-q8_0", "ours-q8_0-only"), ("usual-q4_k_m", "ours-q4_k_m")]
        for left, right in pairs:
            a, b = by[left]["gguf"], by[right]["gguf"]
            if not a or not b or not Path(a).exists() or not Path(b).exists():
                equality[f"{left} vs {right}"] = {"error": "a GGUF is missing"}
                continue
            env = child_env({"PYTHONPATH": str(converter / "gguf-py")})
            done = subprocess.run(
                [sys.executable, __file__, "--compare", a, b], env=env, capture_output=True, text=True, check=False
            )
            equality[f"{left} vs {right}"] = (
                json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr.strip().splitlines()[-1:]}
            )
        for key, value in equality.items():
            verdict = value.get("identical", value.get("error"))
            extra = "" if value.get("identical") else f" differing={len(value.get('differing', []))}"
            print(f"tensor equality {key}: {verdict}{extra}")
        repeats.append({"pipelines": pipelines, "summary": rows, "equality": equality})
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    RESULTS_DIR.mkdir(exist_ok=True)
    results = {
        "started": stamp, "argv": sys.argv, "size": args.size, "base": str(base), "adapter": str(adapter),
        "converter": str(converter), "cpus": os.cpu_count(), "repeats": repeats,
        "note": "each step a child (measure.run_child); written/peak disk polled every 0.1 s in the step's workdir",
    }  # fmt: skip
    path = RESULTS_DIR / f"gguf-{stamp}.json"
    path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"\nresults: {path.relative_to(REPO_ROOT)}")


if __name__ == "__main__":
    main()
