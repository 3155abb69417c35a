"""Small hostile inputs that used to hang or blow up (issue 17.11): regular expressions in adapter_config.json that
backtrack catastrophically, twenty thousand rank_pattern keys, and a YAML alias bomb in an axolotl config. Each
runs under a deadline (SIGALRM interrupts even a regex match), so a regression fails instead of hanging."""

from __future__ import annotations

import json
import random
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import read_tensors
from tiny_checkpoints import llama_checkpoint

from qlora_merge import inspect_adapter, merge, read_axolotl_config
from qlora_merge.adapter.automaton import Automaton as _Automaton
from qlora_merge.adapter.patterns import PatternKeys, SafeRegex, _parse
from qlora_merge.adapter.selection import layer_number
from qlora_merge.errors import AdapterFormatError, MergeError, UnsupportedAdapter


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def expired(*_: object) -> None:
        raise TimeoutError(f"took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return llama_checkpoint(tmp_path_factory.mktemp("tiny"), layers=2)


@pytest.fixture(scope="module")
def plain_merge(tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    base, adapter = tiny
    out = tmp_path_factory.mktemp("plain") / "out"
    merge(base, adapter, out, dtype="f32")
    return read_tensors(out)


def with_config(adapter: Path, tmp_path: Path, **fields: Any) -> Path:
    copy = tmp_path / "adapter"
    copy.mkdir(parents=True)
    config = json.loads((adapter / "adapter_config.json").read_text()) | fields
    (copy / "adapter_config.json").write_text(json.dumps(config))
    (copy / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    return copy


HOSTILE = ["(.*.*)*X", ".*.*.*.*.*.*.*.*.*.*.*.*X", "(a|a)*(b|b)*(.|.)*X", "(\\w+\\.?)+X"]


@pytest.mark.parametrize("key", HOSTILE)
def test_hostile_pattern_keys_are_matched_in_bounded_time(
    key: str, tiny: tuple[Path, Path], plain_merge: dict[str, Any], tmp_path: Path
) -> None:
    """rank_pattern/alpha_pattern keys that match nothing after backtracking for hours (> 90 s before)."""
    base, adapter = tiny
    hostile = with_config(adapter, tmp_path, rank_pattern={key: 8}, alpha_pattern={key: 3})
    with deadline(2):
        report = inspect_adapter(hostile, base)
        merge(base, hostile, tmp_path / "out", dtype="f32")
    assert report.base_matches and not report.module_scaling
    ours = read_tensors(tmp_path / "out")
    assert all(ours[name].equal(tensor) for name, tensor in plain_merge.items())


def test_hostile_pattern_that_matches_applies(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """The bounded matcher gives re's answer: `(.*.*)*q_proj` is `q_proj` for every module name."""
    base, adapter = tiny
    hostile = with_config(adapter, tmp_path / "h", alpha_pattern={"(.*.*)*q_proj": 3, "(.*.*)*Z": 5})
    plain = with_config(adapter, tmp_path / "p", alpha_pattern={"q_proj": 3})
    with deadline(2):
        merge(base, hostile, tmp_path / "hostile", dtype="f32")
    merge(base, plain, tmp_path / "plain", dtype="f32")
    ours, expected = read_tensors(tmp_path / "hostile"), read_tensors(tmp_path / "plain")
    assert all(ours[name].equal(tensor) for name, tensor in expected.items())


@pytest.mark.parametrize("field", ["exclude_modules", "target_modules"])
def test_hostile_regex_strings_are_bounded(field: str, tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """target_modules and exclude_modules as regex strings (fullmatch): a hostile one fails on every name."""
    base, adapter = tiny
    hostile = with_config(adapter, tmp_path, **{field: "(.*.*)*X"})
    with deadline(2):
        if field == "exclude_modules":  # excludes nothing: merges every module
            assert merge(base, hostile, tmp_path / "out", dtype="f32").tensors_merged == 14
        else:  # selects nothing
            with pytest.raises(AdapterFormatError, match="selects none of the 14 LoRA modules"):
                merge(base, hostile, tmp_path / "out", dtype="f32")


def test_unboundable_patterns_are_refused_by_name(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """A pattern past the step budget that only the backtracking matcher runs (a lookaround, a backreference)."""
    base, adapter = tiny
    cases = [
        ({"exclude_modules": "(?=m)(.*.*)*X"}, r"'exclude_modules' '\(\?=m\)\(\.\*\.\*\)\*X'.*lookaround"),
        ({"rank_pattern": {"(.)(.*.*)*\\1X": 2}}, r"'rank_pattern'.*backreference"),
        ({"layers_to_transform": [0], "layers_pattern": "(.*.*)*layers"}, r"'layers_pattern'"),
    ]
    for index, (fields, message) in enumerate(cases):
        hostile = with_config(adapter, tmp_path / str(index), **fields)
        with deadline(2), pytest.raises(UnsupportedAdapter, match=message):
            merge(base, hostile, tmp_path / "out", dtype="f32")


def test_twenty_thousand_pattern_keys(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """PEFT-style full-name keys (21 s in inspect before): plain keys are looked up, not run as regexes."""
    base, adapter = tiny
    keys = {f"model.layers.{i}.self_attn.q_proj": 2 for i in range(2, 20_002)}
    keys["layers.1.mlp.down_proj"] = 3
    many = with_config(adapter, tmp_path, alpha_pattern=keys)
    with deadline(3):
        report = inspect_adapter(many, base)
        merge(base, many, tmp_path / "out", dtype="f32")
    assert report.module_scaling == {"model.layers.1.mlp.down_proj": 0.75}


def test_plain_keys_keep_peft_semantics() -> None:
    """A plain key's `.` is a wildcard, it matches the whole name or a tail after a dot, and the first key in the
    file's order wins, whether plain or a regex."""
    keys = PatternKeys(["layers.0", "q_proj", r"\d\.self_attn\.q_proj", "attn.q_proj"])
    assert keys.first("model.layers_0") == "layers.0"
    assert keys.first("model.layers.0") == "layers.0"
    assert keys.first("model.xlayers.0") is None
    assert keys.first("model.layers.3.self_attn.q_proj") == "q_proj"
    assert keys.all("model.layers.3.self_attn.q_proj") == ["q_proj", r"\d\.self_attn\.q_proj"]
    assert keys.first("q_proj") == "q_proj"
    assert keys.first("a.q_proj\n") == "q_proj", "`$` matches before a final newline"
    for module in ["model.layers.0", "x.q_proj", "x_q_proj", "a.attn.q_proj", "attn_q_proj", "layers.0\n.q"]:
        expected = next((k for k in keys.keys if re.match(rf"(.*\.)?({k})$", module)), None)
        assert keys.first(module) == expected, module


def test_automaton_agrees_with_re() -> None:
    """The linear-time matcher's yes/no answer equals re's on random patterns and texts (anchors, word
    boundaries, classes, lazy and counted repeats, scoped flags)."""
    rng = random.Random(0)
    atoms = ["a", "b", ".", "A", r"\.", "[ab]", "[^a]", r"\d", r"\w", r"\W", "[a-c_]", "_", "\n", r"\s"]
    anchors = ["^", "$", r"\b", r"\B", r"\A", r"\Z"]

    def pattern(depth: int = 0) -> str:
        parts = []
        for _ in range(rng.randint(1, 4)):
            roll = rng.random()
            if roll < 0.5 or depth > 2:
                parts.append(rng.choice(atoms))
            elif roll < 0.65:
                parts.append(f"({pattern(depth + 1)})")
            elif roll < 0.75:
                parts.append(f"(?:{pattern(depth + 1)}|{pattern(depth + 1)})")
            elif roll < 0.85:
                parts.append(rng.choice(anchors))
                continue
            else:
                parts.append(f"(?{rng.choice('ism')}:{pattern(depth + 1)})")
            if rng.random() < 0.35:
                parts[-1] += rng.choice(["*", "+", "?", "*?", "+?", "??", "{2}", "{1,3}", "{0,2}?", "{2,}"])
        return "".join(parts)

    checked = 0
    started = time.monotonic()
    while checked < 6000:
        text = pattern()
        if rng.random() < 0.2:
            text = f"(?{rng.choice('ims')}){text}"
        try:
            compiled = re.compile(text)
        except re.error:
            continue
        automaton = _Automaton(_parse(text))
        for _ in range(5):
            subject = "".join(rng.choice("abA._1 \nB") for _ in range(rng.randint(0, 8)))
            assert automaton.run(subject, False) == (compiled.match(subject) is not None), (text, subject)
            assert automaton.run(subject, True) == (compiled.fullmatch(subject) is not None), (text, subject)
            checked += 2
    assert time.monotonic() - started < 5


def test_layer_numbers_as_peft_finds_them() -> None:
    """layers_to_transform's layer number, found without a regex engine, is the one PEFT's regexes find."""
    rng = random.Random(1)
    for _ in range(20_000):
        key = "".join(rng.choice("ab.1.2.\nlx") for _ in range(rng.randint(0, 14)))
        pattern = rng.choice([None, "a", "b.", "l", ".", "ab", "x.a"])
        if pattern is None:
            found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            found = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
        assert layer_number(key, pattern) == (found.group("idx") if found else None), (key, pattern)
    assert layer_number("model.layers.3.mlp.experts.7.w1", "layers") == "3"
    assert layer_number("model.layers.3.mlp.experts.7.w1", None) == "3"
    assert layer_number("h.3.attn", None) is None


def test_long_module_names_with_every_selection_field(tmp_path: Path) -> None:
    """A hostile adapter file's module names can be any length: selection stays linear in them."""
    from safetensors.torch import save_file

    base = tmp_path / "base"
    base.mkdir()
    name = "model." + "x" * 200_000 + ".layers.0.q_proj"
    save_file({f"{name}.weight": torch.ones(4, 4)}, base / "model.safetensors")
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    factors = {"lora_A.weight": torch.ones(2, 4), "lora_B.weight": torch.ones(4, 2)}
    save_file({f"base_model.model.{name}.{k}": v for k, v in factors.items()}, adapter / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 2,
        "target_modules": ["q_proj"],
        "exclude_modules": "(.*.*)*X",
        "layers_to_transform": [0],
        "layers_pattern": "layers",
        "modules_to_save": ["lm_head"],
        "rank_pattern": {"(.*.*)*Y": 4, "q_proj": 2},
    }
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with deadline(2):
        assert merge(base, adapter, tmp_path / "out", dtype="f32").tensors_merged == 1


def test_safe_regex_uses_re_within_budget() -> None:
    """Ordinary patterns (PEFT's own, unsloth's target_modules) run on re for names of any realistic length."""
    assert SafeRegex(r"(.*\.)?(layers\.\d+\.self_attn\.q_proj)$").safe_length > 100
    assert SafeRegex(r"(?:^|.*?\.)layers\.(?P<idx>\d+)\.").safe_length > 100
    assert SafeRegex("(.*.*)*X").safe_length < 10
    unsloth = (
        r"(?:.*?(?:language|text).*?(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense).*?"
        r"(?:k_proj|v_proj|q_proj|out_proj|fc1|fc2|o_proj|gate_proj|up_proj|down_proj).*?)|(?:\bmodel\.layers\.[\d]{1,}"
        r"\.(?:self_attn|attention|attn|mlp|feed_forward|ffn|dense)\.(?:(?:k_proj|v_proj|q_proj|out_proj|fc1|fc2|o_proj|"
        r"gate_proj|up_proj|down_proj)))"
    )
    regex = SafeRegex(unsloth)
    names = [f"model.language_model.layers.{i}.{m}" for i in range(500) for m in ("self_attn.q_proj", "mlp.gate")]
    names += [f"model.layers.{i}.mlp.down_proj" for i in range(500)] + ["x" * 300]
    with deadline(2):
        assert [regex.fullmatch(name) for name in names] == [re.fullmatch(unsloth, name) is not None for name in names]


def test_yaml_alias_bomb_is_refused(tmp_path: Path) -> None:
    """A few hundred bytes of nested aliases (9^7 strings here; 9^9 took 60 s and 8.4 GB before): refused at once."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, name in zip("abcdef", "bcdefg", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    lines.append("base_model: *g\noutput_dir: out")
    config = tmp_path / "bomb.yml"
    config.write_text("\n".join(lines))
    assert len(config.read_bytes()) < 600
    with deadline(1.5), pytest.raises(MergeError, match=r"YAML aliases expand to over 100,000 values") as raised:
        read_axolotl_config(config)
    assert len(str(raised.value)) < 300
    config.write_text("a: &a [1, *a]\nbase_model: x\noutput_dir: y\n")
    with pytest.raises(MergeError, match="refer to themselves"):
        read_axolotl_config(config)
    config.write_text("defaults: &d {bf16: true}\n<<: *d\nbase_model: x\noutput_dir: y\n")
    assert read_axolotl_config(config).dtype == "bf16", "ordinary aliases still work"


def test_long_yaml_values_are_cut_in_errors(tmp_path: Path) -> None:
    config = tmp_path / "long.yml"
    config.write_text("base_model: [" + ", ".join(["x"] * 50_000) + "]\noutput_dir: out\n")
    with pytest.raises(MergeError, match=r"'base_model' must be a path or repo id, got \['x', 'x'.*\.\.\.$") as raised:
        read_axolotl_config(config)
    assert len(str(raised.value)) < 300
