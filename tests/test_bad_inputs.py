"""Bad input: the library raises the right MergeError naming the file; the CLI prints one line, exits 2, writes nothing.

Every case builds a broken copy of a good tiny llama (or its adapter) in tmp_path, then runs the merge twice: through
`qlora_merge.merge` (error class and message) and through `qlora_merge.cli.main` (exit code, stderr, leftovers).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import make_adapter, make_base
from safetensors.torch import load_file, save_file

import qlora_merge
import qlora_merge.api
from qlora_merge import (
    AdapterFormatError,
    CheckpointFormatError,
    InputNotFound,
    KeyMatchError,
    MergeError,
    OutputError,
    ShapeMismatch,
    UnsupportedAdapter,
    merge,
)
from qlora_merge.cli import main

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
INDEX = "model.safetensors.index.json"
Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"


@dataclass(frozen=True)
class Sources:
    base: Path  # sharded bf16 llama: 4 shards and an index
    adapter: Path  # a real PEFT adapter for it (r=4, all linear projections)
    wide_adapter: Path  # a real PEFT adapter for a llama with hidden_size 48 instead of 64


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Sources:
    import transformers

    root = tmp_path_factory.mktemp("sources")
    base = make_base("llama", root / "base")
    adapter = make_adapter(base, root / "adapter", "llama")
    config = transformers.LlamaConfig(
        hidden_size=48,
        intermediate_size=112,
        num_hidden_layers=2,
        vocab_size=160,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "wide-base")
    wide_adapter = make_adapter(root / "wide-base", root / "wide-adapter", "llama")
    assert len(list(base.glob("model-*.safetensors"))) > 2 and (base / INDEX).is_file()
    return Sources(base, adapter, wide_adapter)


@dataclass
class Bad:
    """Inputs of one failing merge and the file (or flag) the error message must name."""

    base: Path | str
    adapter: Path | str
    culprit: Path | str
    kwargs: dict[str, Any] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------- helpers


def copy_adapter(src: Sources, tmp: Path) -> Path:
    return Path(shutil.copytree(src.adapter, tmp / "adapter"))


def copy_base(src: Sources, tmp: Path) -> Path:
    return Path(shutil.copytree(src.base, tmp / "base"))


def edit_adapter_config(src: Sources, tmp: Path, **changes: Any) -> Bad:
    adapter = copy_adapter(src, tmp)
    path = adapter / ADAPTER_CONFIG
    config = json.loads(path.read_text()) | changes
    path.write_text(json.dumps(config))  # json.dumps writes NaN for float("nan"), and json.loads accepts it
    return Bad(src.base, adapter, path)


def edit_adapter_tensors(src: Sources, tmp: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Bad:
    adapter = copy_adapter(src, tmp)
    path = adapter / ADAPTER_WEIGHTS
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return Bad(src.base, adapter, path)


def add_adapter_tensor(key: str, shape: tuple[int, ...], culprit: str | None = None) -> Callable[[Sources, Path], Bad]:
    """An adapter with one more tensor `key`; the error names `culprit` (the key, unless said otherwise)."""

    def build(src: Sources, tmp: Path) -> Bad:
        bad = edit_adapter_tensors(src, tmp, lambda t: t.update({key: torch.ones(shape)}))
        bad.culprit = culprit or key
        return bad

    return build


def rewrite_header(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Change a safetensors header in place, keeping the data bytes (offsets are relative to the data start)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    edit(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])


def first_shard(base: Path) -> Path:
    return sorted(base.glob("model-*.safetensors"))[0]


def truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def run_cli(bad: Bad, output: Path, *extra: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    argv = ["--base", str(bad.base), "--adapter", str(bad.adapter), "--output", str(output), *bad.argv, *extra]
    code = main(argv, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, err: str, culprit: Path | str, what: str) -> None:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("qlora-merge: error: "), lines[0]
    assert str(culprit) in lines[0], f"{culprit} not named in: {lines[0]}"
    assert re.search(what, lines[0]), f"{what!r} not in: {lines[0]}"
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------------------ bad inputs
# Each builder returns the broken inputs; the table says which error and what the message must say.


def missing_adapter_dir(src: Sources, tmp: Path) -> Bad:
    return Bad(src.base, tmp / "no-such-adapter", tmp / "no-such-adapter")


def adapter_is_a_file(src: Sources, tmp: Path) -> Bad:
    path = tmp / "adapter.safetensors"
    shutil.copy(src.adapter / ADAPTER_WEIGHTS, path)
    return Bad(src.base, path, path)


def adapter_without_config(src: Sources, tmp: Path) -> Bad:
    adapter = copy_adapter(src, tmp)
    (adapter / ADAPTER_CONFIG).unlink()
    return Bad(src.base, adapter, adapter / ADAPTER_CONFIG)


def adapter_config_invalid_json(src: Sources, tmp: Path) -> Bad:
    adapter = copy_adapter(src, tmp)
    (adapter / ADAPTER_CONFIG).write_text('{"peft_type": "LORA", "r": 4,')
    return Bad(src.base, adapter, adapter / ADAPTER_CONFIG)


def adapter_config_not_an_object(src: Sources, tmp: Path) -> Bad:
    adapter = copy_adapter(src, tmp)
    (adapter / ADAPTER_CONFIG).write_text('["LORA"]')
    return Bad(src.base, adapter, adapter / ADAPTER_CONFIG)


def config_edit(**changes: Any) -> Callable[[Sources, Path], Bad]:
    return lambda src, tmp: edit_adapter_config(src, tmp, **changes)


def adapter_weights_missing(src: Sources, tmp: Path) -> Bad:
    adapter = copy_adapter(src, tmp)
    (adapter / ADAPTER_WEIGHTS).unlink()
    return Bad(src.base, adapter, adapter)


def adapter_weights_truncated(src: Sources, tmp: Path) -> Bad:
    adapter = copy_adapter(src, tmp)
    truncate(adapter / ADAPTER_WEIGHTS, 0.5)
    return Bad(src.base, adapter, adapter / ADAPTER_WEIGHTS)


def adapter_weights_four_bytes(src: Sources, tmp: Path) -> Bad:
    adapter = copy_adapter(src, tmp)
    truncate(adapter / ADAPTER_WEIGHTS, 0)
    (adapter / ADAPTER_WEIGHTS).write_bytes(b"\x10\x00\x00\x00")
    return Bad(src.base, adapter, adapter / ADAPTER_WEIGHTS)


def adapter_header_length_garbage(src: Sources, tmp: Path) -> Bad:
    adapter = copy_adapter(src, tmp)
    path = adapter / ADAPTER_WEIGHTS
    path.write_bytes(b"\xff" * 8 + path.read_bytes()[8:])
    return Bad(src.base, adapter, path)


def adapter_header_json_garbage(src: Sources, tmp: Path) -> Bad:
    adapter = copy_adapter(src, tmp)
    path = adapter / ADAPTER_WEIGHTS
    raw = bytearray(path.read_bytes())
    raw[8:16] = b"\x00\xfe{{{{}]"
    path.write_bytes(bytes(raw))
    return Bad(src.base, adapter, path)


def lora_a_without_lora_b(src: Sources, tmp: Path) -> Bad:
    bad = edit_adapter_tensors(src, tmp, lambda t: t.pop(f"{Q_PROJ}.lora_B.weight"))
    bad.culprit = f"{Q_PROJ}.lora_B.weight"
    return bad


def module_matching_no_base_tensor(src: Sources, tmp: Path) -> Bad:
    def rename(tensors: dict[str, torch.Tensor]) -> None:
        for half in "AB":
            tensors[f"{Q_PROJ}.lora_{half}.weight".replace("q_proj", "qq_proj")] = tensors.pop(
                f"{Q_PROJ}.lora_{half}.weight"
            )

    edit_adapter_tensors(src, tmp, rename)
    return Bad(src.base, tmp / "adapter", "model.layers.0.self_attn.qq_proj")


def adapter_for_another_hidden_size(src: Sources, tmp: Path) -> Bad:
    return Bad(src.base, src.wide_adapter, src.wide_adapter / ADAPTER_WEIGHTS)


def rank_disagrees_with_config(src: Sources, tmp: Path) -> Bad:
    bad = edit_adapter_config(src, tmp, r=8)
    bad.culprit = Path(bad.adapter) / ADAPTER_WEIGHTS
    return bad


def missing_base_dir(src: Sources, tmp: Path) -> Bad:
    return Bad(tmp / "no-such-base", src.adapter, tmp / "no-such-base")


def base_only_config(src: Sources, tmp: Path) -> Bad:
    (tmp / "base").mkdir()
    shutil.copy(src.base / "config.json", tmp / "base" / "config.json")
    return Bad(tmp / "base", src.adapter, tmp / "base")


class _RunsCode:
    """Unpickling this would call os.makedirs: a .bin that carries code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.makedirs, (str(self.marker),))


def base_pickle_with_code(src: Sources, tmp: Path) -> Bad:
    base_only_config(src, tmp)
    state: dict[str, Any] = dict(load_file(first_shard(src.base)))
    state["payload"] = _RunsCode(tmp / "ran")
    torch.save(state, tmp / "base" / "pytorch_model.bin")
    return Bad(tmp / "base", src.adapter, tmp / "base" / "pytorch_model.bin")


def base_only_consolidated_pth(src: Sources, tmp: Path) -> Bad:
    base_only_config(src, tmp)
    torch.save(load_file(first_shard(src.base)), tmp / "base" / "consolidated.00.pth")
    return Bad(tmp / "base", src.adapter, tmp / "base" / "consolidated.00.pth")


def base_config_invalid_json(src: Sources, tmp: Path) -> Bad:
    base = copy_base(src, tmp)
    (base / "config.json").write_text('{"model_type": "llama",,}')
    return Bad(base, src.adapter, base / "config.json")


def base_config_field(**fields: object) -> Callable[[Sources, Path], Bad]:
    """The base's config.json with `fields` set to values of the wrong type."""

    def build(src: Sources, tmp: Path) -> Bad:
        base = copy_base(src, tmp)
        config = json.loads((base / "config.json").read_text())
        (base / "config.json").write_text(json.dumps(config | fields))
        return Bad(base, src.adapter, base / "config.json")

    return build


def base_config_nested_too_deep(src: Sources, tmp: Path) -> Bad:
    base = copy_base(src, tmp)
    (base / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    return Bad(base, src.adapter, base / "config.json")


def base_unknown_dtype(src: Sources, tmp: Path) -> Bad:
    base = copy_base(src, tmp)
    shard = first_shard(base)

    def quantize(header: dict[str, Any]) -> None:
        name = next(k for k in header if k != "__metadata__")
        header[name]["dtype"] = "Q4_K"

    rewrite_header(shard, quantize)
    return Bad(base, src.adapter, shard)


def base_shard_truncated(src: Sources, tmp: Path) -> Bad:
    base = copy_base(src, tmp)
    shard = sorted(base.glob("model-*.safetensors"))[1]
    truncate(shard, 0.6)
    return Bad(base, src.adapter, shard)


def index_names_missing_shard(src: Sources, tmp: Path) -> Bad:
    base = copy_base(src, tmp)
    shard = sorted(base.glob("model-*.safetensors"))[2]
    shard.unlink()
    return Bad(base, src.adapter, shard)


def shard_set_incomplete_without_index(src: Sources, tmp: Path) -> Bad:
    base = copy_base(src, tmp)
    (base / INDEX).unlink()
    shard = sorted(base.glob("model-*.safetensors"))[1]
    shard.unlink()
    return Bad(base, src.adapter, shard.name)


def _point_index_outside(src: Sources, tmp: Path, how: str) -> Bad:
    base = copy_base(src, tmp)
    shard = first_shard(base)
    outside = tmp / "outside.safetensors"
    if how == "symlink":
        shard.rename(outside)
        shard.symlink_to(outside)
        return Bad(base, src.adapter, base / INDEX)
    shard.rename(outside)
    target = "../outside.safetensors" if how == "dotdot" else str(outside)
    index = json.loads((base / INDEX).read_text())
    index["weight_map"] = {k: target if v == shard.name else v for k, v in index["weight_map"].items()}
    (base / INDEX).write_text(json.dumps(index))
    return Bad(base, src.adapter, base / INDEX)


def index_points_outside(how: str) -> Callable[[Sources, Path], Bad]:
    return lambda src, tmp: _point_index_outside(src, tmp, how)


def max_shard_size(value: str) -> Callable[[Sources, Path], Bad]:
    return lambda src, tmp: Bad(
        src.base, src.adapter, "--max-shard-size", {"max_shard_size": value}, [f"--max-shard-size={value}"]
    )


def adapter_config_text(text: str) -> Callable[[Sources, Path], Bad]:
    def build(src: Sources, tmp: Path) -> Bad:
        adapter = copy_adapter(src, tmp)
        (adapter / ADAPTER_CONFIG).write_text(text)
        return Bad(src.base, adapter, adapter / ADAPTER_CONFIG)

    return build


def adapter_config_bad_utf8(src: Sources, tmp: Path) -> Bad:
    adapter = copy_adapter(src, tmp)
    (adapter / ADAPTER_CONFIG).write_bytes(b'{"peft_type": "LORA\xff"}')
    return Bad(src.base, adapter, adapter / ADAPTER_CONFIG)


def adapter_header_nested_too_deep(src: Sources, tmp: Path) -> Bad:
    adapter = copy_adapter(src, tmp)
    header = b"[" * 100_000 + b"]" * 100_000
    (adapter / ADAPTER_WEIGHTS).write_bytes(struct.pack("<Q", len(header)) + header)
    return Bad(src.base, adapter, adapter / ADAPTER_WEIGHTS)


def adapter_without_tensors(src: Sources, tmp: Path) -> Bad:
    return edit_adapter_tensors(src, tmp, lambda t: t.clear())


def factor_as(key: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Sources, Path], Bad]:
    def build(src: Sources, tmp: Path) -> Bad:
        bad = edit_adapter_tensors(src, tmp, lambda t: t.update({key: change(t[key]).contiguous()}))
        bad.culprit = key.removesuffix(".lora_A.weight").removesuffix(".lora_B.weight")
        return bad

    return build


class RunsCode:
    """Unpickling this runs os.mkdir: a .bin adapter carrying it must be refused without running it."""

    marker = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.marker,))


def adapter_bin(content: Callable[[Path, dict[str, torch.Tensor]], None]) -> Callable[[Sources, Path], Bad]:
    def build(src: Sources, tmp: Path) -> Bad:
        adapter = copy_adapter(src, tmp)
        tensors = load_file(adapter / ADAPTER_WEIGHTS)
        (adapter / ADAPTER_WEIGHTS).unlink()
        content(adapter / "adapter_model.bin", tensors)
        return Bad(src.base, adapter, adapter / "adapter_model.bin")

    return build


def pickle_running_code(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    payload = RunsCode()
    payload.marker = str(path.parent.parent / "code-was-run")
    torch.save(tensors | {"payload": payload}, path)  # type: ignore[operator]


def index_invalid_json(src: Sources, tmp: Path) -> Bad:
    base = copy_base(src, tmp)
    (base / INDEX).write_text('{"weight_map": {')
    return Bad(base, src.adapter, base / INDEX)


def index_maps_tensor_to_wrong_shard(src: Sources, tmp: Path) -> Bad:
    base = copy_base(src, tmp)
    index = json.loads((base / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]
    (base / INDEX).write_text(json.dumps(index))
    return Bad(base, src.adapter, base / INDEX)


CASES: list[tuple[str, Callable[[Sources, Path], Bad], type[MergeError], str]] = [
    ("adapter-dir-missing", missing_adapter_dir, InputNotFound, "not found"),
    ("adapter-is-a-file", adapter_is_a_file, InputNotFound, "must be a directory"),
    ("adapter-config-missing", adapter_without_config, InputNotFound, "adapter_config.json not found"),
    ("adapter-config-invalid-json", adapter_config_invalid_json, AdapterFormatError, "not valid JSON"),
    ("adapter-config-not-object", adapter_config_not_an_object, AdapterFormatError, "JSON object"),
    ("r-zero", config_edit(r=0), AdapterFormatError, "'r' must be a positive integer, got 0"),
    ("r-string", config_edit(r="8"), AdapterFormatError, "'r' must be a positive integer, got '8'"),
    ("r-negative", config_edit(r=-4), AdapterFormatError, "'r' must be a positive integer"),
    ("alpha-nan", config_edit(lora_alpha=math.nan), AdapterFormatError, "'lora_alpha' must be a finite number"),
    ("alpha-string", config_edit(lora_alpha="16"), AdapterFormatError, "'lora_alpha' must be a finite number"),
    ("rslora-string", config_edit(use_rslora="yes"), AdapterFormatError, "'use_rslora' must be true or false"),
    ("rank-pattern-list", config_edit(rank_pattern=[8]), AdapterFormatError, "'rank_pattern' must be an object"),
    (
        "modules-to-save-string",
        config_edit(modules_to_save="embed_tokens"),
        AdapterFormatError,
        "'modules_to_save' must be a list of module names",
    ),
    ("target-modules-mixed", config_edit(target_modules=["q_proj", 1]), AdapterFormatError, "'target_modules' must"),
    ("rank-pattern-zero", config_edit(rank_pattern={"q_proj": 0}), AdapterFormatError, "must be a positive integer"),
    ("peft-type-ia3", config_edit(peft_type="IA3"), UnsupportedAdapter, "peft_type 'IA3' is not supported"),
    ("peft-type-prefix", config_edit(peft_type="PREFIX_TUNING"), UnsupportedAdapter, "'PREFIX_TUNING'"),
    ("use-dora-without-magnitudes", config_edit(use_dora=True), AdapterFormatError, "use_dora is true but .* no DoRA"),
    ("layer-replication", config_edit(layer_replication=[[2, 0]]), AdapterFormatError, "'layer_replication' must"),
    ("peft-type-loha", config_edit(peft_type="LOHA"), UnsupportedAdapter, "peft_type 'LOHA' is not supported"),
    ("pissa-unconverted", config_edit(init_lora_weights="pissa"), UnsupportedAdapter, "path_initial_model"),
    ("bias-value", config_edit(bias="some"), AdapterFormatError, "'bias' must be 'none', 'all' or 'lora_only'"),
    ("adapter-weights-missing", adapter_weights_missing, InputNotFound, "no adapter_model.safetensors"),
    ("adapter-weights-truncated", adapter_weights_truncated, AdapterFormatError, "outside the file|exceeds"),
    ("adapter-weights-4-bytes", adapter_weights_four_bytes, AdapterFormatError, "truncated"),
    ("adapter-header-length-garbage", adapter_header_length_garbage, AdapterFormatError, "header length"),
    ("adapter-header-json-garbage", adapter_header_json_garbage, AdapterFormatError, "not valid JSON"),
    ("lora-a-without-lora-b", lora_a_without_lora_b, AdapterFormatError, "is missing"),
    (
        "dora-magnitude-without-use-dora",
        add_adapter_tensor(f"{Q_PROJ}.lora_magnitude_vector", (64,)),
        AdapterFormatError,
        "use_dora is false but .* has DoRA magnitude",
    ),
    (
        "lora-embedding-a-without-b",
        add_adapter_tensor("base_model.model.model.embed_tokens.lora_embedding_A", (4, 160)),
        AdapterFormatError,
        "lora_embedding_B' is missing",
    ),
    ("lora-bias-without-flag", add_adapter_tensor(f"{Q_PROJ}.lora_B.bias", (64,)), AdapterFormatError, "lora_bias"),
    (
        "trainable-tokens-without-indices",
        add_adapter_tensor("base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta", (2, 64)),
        AdapterFormatError,
        "trainable_token_indices names no token rows",
    ),
    ("unknown-lora-tensor", add_adapter_tensor(f"{Q_PROJ}.lora_E", (4, 1)), UnsupportedAdapter, "unknown LoRA"),
    (
        "replacement-of-the-wrong-shape",
        add_adapter_tensor("base_model.model.model.norm.weight", (48,)),
        ShapeMismatch,
        r"is \(48,\) but base tensor 'model.norm.weight' is \(64,\)",
    ),
    (
        "replacement-matching-nothing",
        add_adapter_tensor("base_model.model.model.no_such_module.weight", (64,), "module 'model.no_such_module'"),
        KeyMatchError,
        "matches no tensor.*--allow-unused",
    ),
    ("alpha-huge-integer", config_edit(lora_alpha=10**400), AdapterFormatError, "'lora_alpha' must be a finite"),
    ("alpha-5000-digits", adapter_config_text('{"lora_alpha": ' + "9" * 5000 + "}"), AdapterFormatError, "JSON"),
    ("adapter-config-bad-utf8", adapter_config_bad_utf8, AdapterFormatError, "not valid JSON"),
    (
        "rank-pattern-bad-regex",
        config_edit(rank_pattern={"q_proj(": 8}),
        AdapterFormatError,
        "'rank_pattern' key 'q_proj\\(' is not a usable regular expression",
    ),
    ("adapter-header-too-deep", adapter_header_nested_too_deep, AdapterFormatError, "not valid JSON"),
    ("adapter-without-tensors", adapter_without_tensors, AdapterFormatError, "contains no tensors"),
    (
        "lora-factor-1d",
        factor_as(f"{Q_PROJ}.lora_A.weight", lambda t: t[0]),
        AdapterFormatError,
        r"lora_A \(64,\) and lora_B \(64, 4\) are not matrices",
    ),
    (
        "lora-factor-int32",
        factor_as(f"{Q_PROJ}.lora_B.weight", lambda t: t.to(torch.int32)),
        AdapterFormatError,
        "has dtype I32",
    ),
    (
        "lora-factor-ranks-differ",
        factor_as(f"{Q_PROJ}.lora_B.weight", lambda t: t[:, :3]),
        ShapeMismatch,
        "disagree on rank",
    ),
    ("adapter-bin-runs-code", adapter_bin(pickle_running_code), AdapterFormatError, "refused.*nothing was run"),
    (
        "adapter-bin-garbage",
        adapter_bin(lambda path, _: path.write_bytes(b"not a pickle" * 8)),
        AdapterFormatError,
        "not a readable torch file",
    ),
    (
        "adapter-bin-not-a-dict",
        adapter_bin(lambda path, t: torch.save(list(t.values()), path)),
        AdapterFormatError,
        "expected a mapping of names to tensors",
    ),
    ("key-matches-no-base-tensor", module_matching_no_base_tensor, KeyMatchError, "matches no tensor"),
    (
        "hidden-size-mismatch",
        adapter_for_another_hidden_size,
        ShapeMismatch,
        r"'base_model\.model\.[\w.]+' updates a \((48, \d+|\d+, 48)\) weight "
        r"but base tensor '[\w.]+' is \((64, \d+|\d+, 64)\)",
    ),
    ("rank-disagrees-with-config", rank_disagrees_with_config, ShapeMismatch, "has rank 4 but .* r=8"),
    ("base-dir-missing", missing_base_dir, InputNotFound, "not found"),
    ("base-only-config", base_only_config, CheckpointFormatError, "no model.safetensors"),
    ("base-pytorch-bin-with-code", base_pickle_with_code, CheckpointFormatError, "refused, it pickles objects"),
    ("base-only-consolidated-pth", base_only_consolidated_pth, CheckpointFormatError, "only pickle"),
    ("base-config-invalid-json", base_config_invalid_json, CheckpointFormatError, "not valid JSON"),
    ("base-config-nested-too-deep", base_config_nested_too_deep, CheckpointFormatError, "not valid JSON"),
    *[
        (f"base-config-{key}-wrong-type", base_config_field(**{key: value}), CheckpointFormatError, "wrong type")
        for key, value in [
            ("architectures", [1]),
            ("model_type", ["llama"]),
            ("text_config", "x"),
            ("tie_word_embeddings", "yes"),
            ("vocab_size", "160"),
        ]
    ],
    ("base-unknown-dtype", base_unknown_dtype, CheckpointFormatError, "unknown dtype 'Q4_K'"),
    ("base-shard-truncated", base_shard_truncated, CheckpointFormatError, "outside the file"),
    ("index-names-missing-shard", index_names_missing_shard, InputNotFound, "is missing"),
    ("shard-missing-without-index", shard_set_incomplete_without_index, InputNotFound, "is missing"),
    ("index-invalid-json", index_invalid_json, CheckpointFormatError, "not a readable JSON index"),
    ("index-maps-to-wrong-shard", index_maps_tensor_to_wrong_shard, CheckpointFormatError, "is mapped to"),
    ("index-dotdot-path", index_points_outside("dotdot"), CheckpointFormatError, "outside the checkpoint"),
    ("index-absolute-path", index_points_outside("absolute"), CheckpointFormatError, "outside the checkpoint"),
    ("shard-symlink-outside", index_points_outside("symlink"), CheckpointFormatError, "outside the checkpoint"),
    ("max-shard-size-abc", max_shard_size("abc"), MergeError, "not a size: 'abc'"),
    ("max-shard-size-zero", max_shard_size("0"), MergeError, "must be positive"),
]


@pytest.mark.parametrize(("build", "error", "what"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(
    build: Callable[[Sources, Path], Bad], error: type[MergeError], what: str, sources: Sources, tmp_path: Path
) -> None:
    bad = build(sources, tmp_path)
    before = tree(tmp_path)
    output = tmp_path / "out"

    with pytest.raises(MergeError) as raised:
        merge(bad.base, bad.adapter, output, **bad.kwargs)
    assert type(raised.value) is error, f"{type(raised.value).__name__}: {raised.value}"
    message = str(raised.value)
    assert "\n" not in message
    assert str(bad.culprit) in message, f"{bad.culprit} not named in: {message}"
    assert re.search(what, message), message
    assert tree(tmp_path) == before, "the library left something behind (or ran code from a pickle)"

    code, out, err = run_cli(bad, output)
    assert_one_line_error(code, err, bad.culprit, what)
    assert "Done" not in out
    assert tree(tmp_path) == before, "the CLI left something behind"


def test_missing_relative_paths_are_named(sources: Sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing `--adapter outputs/checkpoint-100` looks like a repo id; offline it must still fail cleanly."""
    shutil.copytree(sources.base, tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    for bad in (Bad("base", "outputs/checkpoint-100", "outputs/checkpoint-100"), Bad("models/x", "base", "models/x")):
        with pytest.raises(InputNotFound, match=re.escape(str(bad.culprit))):
            merge(bad.base, bad.adapter, "out")
        code, _, err = run_cli(bad, Path("out"))
        assert_one_line_error(code, err, bad.culprit, "")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_adapters_are_read(sources: Sources, tmp_path: Path, zip_format: bool) -> None:
    """The near miss of the .bin cases above: a plain-tensor .bin, in either torch.save format, merges like the
    safetensors file it was made from."""
    adapter = copy_adapter(sources, tmp_path)
    tensors = load_file(adapter / ADAPTER_WEIGHTS)
    (adapter / ADAPTER_WEIGHTS).unlink()
    torch.save(tensors, adapter / "adapter_model.bin", _use_new_zipfile_serialization=zip_format)
    merge(sources.base, adapter, tmp_path / "from-bin")
    merge(sources.base, sources.adapter, tmp_path / "from-safetensors")
    ours, expected = (
        load_file(tmp_path / "from-bin" / "model.safetensors"),
        load_file(tmp_path / "from-safetensors" / "model.safetensors"),
    )
    assert ours.keys() == expected.keys()
    assert all(torch.equal(ours[k], expected[k]) for k in expected)


def test_invalid_dtype(sources: Sources, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(MergeError, match="--dtype 'f8'"):
        merge(sources.base, sources.adapter, tmp_path / "out", dtype="f8")
    with pytest.raises(SystemExit) as exited:
        run_cli(Bad(sources.base, sources.adapter, ""), tmp_path / "out", "--dtype", "f8")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--dtype" in err and "'f8' is not a dtype" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_left_untouched(sources: Sources, tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "model.safetensors").write_bytes(b"previous model")
    (output / "notes.txt").write_text("keep")
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    with pytest.raises(OutputError, match="--overwrite"):
        merge(sources.base, sources.adapter, output)
    code, _, err = run_cli(Bad(sources.base, sources.adapter, output), output)
    assert_one_line_error(code, err, output, "exists and is not empty.*--overwrite")
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_output_is_a_file(sources: Sources, tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.write_text("not a directory")
    with pytest.raises(OutputError, match="not a directory"):
        merge(sources.base, sources.adapter, output, overwrite=True)
    code, _, err = run_cli(Bad(sources.base, sources.adapter, output), output, "--overwrite")
    assert_one_line_error(code, err, output, "not a directory")
    assert output.read_text() == "not a directory"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_internal_error_exits_1_and_shows_traceback_only_with_debug(
    sources: Sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(qlora_merge.api, "run_plan", broken)
    bad = Bad(sources.base, sources.adapter, "")

    code, _, err = run_cli(bad, tmp_path / "out")
    assert code == 1
    assert "internal error" in err and "RuntimeError: simulated bug" in err and "--debug" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == [], "staging directory left behind"

    code, _, err = run_cli(bad, tmp_path / "out", "--debug")
    assert code == 1
    assert "Traceback" in err and "internal error" in err and "simulated bug" in err
    assert list(tmp_path.iterdir()) == [], "staging directory left behind"


def test_interrupt_exits_130_and_leaves_nothing(
    sources: Sources, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(qlora_merge.api, "run_plan", interrupted)
    code, _, err = run_cli(Bad(sources.base, sources.adapter, ""), tmp_path / "out")
    assert code == 130
    assert err.splitlines() == ["qlora-merge: interrupted; no output was written"]
    assert list(tmp_path.iterdir()) == []
