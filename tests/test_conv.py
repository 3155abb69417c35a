"""Convolution LoRA and DoRA (nn.Conv1d / nn.Conv2d factors A (r, in, *kernel), B (out, r, 1 ...)): merged tensor
by tensor bit-identical to PEFT's merge_and_unload(), on a tiny ResNet (7x7, 3x3 and 1x1 Conv2d) and a tiny
wav2vec2 feature encoder (Conv1d)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from factories import assert_same_tensors, read_tensors

from qlora_merge import merge, verify
from qlora_merge.errors import MergeError
from qlora_merge.merging.variants import conv_delta


def tiny(kind: str) -> Any:
    import transformers

    if kind == "resnet":
        config = transformers.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck", num_labels=3
        )
        return transformers.ResNetForImageClassification(config), ["convolution"]
    config = transformers.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        vocab_size=12,
    )
    # the feature encoder's Conv1d layers (the positional conv has groups > 1, which PEFT cannot merge)
    return transformers.Wav2Vec2ForCTC(config), [r"wav2vec2\.feature_extractor\.conv_layers\.\d+\.conv"]


def make(kind: str, tmp: Path, dtype: torch.dtype, **lora: Any) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """Base and adapter on disk, and PEFT's merge of them (the model loaded in `dtype`)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    model, target = tiny(kind)
    model = model.to(dtype)
    base = tmp / "base"
    model.save_pretrained(base)
    cls = type(model)
    targets: Any = target[0] if kind == "wav2vec2" else target
    peft_model = get_peft_model(
        cls.from_pretrained(base, dtype=torch.float32), LoraConfig(r=4, lora_alpha=8, target_modules=targets, **lora)
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + torch.randn(param.shape, generator=generator) * 0.1)
            elif "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    adapter = tmp / "adapter"
    peft_model.save_pretrained(adapter)
    merged = PeftModel.from_pretrained(cls.from_pretrained(base, dtype=dtype), adapter).merge_and_unload()
    merged.save_pretrained(tmp / "peft")
    return base, adapter, read_tensors(tmp / "peft")


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize(("dtype", "name"), [(torch.float32, "f32"), (torch.bfloat16, "bf16")])
@pytest.mark.parametrize("kind", ["resnet", "wav2vec2"])
def test_conv_lora_is_bit_identical_to_peft(
    tmp_path: Path, kind: str, dtype: torch.dtype, name: str, dora: bool
) -> None:
    from safetensors.torch import load_file

    base, adapter, reference = make(kind, tmp_path, dtype, use_dora=dora)
    assert any("lora_magnitude_vector" in key for key in load_file(adapter / "adapter_model.safetensors")) == dora
    out = tmp_path / "out"
    result = merge(str(base), str(adapter), str(out), dtype=name)
    ours = read_tensors(out)
    assert_same_tensors(ours, reference)
    kernels = {tuple(ours[n].shape[2:]) for n in ours if n.endswith(".weight") and ours[n].dim() > 2 and n in reference}
    changed = [n for n in ours if not torch.equal(ours[n], read_tensors(base)[n].to(ours[n].dtype))]
    assert result.tensors_merged == len(changed) > 0
    if kind == "resnet":
        assert {(7, 7), (3, 3), (1, 1)} <= kernels
    assert verify(str(base), str(adapter), str(out)).ok


def test_conv_delta_matches_peft_layers() -> None:
    """conv_delta against PEFT's own get_delta_weight, for Conv1d and Conv2d, 1x1 and wider kernels."""
    from peft import LoraConfig, get_peft_model

    for layer in (
        torch.nn.Conv2d(6, 10, 3),
        torch.nn.Conv2d(6, 10, 1),
        torch.nn.Conv2d(6, 10, (1, 3)),
        torch.nn.Conv1d(6, 10, 5),
        torch.nn.Conv1d(6, 10, 1),
    ):
        model = get_peft_model(torch.nn.Sequential(layer), LoraConfig(r=4, lora_alpha=5, target_modules=["0"]))
        lora = model.base_model.model[0]
        with torch.no_grad():
            lora.lora_B["default"].weight.normal_()
        expected = lora.get_delta_weight("default")
        got = conv_delta(lora.lora_A["default"].weight, lora.lora_B["default"].weight, 5 / 4)
        assert torch.equal(got, expected), layer


def test_conv_lora_on_a_wrong_kernel_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    base, adapter, _ = make("resnet", tmp_path, torch.float32)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("lora_A.weight") and tensors[k].shape[2:] == (3, 3))
    tensors[key] = tensors[key][:, :, :2, :2].contiguous()
    save_file(tensors, weights)
    with pytest.raises(MergeError, match=r"updates a \(\d+, \d+, 2, 2\) weight but base tensor"):
        merge(str(base), str(adapter), str(tmp_path / "out"), dtype="f32")
