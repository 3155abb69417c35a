"""Fuzzing: mutated adapter configs and safetensors headers either merge correctly or fail cleanly (exit 2, one
stderr line, no output and nothing hidden left beside it); never an internal error, a traceback or a hang.

The budget is fixed and the examples derandomized, so CI runs the same 400 cases every time (about 3 s).
Examples it found that were bugs are kept as explicit cases at the end.
"""

from __future__ import annotations

import atexit
import io
import json
import shutil
import struct
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from safetensors.torch import load_file
from tiny_checkpoints import llama_checkpoint, reference_merge

from qlora_merge.cli import main

# Hypothesis keeps caches in ./.hypothesis unless told otherwise: tests write nothing into the current directory.
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="qlora-merge-tests-hypothesis-")
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)
set_hypothesis_home_dir(_HYPOTHESIS_HOME)

ADAPTER_FILE = "adapter/adapter_model.safetensors"
BASE_FILE = "base/model.safetensors"
CONFIG_FILE = "adapter/adapter_config.json"
HANG_SECONDS = 60

FUZZ = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,  # a hang is caught by the thread's timeout instead; timings vary too much on a busy machine
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

CONFIG_KEYS = [
    "r",
    "lora_alpha",
    "use_rslora",
    "peft_type",
    "target_modules",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "fan_in_fan_out",
    "use_dora",
    "bias",
    "lora_bias",
    "init_lora_weights",
    "trainable_token_indices",
    "layers_to_transform",
    "layer_replication",
    "ensure_weight_tying",
    "task_type",
    "a_field_from_the_future",
]
INTERESTING = [
    None,
    True,
    False,
    0,
    -1,
    1,
    4,
    8,
    2**63,
    10**400,
    1e308,
    float("nan"),
    float("inf"),
    "4",
    "",
    "LORA",
    "IA3",
    "all",
    "lora_only",
    "pissa",
    "q_proj",
    ".*",
    [],
    {},
    ["q_proj"],
    ["q_proj", 1],
    {"q_proj": 8},
    {"q_proj": 0},
    {"q_proj": 2.5},
    {".*": 3},
    {"(": 1},
    [[0, 1]],
    [0, 99999],
]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
VALUES = st.sampled_from(INTERESTING) | JSON
DTYPES = ["F16", "BF16", "F32", "F64", "I16", "U16", "I32", "U8", "BOOL", "F8_E4M3", "Q4_K", "bf16", "", 7, None]


@st.composite
def config_mutations(draw: st.DrawFn) -> dict[str, Any]:
    """One to three adapter_config.json fields set to other values or removed, or the file replaced by junk."""
    if draw(st.integers(0, 9)) == 0:
        return {"replace_with": draw(st.binary(max_size=40))}
    edits = draw(st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), st.booleans(), VALUES), min_size=1, max_size=3))
    return {"edits": edits}


@st.composite
def header_mutations(draw: st.DrawFn) -> dict[str, Any]:
    """One change to the header (or the framing) of the adapter's or the base's safetensors file."""
    kind = draw(
        st.sampled_from(
            ["dtype", "shape", "offsets", "drop", "rename", "metadata", "length", "truncate", "flip", "append"]
        )
    )
    mutation: dict[str, Any] = {"file": draw(st.sampled_from([ADAPTER_FILE, BASE_FILE])), "kind": kind}
    mutation["pick"] = draw(st.integers(0, 10**6))
    if kind == "dtype":
        mutation["value"] = draw(st.sampled_from(DTYPES))
    elif kind == "shape":
        mutation["value"] = draw(st.lists(st.integers(-2, 80), max_size=3) | VALUES)
    elif kind == "offsets":
        mutation["value"] = draw(
            st.tuples(st.integers(-(2**20), 2**20), st.integers(-(2**20), 2**20)) | st.just(None) | VALUES
        )
    elif kind == "rename":
        mutation["value"] = draw(st.text(max_size=12))
    elif kind == "metadata":
        mutation["value"] = draw(VALUES)
    elif kind == "length":
        mutation["value"] = draw(st.integers(-64, 64) | st.integers(0, 2**64 - 1))
    elif kind in ("truncate", "flip", "append"):
        mutation["value"] = draw(st.binary(min_size=1, max_size=16))
    return mutation


def apply_config(root: Path, mutation: dict[str, Any]) -> None:
    path = root / CONFIG_FILE
    if "replace_with" in mutation:
        path.write_bytes(mutation["replace_with"])
        return
    config = json.loads(path.read_text())
    for key, remove, value in mutation["edits"]:
        if remove:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))  # NaN and Infinity as Python's json writes and reads them


def apply_header(root: Path, mutation: dict[str, Any]) -> None:
    path = root / mutation["file"]
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + length]), raw[8 + length :]
    kind, pick, value = mutation["kind"], mutation["pick"], mutation.get("value")
    names = sorted(k for k in header if k != "__metadata__")
    name = names[pick % len(names)]
    if kind in ("length", "truncate", "flip", "append"):
        if kind == "length":
            new_length = value if value > 64 else max(length + value, 0)  # past 64: a length, else a change
            raw = struct.pack("<Q", new_length % 2**64) + raw[8:]
        elif kind == "truncate":
            raw = raw[: pick % len(raw)]
        elif kind == "flip":
            at = 8 + pick % length  # a byte of the header JSON
            raw = raw[:at] + value[:1] + raw[at + 1 :]
        else:
            raw = raw + value
        path.write_bytes(raw)
        return
    if kind == "dtype":
        header[name]["dtype"] = value
    elif kind == "shape":
        header[name]["shape"] = value
    elif kind == "offsets":
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + value[0], end + value[1]] if isinstance(value, tuple) else value
    elif kind == "drop":
        del header[name]
    elif kind == "rename":
        header[value] = header.pop(name)
    elif kind == "metadata":
        header["__metadata__"] = value
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fuzz")
    llama_checkpoint(root, hidden=16, intermediate=24, layers=1, vocab=32, rank=2)
    return root


@pytest.fixture(scope="module")
def outcomes() -> Iterator[Counter[str]]:
    """Counts of what the fuzzed cases did, printed at the end (pytest -s, or -rP) for the record."""
    counts: Counter[str] = Counter()
    yield counts
    print("\nfuzz outcomes:", dict(sorted(counts.items())))


def run_cli_in_thread(argv: list[str]) -> tuple[int, str]:
    """main() in a thread, so that a hang fails the test instead of stalling it."""
    err = io.StringIO()
    result: list[int | BaseException] = []

    def run() -> None:
        try:
            result.append(main(argv, out=io.StringIO(), err=err))
        except BaseException as exc:  # SystemExit from argparse included: never expected here
            result.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(HANG_SECONDS)
    assert not worker.is_alive(), f"the merge hung: {argv}"
    assert isinstance(result[0], int), f"main() raised {result[0]!r}"
    return result[0], err.getvalue()


def check_outcome(root: Path, outcomes: Counter[str], label: str) -> None:
    """Run the CLI on root/base + root/adapter and hold it to the property."""
    output = root / "out"
    before = sorted(p.name for p in root.iterdir())
    argv = ["--base", str(root / "base"), "--adapter", str(root / "adapter"), "--output", str(output)]
    code, err = run_cli_in_thread(argv)
    after = sorted(p.name for p in root.iterdir())
    if code == 0:
        expected = reference_merge(root / "base", root / "adapter")
        got = load_file(output / "model.safetensors")
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
        assert after == sorted([*before, "out"]), "only the output was added"
        outcomes[f"{label}: merged correctly"] += 1
        return
    assert code == 2, f"exit {code}, expected 0 or 2:\n{err}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qlora-merge: error: "), err
    assert "Traceback" not in err
    assert after == before, "an error left something behind"
    outcomes[f"{label}: refused"] += 1
    outcomes[f"  {label} refusal: {_bucket(lines[0])}"] += 1


def _bucket(message: str) -> str:
    """A coarse label for a refusal, for the outcome counts."""
    for fragment, label in [
        ("must be", "config field of the wrong type or value"),
        ("not supported", "unsupported adapter feature"),
        ("rewritten base", "unsupported adapter feature"),
        ("not valid JSON", "invalid JSON"),
        ("JSON object", "invalid JSON"),
        ("__metadata__", "metadata not an object of strings"),
        ("unused bytes", "gap between tensors"),
        ("after the last tensor", "bytes after the last tensor"),
        ("unknown dtype", "unknown dtype"),
        ("has dtype", "LoRA factor of a non-float dtype"),
        ("invalid shape", "invalid shape"),
        ("offsets", "data offsets outside the file"),
        ("spans", "size disagrees with dtype x shape"),
        ("overlaps", "overlapping tensors"),
        ("header length", "header length past the end"),
        ("truncated", "truncated file"),
        ("rank", "rank disagrees"),
        ("matches no", "adapter key matches nothing"),
        ("matches several", "adapter key matches several tensors"),
        ("is missing", "LoRA half missing"),
        ("are not matrices", "factor not a matrix"),
        ("weight but base tensor", "shape mismatch"),
        ("after merging", "NaN/inf after merging"),
    ]:
        if fragment in message:
            return label
    return message.removeprefix("qlora-merge: error: ").split(": ", 1)[-1][:60]


@FUZZ
@given(mutation=config_mutations())
def test_fuzzed_adapter_config(mutation: dict[str, Any], pristine: Path, outcomes: Counter[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(pristine / "base", root / "base")
        shutil.copytree(pristine / "adapter", root / "adapter")
        apply_config(root, mutation)
        check_outcome(root, outcomes, "config")


@FUZZ
@given(mutation=header_mutations())
def test_fuzzed_safetensors_header(mutation: dict[str, Any], pristine: Path, outcomes: Counter[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(pristine / "base", root / "base")
        shutil.copytree(pristine / "adapter", root / "adapter")
        apply_header(root, mutation)
        check_outcome(root, outcomes, f"header ({mutation['file'].split('/')[0]})")


# What the fuzzer found: files qlora-merge read but the safetensors library (and so every loader) refuses. Each
# merged "fine" before: a tensor dropped from the header (a gap in the data), bytes appended after the last tensor,
# and a `__metadata__` that is not an object of strings (`false` was read as no metadata).
FOUND = [
    ({"file": BASE_FILE, "kind": "drop", "pick": 0}, "unused bytes before tensor"),
    ({"file": ADAPTER_FILE, "kind": "drop", "pick": 3}, "unused bytes before tensor"),
    ({"file": BASE_FILE, "kind": "append", "pick": 0, "value": b"\x00" * 3}, "3 bytes after the last tensor"),
    ({"file": ADAPTER_FILE, "kind": "metadata", "pick": 0, "value": False}, "__metadata__ is not an object of strings"),
    ({"file": BASE_FILE, "kind": "metadata", "pick": 0, "value": {"format": 5}}, "__metadata__ is not an object"),
]


@pytest.mark.parametrize(("mutation", "message"), FOUND, ids=[f"{m['kind']}-{m['file'][:4]}" for m, _ in FOUND])
def test_found_by_fuzzing(mutation: dict[str, Any], message: str, pristine: Path, tmp_path: Path) -> None:
    shutil.copytree(pristine / "base", tmp_path / "base")
    shutil.copytree(pristine / "adapter", tmp_path / "adapter")
    apply_header(tmp_path, mutation)
    counts: Counter[str] = Counter()
    check_outcome(tmp_path, counts, "found")
    code, err = run_cli_in_thread(
        ["--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "o")]
    )
    assert code == 2 and message in err and str(tmp_path / mutation["file"]) in err, err


def test_metadata_null_is_no_metadata(pristine: Path, tmp_path: Path) -> None:
    """The near miss of the metadata case: `null` is what the safetensors library reads as no metadata."""
    shutil.copytree(pristine / "base", tmp_path / "base")
    shutil.copytree(pristine / "adapter", tmp_path / "adapter")
    apply_header(tmp_path, {"file": ADAPTER_FILE, "kind": "metadata", "pick": 0, "value": None})
    counts: Counter[str] = Counter()
    check_outcome(tmp_path, counts, "null")
    assert counts == {"null: merged correctly": 1}
