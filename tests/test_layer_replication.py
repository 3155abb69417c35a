"""layer_replication: the replicated layers are materialised, each with its own delta; the oracle is the unmerged
PeftModel's logits (PEFT's merge_and_unload adds every copy's delta into the one shared weight, which is wrong)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from factories import logits, make_adapter, make_base, read_config, read_tensors

from qlora_merge import merge, verify
from qlora_merge.errors import MergeError

PROMPT = [1, 5, 9, 33, 70, 2, 101, 7]


def unmerged_logits(base: Path, adapter: Path) -> torch.Tensor:
    """The unmerged PeftModel's logits in float32. PEFT's replicate_layers sets num_hidden_layers but leaves
    `layer_types` at the base's length (qwen3 then fails with an IndexError): it is extended as the merge does."""
    import transformers
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    layer_types = model.config.layer_types if hasattr(model.config, "layer_types") else None
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    if layer_types is not None:
        mapping = [i for start, end in peft_model.peft_config["default"].layer_replication for i in range(start, end)]
        model.config.layer_types = [layer_types[i] for i in mapping]
    with torch.no_grad():
        return peft_model(input_ids=torch.tensor([PROMPT])).logits


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma"])
def test_replicated_layers_reproduce_the_unmerged_adapter(tmp_path: Path, arch: str) -> None:
    import transformers

    base = make_base(arch, tmp_path / "base", dtype=torch.float32)
    ranges = [[0, 2], [1, 2], [0, 1]]  # base layers 0, 1, 1, 0
    adapter = make_adapter(base, tmp_path / "adapter", arch, layer_replication=ranges)
    out = tmp_path / "out"
    merge(str(base), str(adapter), str(out), dtype="f32")
    assert verify(str(base), str(adapter), str(out)).ok

    config = read_config(out)
    assert config["num_hidden_layers"] == 4
    if "layer_types" in read_config(base):
        assert config["layer_types"] == [read_config(base)["layer_types"][i] for i in (0, 1, 1, 0)]
    tensors = read_tensors(out)
    base_tensors = read_tensors(base)
    assert {n.split(".")[2] for n in tensors if n.startswith("model.layers.")} == {"0", "1", "2", "3"}
    # the norms are shared copies; the adapted projections differ between copies of one base layer
    assert torch.equal(
        tensors["model.layers.3.input_layernorm.weight"], base_tensors["model.layers.0.input_layernorm.weight"]
    )
    assert not torch.equal(
        tensors["model.layers.3.self_attn.q_proj.weight"], tensors["model.layers.0.self_attn.q_proj.weight"]
    )

    expected = unmerged_logits(base, adapter)
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert merged.config.num_hidden_layers == 4
    got = logits(out)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, logits(base), atol=1e-3), "the adapter must change the logits"


def test_replication_beyond_the_base_layers_is_refused(tmp_path: Path) -> None:
    import json

    base = make_base("llama", tmp_path / "base", dtype=torch.float32)
    adapter = make_adapter(base, tmp_path / "adapter", "llama", layer_replication=[[0, 2], [1, 2]])
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["layer_replication"] = [[0, 2], [1, 3]]
    config_path.write_text(json.dumps(config))
    with pytest.raises(MergeError, match="names layer 2, but the base has 2 layers"):
        merge(str(base), str(adapter), str(tmp_path / "out"), dtype="f32")
    assert not (tmp_path / "out").exists()


def test_the_decoder_layer_list_is_replicated_not_an_extra_head() -> None:
    """A multimodal checkpoint with a one-layer `mtp.layers` beside the language model's layers: the longest list
    is the decoder's. Copies read the base layer's bytes; other tensors keep their place."""
    from qlora_merge.inputs.format import TensorEntry
    from qlora_merge.inputs.index import CheckpointIndex
    from qlora_merge.plan.replication import replicate_layers

    names = [
        "model.language_model.embed_tokens.weight",
        *(f"model.language_model.layers.{i}.{p}.weight" for i in range(3) for p in ("norm", "proj")),
        "mtp.layers.0.proj.weight",
        "model.visual.blocks.0.proj.weight",
    ]
    entries = {n: TensorEntry(n, "F32", (2,), Path("w.safetensors"), 8 * i, 8 * i + 8) for i, n in enumerate(names)}
    base = CheckpointIndex(root=Path("."), files=(), tensors=entries)
    config = {"num_hidden_layers": 3, "text_config": {"layer_types": ["a", "b", "c"]}}
    replicated, changes = replicate_layers(base, config, ((0, 3), (2, 3), (1, 2)), Path("adapter"))
    assert changes == {"num_hidden_layers": 5, "layer_types": ["a", "b", "c", "c", "b"]}
    layers = [n for n in replicated.tensors if ".layers." in n and n.startswith("model.")]
    assert [n.split(".")[3] for n in layers] == ["0", "0", "1", "1", "2", "2", "3", "3", "4", "4"]
    assert (
        replicated.tensors["model.language_model.layers.3.proj.weight"].start
        == entries["model.language_model.layers.2.proj.weight"].start
    )
    assert (
        replicated.tensors["model.language_model.layers.4.norm.weight"].start
        == entries["model.language_model.layers.1.norm.weight"].start
    )
    order = list(replicated.tensors)
    assert order[:1] == names[:1] and order[-2:] == names[-2:]
