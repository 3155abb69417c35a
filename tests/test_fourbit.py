"""Our 4-bit quantization (qlora_merge.fourbit) against bitsandbytes' own, on CPU: codes, absmax, double
quantization and the round trip, value for value, including blocks that span rows, partial last blocks, zero
blocks, ties at the midpoints between codes, and every blocksize bitsandbytes takes.

The oracle for quantization is `bitsandbytes.functional.quantize_4bit(..., compress_statistics=True)`; for
dequantization its reference kernel (see tests/test_bnb_base.py for why not its CPU C kernel).
"""

from __future__ import annotations

import pytest
import torch

from qlora_merge import fourbit

bnb = pytest.importorskip("bitsandbytes")


def reference_roundtrip(weight: torch.Tensor, quant_type: str, blocksize: int) -> torch.Tensor:
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    packed, state = bnb.functional.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=True, quant_type=quant_type
    )
    absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2)
    absmax += state.offset
    compute = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    code = fourbit.code_values(quant_type)
    return compute(packed.reshape(-1), absmax, code, blocksize, weight.shape, weight.dtype)


def weights() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    cases = [
        torch.randn(64, 112, generator=generator),  # blocks of 64 span rows
        torch.randn(33, 70, generator=generator) * 0.02,  # a partial last block
        torch.randn(3, 5, generator=generator),  # smaller than a block, odd count
        torch.randn(300, 256, generator=generator) * 1e-3,  # more than one nested block of 256
    ]
    zeros = torch.randn(8, 64, generator=generator)
    zeros[2:4] = 0  # blocks whose absmax is 0
    cases.append(zeros)
    # values on the midpoints between nf4 codes and next to them: ties go to the lower code
    midpoints = (fourbit.code_values("nf4")[:-1] + fourbit.code_values("nf4")[1:]) / 2
    ties = torch.cat([midpoints, torch.nextafter(midpoints, torch.ones(1)), torch.ones(1)])
    cases.append(ties.repeat(4)[:60].reshape(4, 15))
    return cases


@pytest.mark.parametrize("quant_type", fourbit.QUANT_TYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantization_equals_bitsandbytes(quant_type: str, dtype: torch.dtype) -> None:
    for weight in weights():
        weight = weight.to(dtype)
        for blocksize in (64, 128) if dtype != torch.float32 else (32, 64, 256):
            packed, state = bnb.functional.quantize_4bit(
                weight, blocksize=blocksize, compress_statistics=True, quant_type=quant_type
            )
            flat = weight.reshape(-1)
            partial = flat.numel() % blocksize != 0
            absmax = fourbit.block_absmax(flat, blocksize, partial)
            codes = fourbit.quantize_codes(flat, absmax, blocksize, quant_type, partial)
            assert torch.equal(fourbit.pack(codes, quant_type), packed.reshape(-1)), (weight.shape, blocksize)
            compressed = fourbit.compress_absmax(absmax)
            assert torch.equal(compressed.offset, state.offset)
            assert torch.equal(compressed.codes, state.absmax), (weight.shape, blocksize)
            assert torch.equal(compressed.scales, state.state2.absmax)
            assert torch.equal(fourbit.dynamic_code(), state.state2.code)
            expected = reference_roundtrip(weight, quant_type, blocksize)
            got = fourbit.roundtrip(weight, quant_type, blocksize)
            assert got.dtype == weight.dtype and got.shape == weight.shape
            assert torch.equal(
                got.view(torch.int16 if got.element_size() == 2 else torch.int32),
                expected.view(torch.int16 if got.element_size() == 2 else torch.int32),
            ), (weight.shape, blocksize)


def test_nested_codes_match_the_cpu_kernel_at_its_bin_edges() -> None:
    """bitsandbytes' CPU kernel picks the absmax's 8-bit code through a 65,536-bin table, not the nearest code:
    values at and next to every bin edge (absmax 1, so the normed value is the value) get the kernel's code."""
    edges = ((torch.arange(1, _bins := 65535, 3, dtype=torch.float64) - 0.5) / _bins * 2 - 1).float()
    values = torch.cat([edges, torch.nextafter(edges, torch.ones(1)), torch.nextafter(edges, -torch.ones(1))])
    values = values[: values.numel() // 255 * 255].view(-1, 255)
    blocks = torch.cat([torch.ones(values.shape[0], 1), values], dim=1).reshape(-1)
    ours = fourbit.compress_absmax(blocks)  # centres on the mean first, as quantize_4bit does
    theirs, _ = bnb.functional.quantize_blockwise(blocks - blocks.mean(), blocksize=256)
    assert torch.equal(ours.codes, theirs)
    # the table is not the nearest code: this input tells them apart
    code = fourbit.dynamic_code()
    centred = (blocks - blocks.mean()).view(-1, 256)
    normed = (centred * (1.0 / centred.abs().amax(dim=1)).view(-1, 1)).clamp(-1, 1).reshape(-1)
    nearest = torch.bucketize(normed, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    assert not torch.equal(nearest, theirs)


def test_dynamic_code_is_bitsandbytes() -> None:
    assert torch.equal(fourbit.dynamic_code(), bnb.functional.create_dynamic_map(signed=True))


@pytest.mark.parametrize("quant_type", fourbit.QUANT_TYPES)
def test_code_values_are_bitsandbytes(quant_type: str) -> None:
    assert torch.equal(fourbit.code_values(quant_type), bnb.functional.get_4bit_type(quant_type, device="cpu"))
