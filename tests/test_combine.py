"""Several adapters in one pass, one adapter with a weight, and --subtract, against PEFT's own combination.

PEFT's oracle for several adapters is `add_weighted_adapter` + `merge_and_unload()` on a float32 model: in a half
precision model PEFT stores the combined factors and the delta in that precision (two extra roundings), while we
merge in float32 and round once, so a bf16 output equals PEFT's float32 merge rounded to bf16.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from factories import assert_same_tensors, make_adapter, make_base, read_tensors

from qlora_merge import api, merge, publishing, verify
from qlora_merge.cli import adapter_refs, main
from qlora_merge.errors import MergeError, ShapeMismatch, UnsupportedAdapter
from qlora_merge.outputs import upload
from qlora_merge.outputs.upload import UploadError, UploadResult, split_repo_ref


def peft_combined(
    base_dir: Path,
    adapters: list[tuple[Path, float]],
    how: str,
    dtype: torch.dtype = torch.float32,
    combo_scaling: float | None = None,
) -> dict[str, torch.Tensor]:
    """PEFT's add_weighted_adapter(how) of `adapters`, merged and unloaded; `combo_scaling` overrides the new
    adapter's scaling where PEFT's is wrong (rsLoRA: alpha / sqrt(r) of the combined rank)."""
    import transformers
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    names = [f"a{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(model, adapters[0][0], adapter_name=names[0])
    for name, (directory, _) in zip(names[1:], adapters[1:], strict=True):
        peft_model.load_adapter(directory, adapter_name=name)
    peft_model.add_weighted_adapter(names, [w for _, w in adapters], "combo", combination_type=how)
    peft_model.set_adapter("combo")
    if combo_scaling is not None:
        for module in peft_model.modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict) and "combo" in scaling:
                module.scaling["combo"] = combo_scaling
    merged = peft_model.merge_and_unload(adapter_names=["combo"])
    return {name: tensor.detach().clone() for name, tensor in merged.state_dict().items()}


def peft_scaled(base_dir: Path, adapter: Path, weight: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """PEFT's merge of one adapter after `set_scale(weight)` on every LoRA layer."""
    import transformers
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    peft_model = PeftModel.from_pretrained(model, adapter)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale("default", weight)
    merged = peft_model.merge_and_unload()
    return {name: tensor.detach().clone() for name, tensor in merged.state_dict().items()}


def saved_names(tensors: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's state dict restricted to what save_pretrained writes (a tied head is not saved twice)."""
    return {name: tensors[name] for name in ours}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("combine")
    base32 = make_base("llama", root / "base32", dtype=torch.float32)
    base16 = make_base("llama", root / "base16")
    return {
        "base32": base32,
        "base16": base16,
        # different ranks, alphas, targets, a rank_pattern, rsLoRA: cat takes any of them
        "a": make_adapter(base32, root / "a", "llama", seed=1),
        "b": make_adapter(
            base32,
            root / "b",
            "llama",
            seed=2,
            r=8,
            lora_alpha=4,
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={"down_proj": 2},
            alpha_pattern={"q_proj": 3},
        ),
        "c": make_adapter(base32, root / "c", "llama", seed=3, r=4, lora_alpha=16, target_modules=["q_proj", "o_proj"]),
        "rs": make_adapter(base32, root / "rs", "llama", seed=4, r=8, lora_alpha=5, use_rslora=True),
        "dora": make_adapter(base32, root / "dora", "llama", seed=5, use_dora=True),
        "saved": make_adapter(base32, root / "saved", "llama", seed=6, modules_to_save=["lm_head"]),
    }


@pytest.mark.parametrize(
    "names, weights",
    [(("a", "b"), (1.0, 0.5)), (("a", "b", "c"), (0.7, -0.3, 1.25)), (("b", "a"), (2.0, 1.0))],
)
def test_cat_equals_peft_add_weighted_adapter(
    llama: dict[str, Path], tmp_path: Path, names: tuple[str, ...], weights: tuple[float, ...]
) -> None:
    adapters = [(llama[name], weight) for name, weight in zip(names, weights, strict=True)]
    result = merge(llama["base32"], adapters, tmp_path / "out", dtype="f32")
    ours = read_tensors(tmp_path / "out")
    assert_same_tensors(ours, saved_names(peft_combined(llama["base32"], adapters, "cat"), ours))
    assert result.combination == "cat" and result.adapter_weights == weights
    assert [row.adapter_key.split(" ")[0] for row in result.coverage].count("#2") > 0


def test_cat_is_the_weighted_sum_of_the_deltas_rounded_once(llama: dict[str, Path], tmp_path: Path) -> None:
    """A bf16 base and output: PEFT's float32 combination and merge, rounded once to bf16; and within half an
    ulp of the float64 sum W + sum(w_i * s_i * B_i @ A_i)."""
    adapters = [(llama["a"], 1.0), (llama["b"], 0.5)]
    merge(llama["base16"], adapters, tmp_path / "out", dtype="bf16")
    ours = read_tensors(tmp_path / "out")
    reference = peft_combined(llama["base16"], adapters, "cat", dtype=torch.float32)
    assert_same_tensors(ours, {name: reference[name].to(torch.bfloat16) for name in ours})
    base = read_tensors(llama["base16"])
    name = "model.layers.1.mlp.down_proj.weight"
    exact = base[name].double()
    for directory, weight, r, alpha in ((llama["a"], 1.0, 4, 8), (llama["b"], 0.5, 2, 4)):
        factors = read_tensors_file(directory)
        key = "base_model.model.model.layers.1.mlp.down_proj"
        b, a = factors[f"{key}.lora_B.weight"].double(), factors[f"{key}.lora_A.weight"].double()
        exact += weight * alpha / r * (b @ a)
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp(min=torch.finfo(torch.bfloat16).tiny)
    assert ((ours[name].double() - exact).abs() <= ulp).all()


def read_tensors_file(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "adapter_model.safetensors")


def test_linear_equals_peft_linear(llama: dict[str, Path], tmp_path: Path) -> None:
    adapters = [(llama["a"], 0.6), (llama["c"], -0.4)]  # equal ranks; c adapts fewer modules
    merge(llama["base32"], adapters, tmp_path / "out", dtype="f32", combine="linear")
    ours = read_tensors(tmp_path / "out")
    assert_same_tensors(ours, saved_names(peft_combined(llama["base32"], adapters, "linear"), ours))
    # not the sum of the deltas: linear mixes the factors (cross terms), which is why cat is the default
    merge(llama["base32"], adapters, tmp_path / "cat", dtype="f32")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ours[name], read_tensors(tmp_path / "cat")[name])


def test_linear_refuses_different_ranks(llama: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ShapeMismatch, match="--combine linear needs adapters of one rank"):
        merge(llama["base32"], [llama["a"], llama["b"]], tmp_path / "out", combine="linear")
    with pytest.raises(ShapeMismatch, match=r"down_proj' has rank 2 \(rank_pattern\) but the adapters' r is 8"):
        merge(llama["base32"], [llama["rs"], llama["b"]], tmp_path / "out", combine="linear")
    assert not (tmp_path / "out").exists()


def test_rslora_combination_has_scaling_one(llama: dict[str, Path], tmp_path: Path) -> None:
    """PEFT copies use_rslora into the combined adapter, whose scaling becomes r / sqrt(r) = sqrt(r) instead of 1
    (the deltas already carry their own scalings): with that scaling corrected, PEFT's merge is ours."""
    adapters = [(llama["rs"], 1.0), (llama["a"], 0.5)]
    merge(llama["base32"], adapters, tmp_path / "out", dtype="f32")
    ours = read_tensors(tmp_path / "out")
    assert_same_tensors(ours, saved_names(peft_combined(llama["base32"], adapters, "cat", combo_scaling=1.0), ours))
    wrong = peft_combined(llama["base32"], adapters, "cat")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ours[name], wrong[name]), "PEFT's own rsLoRA combination scales by sqrt(r) once more"


@pytest.mark.parametrize("name, weight", [("a", 0.5), ("b", 0.3), ("rs", -1.5), ("dora", 0.75)])
def test_one_weighted_adapter_equals_peft_set_scale(
    llama: dict[str, Path], tmp_path: Path, name: str, weight: float
) -> None:
    merge(llama["base16"], [(llama[name], weight)], tmp_path / "out", dtype="bf16")
    ours = read_tensors(tmp_path / "out")
    assert_same_tensors(ours, saved_names(peft_scaled(llama["base16"], llama[name], weight, torch.bfloat16), ours))


def test_weight_one_is_the_plain_merge(llama: dict[str, Path], tmp_path: Path) -> None:
    merge(llama["base16"], llama["b"], tmp_path / "plain")
    merge(llama["base16"], [(llama["b"], 1.0)], tmp_path / "weighted")
    assert_same_tensors(read_tensors(tmp_path / "weighted"), read_tensors(tmp_path / "plain"))


def test_subtract_recovers_the_base(llama: dict[str, Path], tmp_path: Path) -> None:
    """merged = round(W + d); round(merged - d) is W except where the first rounding lost W's low bits, so every
    element comes back within one ulp of the merged value. Measured against the real base: this test's adapter,
    whose delta is twice the size of W, brings back 56% of adapted elements exactly; one whose delta is ~4% of W
    (closer to a trained adapter) 96%, every other one off by at most half an ulp of the merged value."""
    merge(llama["base16"], llama["a"], tmp_path / "merged")
    result = merge(tmp_path / "merged", llama["a"], tmp_path / "recovered", subtract=True)
    assert result.subtract
    base, recovered = read_tensors(llama["base16"]), read_tensors(tmp_path / "recovered")
    merged = read_tensors(tmp_path / "merged")
    assert sorted(recovered) == sorted(base)
    exact = total = 0
    for name, expected in base.items():
        got = recovered[name]
        assert got.dtype == expected.dtype
        if "proj" not in name:
            assert torch.equal(got, expected), f"{name} is not adapted and must come back unchanged"
            continue
        error = (got.float() - expected.float()).abs()
        one_ulp = merged[name].float().abs() * torch.finfo(torch.bfloat16).eps
        assert (error <= one_ulp + torch.finfo(torch.bfloat16).tiny).all(), name
        exact += int((error == 0).sum())
        total += error.numel()
    assert exact / total > 0.5, f"only {exact / total:.1%} of adapted elements recovered exactly"
    card = (tmp_path / "recovered" / "README.md").read_text()
    assert "subtracted from" in card


def test_subtract_refuses_what_cannot_be_undone(llama: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UnsupportedAdapter, match="DoRA merge cannot be subtracted"):
        merge(llama["base16"], llama["dora"], tmp_path / "out", subtract=True)
    with pytest.raises(UnsupportedAdapter, match=r"replaces a whole tensor.*--subtract"):
        merge(llama["base16"], llama["saved"], tmp_path / "out", subtract=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "adapters, message",
    [
        ([("a", 1.0), ("dora", 1.0)], "cannot be combined with other adapters.*DoRA"),
        ([("a", 1.0), ("saved", 1.0)], "replaces a whole tensor.*combination"),
        ([("saved", 0.5)], "replaces a whole tensor.*weight of 0.5"),
    ],
)
def test_combination_refusals(
    llama: dict[str, Path], tmp_path: Path, adapters: list[tuple[str, float]], message: str
) -> None:
    with pytest.raises(UnsupportedAdapter, match=message):
        merge(llama["base16"], [(llama[name], w) for name, w in adapters], tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "adapter, kwargs, message",
    [
        ([], {}, "no adapter given"),
        ([("a", float("nan"))], {}, "not a finite number"),
        (["a"], {"combine": "svd"}, "--combine 'svd'"),
    ],
)
def test_bad_adapter_arguments(
    llama: dict[str, Path], tmp_path: Path, adapter: list[Any], kwargs: dict[str, Any], message: str
) -> None:
    given = [(llama[item[0]], item[1]) if isinstance(item, tuple) else llama[item] for item in adapter]
    with pytest.raises(MergeError, match=message):
        merge(llama["base16"], given, tmp_path / "out", **kwargs)


def test_each_adapter_is_checked_against_the_base_first(llama: dict[str, Path], tmp_path: Path) -> None:
    """An adapter that does not fit is named by its own file, not as part of the combination."""
    other = make_base("qwen2", tmp_path / "qwen2")
    misfit = make_adapter(other, tmp_path / "misfit", "qwen2", seed=9, target_modules=["q_proj"], r=4)
    config = json.loads((misfit / "adapter_config.json").read_text())
    assert config["r"] == 4
    weights = read_tensors_file(misfit)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    from safetensors.torch import save_file

    weights[key] = torch.zeros(4, 48)  # the wrong in_features for this base
    save_file(weights, misfit / "adapter_model.safetensors")
    with pytest.raises(ShapeMismatch, match=str(misfit)):
        merge(llama["base16"], [llama["a"], misfit], tmp_path / "out")


def test_card_coverage_and_verify_of_a_combination(llama: dict[str, Path], tmp_path: Path) -> None:
    adapters = [(llama["a"], 1.0), (llama["b"], 0.5)]
    result = merge(llama["base16"], adapters, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| adapter 1 | `{llama['a']}`, weight 1 |" in card
    assert f"| adapter 2 | `{llama['b']}`, weight 0.5 |" in card
    assert "| combination | cat" in card
    assert {key.split("/")[0] for key in result.inputs_sha256} == {"adapter 1", "adapter 2", "base"}
    keys = {row.adapter_key for row in result.coverage}
    assert "#1 base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight" in keys
    assert "#2 base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert all(row.target for row in result.coverage)
    assert verify(llama["base16"], adapters, tmp_path / "out").ok
    assert not verify(llama["base16"], [(llama["a"], 1.0), (llama["b"], 0.25)], tmp_path / "out").ok


def run_cli(*args: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([str(arg) for arg in args], out, err)
    return code, out.getvalue(), err.getvalue()


def test_adapter_weights_on_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "odd:2").mkdir()
    assert adapter_refs(["org/style@v1:0.5", "./b:-1", "c", str(tmp_path / "odd:2"), "d:x"]) == [
        ("org/style@v1", 0.5),
        ("./b", -1.0),
        ("c", 1.0),
        (str(tmp_path / "odd:2"), 1.0),  # an existing directory keeps its colon
        ("d:x", 1.0),
    ]


def test_cli_combines_verifies_and_subtracts(llama: dict[str, Path], tmp_path: Path) -> None:
    base, a, b = llama["base16"], llama["a"], llama["b"]
    code, out, err = run_cli("--base", base, "--adapter", a, "--adapter", f"{b}:0.5", "--output", tmp_path / "m")
    assert code == 0, err
    assert f"adapter : {b}  (weight 0.5)" in out and "combine : cat" in out
    assert "2 adapters combined (cat, weights 1, 0.5)" in out
    python = read_tensors(tmp_path / "m")
    merge(base, [a, (b, 0.5)], tmp_path / "api")
    assert_same_tensors(python, read_tensors(tmp_path / "api"))
    verify_flags = ("verify", "--base", base, "--adapter", a, "--merged", tmp_path / "m")
    assert run_cli(*verify_flags, "--adapter", f"{b}:0.5")[0] == 0
    code, _, err = run_cli(*verify_flags, "--adapter", f"{b}:0.25")
    assert code == 3 and "verification failed" in err
    code, out, err = run_cli(
        "--base", tmp_path / "m", "--adapter", f"{b}:0.5", "--output", tmp_path / "s", "--subtract"
    )
    assert code == 0, err
    merge(tmp_path / "m", [(b, 0.5)], tmp_path / "s_api", subtract=True)
    assert_same_tensors(read_tensors(tmp_path / "s"), read_tensors(tmp_path / "s_api"))
    code, _, err = run_cli(
        "--base", base, "--adapter", a, "--adapter", b, "--output", tmp_path / "x", "--combine", "linear"
    )
    assert code == 2 and "--combine linear needs adapters of one rank" in err and not (tmp_path / "x").exists()


def test_subtracting_a_combination_member_leaves_the_other(llama: dict[str, Path], tmp_path: Path) -> None:
    """(a + 0.5 b) - 0.5 b is a merged alone up to the roundings in between: half an ulp of the combined value, half
    an ulp of the result, half an ulp of a's own merge."""
    merge(llama["base16"], [llama["a"], (llama["b"], 0.5)], tmp_path / "m")
    merge(tmp_path / "m", [(llama["b"], 0.5)], tmp_path / "s", subtract=True)
    merge(llama["base16"], llama["a"], tmp_path / "a")
    combined, got, expected = (read_tensors(tmp_path / name) for name in ("m", "s", "a"))
    eps = torch.finfo(torch.bfloat16).eps
    differing = 0
    for name, tensor in expected.items():
        error = (got[name].float() - tensor.float()).abs()
        bound = eps / 2 * (combined[name].float().abs() + got[name].float().abs() + tensor.float().abs())
        assert (error <= bound + torch.finfo(torch.bfloat16).tiny).all(), name
        differing += int((error > 0).sum())
    assert differing > 0, "the roundings in between must show somewhere, else this test proves nothing"


def test_push_to_hub_after_the_merge(llama: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI uploads the finished output (after --verify) with the flags given; an upload that fails leaves the
    merged model in place and says so. push_to_hub itself is tested in test_upload.py."""
    calls: list[dict[str, Any]] = []

    def fake_push(folder: Path, repo_id: str, **kwargs: Any) -> UploadResult:
        calls.append({"folder": folder, "repo_id": repo_id, **kwargs})
        assert (folder / "README.md").is_file() and (folder / "config.json").is_file()
        return UploadResult(repo_id, f"https://hub/{repo_id}/commit/1", "1", 5, 100, True, kwargs["revision"])

    monkeypatch.setattr(publishing, "push_to_hub", fake_push)  # with --verify: publishing.push_verified pushes
    monkeypatch.setattr(upload, "check_push", lambda ref, token=None: split_repo_ref(ref))  # the hub is offline here
    flags = ("--base", llama["base16"], "--adapter", llama["a"], "--output", tmp_path / "m")
    code, out, err = run_cli(
        *flags, "--verify", "--push-to-hub", "me/merged@f16", "--private", "--json", "--hf-token", "t"
    )
    assert code == 0, err
    assert calls == [
        {"folder": tmp_path / "m", "repo_id": "me/merged", "private": True, "token": "t", "revision": "f16"}
    ]
    report = json.loads(out)
    assert report["verified"] is True and report["upload"]["url"] == "https://hub/me/merged/commit/1"

    def failing_push(folder: Path, repo_id: str, **kwargs: Any) -> UploadResult:
        raise UploadError(f"{repo_id}: not logged in to the hub: pass --hf-token or set HF_TOKEN")

    monkeypatch.setattr(upload, "push_to_hub", failing_push)
    code, out, err = run_cli(*flags, "--overwrite", "--push-to-hub", "me/merged")
    assert code == 2 and "not logged in" in err and "only the upload failed" in err
    assert (tmp_path / "m" / "config.json").is_file() and "Done." not in out
    with pytest.raises(SystemExit) as usage:  # --private alone is a usage error
        run_cli(*flags, "--overwrite", "--private")
    assert usage.value.code == 2


@pytest.mark.parametrize(
    ("target", "why"),
    [("me/merged", "HF_HUB_OFFLINE is set"), ("not a repo", "not a hub repo id"), ("me/m@", "empty branch")],
)
def test_a_push_that_cannot_happen_fails_before_the_merge(
    llama: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, target: str, why: str
) -> None:
    """Offline, or a bad repo id or branch: one line before anything is read or written, not after the merge."""
    monkeypatch.setattr(api, "merge", lambda *args, **kwargs: pytest.fail("the merge must not start"))
    code, out, err = run_cli(
        "--base", llama["base16"], "--adapter", llama["a"], "--output", tmp_path / "m", "--push-to-hub", target
    )
    assert code == 2 and len(err.splitlines()) == 1 and why in err, err
    assert out == "" and not (tmp_path / "m").exists()


@pytest.mark.parametrize("how", ["cat", "linear"])
def test_conv1d_and_embedding_loras_combine_as_peft(tmp_path: Path, how: str) -> None:
    """GPT-2's Conv1D layers (stored transposed) and an embedding LoRA (lora_embedding_A/B), both adapters on
    both: PEFT's combination, bit for bit. GPT-2 ties its head to wte: the unmerged model's head never sees the
    embedding LoRA, so the head is written untied with the base's values (PEFT's merge would add the delta to the
    shared tensor, head included: see test_tied.py)."""
    base = make_base("gpt2", tmp_path / "base", dtype=torch.float32)
    modules = ["c_attn", "c_fc", "wte"]
    first = make_adapter(base, tmp_path / "a", "gpt2", seed=1, target_modules=modules)
    second = make_adapter(base, tmp_path / "b", "gpt2", seed=2, target_modules=modules, lora_alpha=3)
    adapters = [(first, 0.8), (second, -0.6)]
    result = merge(base, adapters, tmp_path / "out", dtype="f32", combine=how)
    ours = read_tensors(tmp_path / "out")
    head = ours.pop("lm_head.weight")
    assert torch.equal(head, read_tensors(base)["transformer.wte.weight"])
    assert_same_tensors(ours, saved_names(peft_combined(base, adapters, how), ours))
    assert any("embedding" in row.action for row in result.coverage)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False


def test_mirrored_tied_head_loras_stay_tied_in_a_combination(tmp_path: Path) -> None:
    """ensure_weight_tying saves the tied head's LoRA as the embedding's mirror; combined, the mirror is checked
    adapter by adapter (the combination scales A on both sides, so the combined factors are no transposes), and the
    output stays tied like each adapter's own merge. Every other tensor is PEFT's combination."""
    base = make_base("qwen2", tmp_path / "base", dtype=torch.float32)
    options = {"target_modules": ["embed_tokens", "q_proj"], "ensure_weight_tying": True}
    options["save_embedding_layers"] = False  # a saved copy of the embedding is a whole tensor: not combinable
    first = make_adapter(base, tmp_path / "a", "qwen2", seed=1, **options)
    second = make_adapter(base, tmp_path / "b", "qwen2", seed=2, lora_alpha=5, **options)
    assert any("lm_head.lora" in key for key in read_tensors_file(first)), "PEFT saved the head's mirror LoRA"
    adapters = [(first, 1.0), (second, 0.5)]
    result = merge(base, adapters, tmp_path / "out", dtype="f32")
    ours = read_tensors(tmp_path / "out")
    assert "lm_head.weight" not in ours and "tie_word_embeddings" not in result.config_changes
    reference = peft_combined(base, adapters, "cat")
    shared = sorted(set(ours) - {"model.embed_tokens.weight"})
    assert_same_tensors({n: ours[n] for n in shared}, {n: reference[n] for n in shared})
