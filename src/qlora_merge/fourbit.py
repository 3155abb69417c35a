"""bitsandbytes' 4-bit blockwise quantization (nf4, fp4) and its double quantization, in torch, value for value.

Three users: `--base-quant` round-trips a full-precision base through 4-bit as QLoRA training saw it
(inputs/roundtrip.py), `--requantize` writes a merge as a bitsandbytes checkpoint (outputs/requantize.py), and
`inspect --base` measures what the round trip costs. Each must give what `bitsandbytes.functional.quantize_4bit`
and `dequantize_4bit` give on CPU, so each step below follows what bitsandbytes computes there, in the same
float32 operations in the same order (tests/test_fourbit.py holds every function to bitsandbytes'):

- a weight is flattened and cut into blocks of `blocksize` elements (64 by default) across row ends; each block's
  scale is its largest magnitude (`absmax`); the last, partial block's is clamped to at least 1e-38;
- each value times 1/absmax (the partial block: divided by its absmax), clamped to [-1, 1], takes the code whose
  value is nearest, a tie going to the lower code (bucketize on the midpoints of the sorted code values);
- two codes a byte, the first element in the high nibble; an odd count is padded with the code of 0;
- double quantization: the absmax vector less its mean (the `offset`) is 8-bit quantized in blocks of 256 with the
  signed dynamic code. On CPU bitsandbytes picks each 8-bit code through a 65,536-entry lookup table over
  [-1, 1], which is not always the nearest code; `nested_codes` builds the same table;
- dequantization: code value times the block's (dequantized) absmax in float32, rounded once to the dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

QUANT_TYPES = ("nf4", "fp4")
DEFAULT_BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
# bitsandbytes' 4-bit code values (bitsandbytes.functional.get_4bit_type): the value of each 4-bit code.
CODES = {
    "nf4": (
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ),
    "fp4": (
        0.0,
        0.0052083334885537624,
        0.6666666865348816,
        1.0,
        0.3333333432674408,
        0.5,
        0.1666666716337204,
        0.25,
        0.0,
        -0.0052083334885537624,
        -0.6666666865348816,
        -1.0,
        -0.3333333432674408,
        -0.5,
        -0.1666666716337204,
        -0.25,
    ),
}
# the 8-bit lookup table bitsandbytes' CPU kernel quantizes the absmax with: this many bins over [-1, 1]
_LUT_SIZE = 65536
_TINY = 1e-38  # bitsandbytes' floor for a block scale it divides by


@functools.cache
def code_values(quant_type: str) -> torch.Tensor:
    """The 16 code values of nf4 or fp4, float32."""
    return torch.tensor(CODES[quant_type], dtype=torch.float32)


@functools.cache
def _bounds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between the sorted code values, and the code index of each sorted position."""
    code = code_values(quant_type)
    order = torch.argsort(code)
    return (code[order[:-1]] + code[order[1:]]) / 2, order


@functools.cache
def dynamic_code() -> torch.Tensor:
    """The signed dynamic 8-bit code (Dettmers, "8-bit approximations", 2016) that double quantization stores the
    absmax in: for each exponent e = 0..6, the midpoints of 2**e + 1 even steps over [0.1, 1] scaled by
    10**(e - 6), both signs, then 0 and 1; 256 values, sorted."""
    values: list[float] = []
    for exponent in range(7):
        steps = torch.linspace(0.1, 1, 2**exponent + 1, dtype=torch.float32)
        means = (steps[:-1] + steps[1:]) / 2.0
        scale = 10 ** (exponent - 6)
        values += (scale * means).tolist() + (-scale * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _nested_lut() -> torch.Tensor:
    """The code index for each of the 65,536 bins over [-1, 1]: the number of midpoints of the dynamic code below
    the bin's value, as bitsandbytes' CPU kernel builds its table."""
    code = dynamic_code()
    midpoints = 0.5 * (code[:-1] + code[1:])
    bins = -1.0 + (torch.arange(_LUT_SIZE, dtype=torch.float32) * 2.0) / float(_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, bins, right=False)


def block_absmax(values: torch.Tensor, blocksize: int, partial_tail: bool) -> torch.Tensor:
    """Each block's absmax, float32. `values` is whole blocks, and with `partial_tail` a last, shorter block that
    ends the tensor (its absmax floored at 1e-38, as bitsandbytes stores it)."""
    flat = values.reshape(-1).float()
    full = flat.numel() // blocksize * blocksize if partial_tail else flat.numel()
    absmax = flat[:full].view(-1, blocksize).abs().amax(dim=1)
    if full == flat.numel():
        return absmax
    tail = flat[full:].abs().max().clamp(min=_TINY)
    return torch.cat([absmax, tail.view(1)])


def quantize_codes(
    values: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str, partial_tail: bool
) -> torch.Tensor:
    """The 4-bit code of each value (uint8, 0..15, unpacked), given its blocks' absmax (from `block_absmax`)."""
    flat = values.reshape(-1).float()
    full = flat.numel() // blocksize * blocksize if partial_tail else flat.numel()
    blocks = full // blocksize
    scaled = (flat[:full].view(-1, blocksize) * (1.0 / absmax[:blocks].clamp(min=_TINY)).view(-1, 1)).reshape(-1)
    scaled = scaled.clamp(-1, 1)
    if full < flat.numel():
        scaled = torch.cat([scaled, (flat[full:] / absmax[blocks]).clamp(-1, 1)])
    bounds, order = _bounds(quant_type)
    codes = torch.bucketize(scaled, bounds, out_int32=True)
    if quant_type != "nf4":
        codes = order[codes]
    return codes.to(torch.uint8)


def zero_code(quant_type: str) -> int:
    """The code of 0.0, which pads an odd count of codes."""
    return int(quantize_codes(torch.zeros(1), torch.ones(1), 1, quant_type, partial_tail=False)[0])


def pack(codes: torch.Tensor, quant_type: str) -> torch.Tensor:
    """Two codes a byte, the first in the high nibble; an odd count padded with the code of 0."""
    if codes.numel() % 2:
        codes = torch.cat([codes, torch.tensor([zero_code(quant_type)], dtype=torch.uint8)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack(packed: torch.Tensor) -> torch.Tensor:
    codes = torch.empty(packed.numel() * 2, dtype=torch.uint8)
    codes[0::2] = packed >> 4
    codes[1::2] = packed & 0xF
    return codes


def dequantize_codes(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, quant_type: str) -> torch.Tensor:
    """Float32 values of codes that start at a block boundary: code value times its block's absmax."""
    values = code_values(quant_type)[codes.to(torch.int64)]
    scales = absmax.repeat_interleave(blocksize)[: values.numel()]
    return values * scales


@dataclass(frozen=True)
class CompressedAbsmax:
    """Double quantization of a weight's absmax vector: 8-bit codes, one float32 scale per 256 of them, and the
    mean that was taken out first."""

    codes: torch.Tensor  # uint8, one per 4-bit block
    scales: torch.Tensor  # float32, one per NESTED_BLOCKSIZE codes
    offset: torch.Tensor  # float32 scalar

    def expand(self) -> torch.Tensor:
        """The absmax the 4-bit values are dequantized with: code value times scale, plus the offset."""
        values = dynamic_code()[self.codes.to(torch.int64)]
        values = values * self.scales.repeat_interleave(NESTED_BLOCKSIZE)[: values.numel()]
        return values + self.offset


def compress_absmax(absmax: torch.Tensor) -> CompressedAbsmax:
    """The whole absmax vector of one weight, double-quantized as bitsandbytes does on CPU."""
    offset = absmax.mean()
    centred = absmax - offset
    count = centred.numel()
    padded = torch.nn.functional.pad(centred, (0, -count % NESTED_BLOCKSIZE)).view(-1, NESTED_BLOCKSIZE)
    # a NaN lane counts as 0 for the scale, so one NaN does not spoil its block's
    scales = torch.nan_to_num(padded.abs(), nan=0.0).amax(dim=1)
    inverse = torch.where(scales == 0, torch.zeros_like(scales), 1.0 / scales)
    normed = (padded * inverse.view(-1, 1)).clamp(-1, 1)
    # the kernel's bin: ((v + 1) * 0.5) * 65535 + 0.5, truncated, each step rounded to float32
    bins = ((normed + 1.0) * 0.5 * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)
    codes = _nested_lut()[bins].to(torch.uint8)
    codes = torch.where((scales == 0).view(-1, 1), torch.zeros_like(codes), codes)
    return CompressedAbsmax(codes.reshape(-1)[:count].clone(), scales, offset)


def roundtrip(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = DEFAULT_BLOCKSIZE) -> torch.Tensor:
    """dequantize_4bit(quantize_4bit(weight, compress_statistics=True)) in the weight's dtype: the weight as a
    QLoRA model trained on it saw it. Whole tensor at once (inspection, tests); the merge streams it by blocks
    (inputs/roundtrip.py)."""
    flat = weight.reshape(-1)
    partial = flat.numel() % blocksize != 0
    absmax = block_absmax(flat, blocksize, partial)
    codes = quantize_codes(flat, absmax, blocksize, quant_type, partial)
    values = dequantize_codes(codes, compress_absmax(absmax).expand(), blocksize, quant_type)
    return values.to(weight.dtype).reshape(weight.shape)
