"""The fused elementwise step of a merge, out = round(float(W) + delta * s), from the compiled `fused.c`, with the
torch sequence it replaces as the fallback.

The library is optional (built with the package where a C compiler is at hand) and untrusted until checked: on the
first use of each pair of weight and output dtypes it runs on a block of special values (ties, NaN, infinities,
subnormals, float16 overflow, random values) and must give torch's bits, or that pair falls back to torch for the
rest of the process. QLORA_MERGE_FUSED=0 turns it off.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_NAMES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}
_VERSION = 1


@functools.cache  # once per process: the library, or None for the torch sequence
def _load() -> ctypes.CDLL | None:
    if os.environ.get("QLORA_MERGE_FUSED", "1") == "0":
        return None
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_fused{suffix}"
        if path.is_file():
            break
    else:
        log.debug("no compiled fused merge next to %s; merging with torch", here)
        return None
    try:
        library = ctypes.CDLL(str(path))
        if library.qm_version() != _VERSION:
            log.info("%s is from another version of qlora-merge; merging with torch", path)
            return None
    except (OSError, AttributeError) as error:
        log.info("cannot load %s (%s); merging with torch", path, error)
        return None
    for w in _NAMES.values():
        for o in _NAMES.values():
            function = getattr(library, f"qm_merge_{w}_{o}")
            function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_int64]
            function.restype = ctypes.c_int64
    return library


class FusedMerge:
    """out <- round(float(weight) + delta * scale), counting the non-finite values written; None where the pair of
    dtypes is not served by the compiled kernel (the caller runs the torch sequence)."""

    def __init__(self) -> None:
        self._trusted: dict[tuple[torch.dtype, torch.dtype], bool] = {}

    def available(self, weight: torch.dtype, out: torch.dtype) -> bool:
        key = (weight, out)
        if key not in self._trusted:
            compiled = self._function(weight, out) is not None
            self._trusted[key] = compiled and _self_test(self, weight, out)
            if compiled and not self._trusted[key]:
                log.info("the fused merge differs from torch for %s -> %s on this machine; merging with torch", *key)
        return self._trusted[key]

    def _function(self, weight: torch.dtype, out: torch.dtype) -> ctypes._CFuncPtr | None:
        library = _load()
        if library is None or weight not in _NAMES or out not in _NAMES:
            return None
        return getattr(library, f"qm_merge_{_NAMES[weight]}_{_NAMES[out]}")

    def run(self, weight: torch.Tensor, delta: torch.Tensor, scale: float, out: torch.Tensor) -> int:
        """The kernel itself, unchecked: contiguous tensors of one length, delta float32. Returns how many of the
        values written are NaN or infinite."""
        function = self._function(weight.dtype, out.dtype)
        assert function is not None
        n = weight.numel()
        if not (delta.numel() == out.numel() == n and delta.dtype == torch.float32):
            raise ValueError("fused merge: tensors of different lengths, or a delta that is not float32")
        if not (weight.is_contiguous() and delta.is_contiguous() and out.is_contiguous()):
            raise ValueError("fused merge: tensors must be contiguous")
        return int(function(weight.data_ptr(), delta.data_ptr(), scale, out.data_ptr(), n))


def reference(weight: torch.Tensor, delta: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """The torch sequence the kernel replaces, as the merge runs it (and PEFT computes it): the delta scaled in
    float32, W widened and added in float32, rounded once into `out`. Returns the float32 sum."""
    total = (delta * scale).add_(weight.float())
    out.copy_(total)
    return total


def special_values(count: int = 1 << 14, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight float32, delta float32) covering what rounding can get wrong: exact ties for bfloat16 and float16,
    values next to them, signed zeros, NaN, infinities, float32 and float16 subnormals, float16's edge (65504,
    65520) and overflow, and random values over every binade."""
    generator = torch.Generator().manual_seed(seed)
    # random bit patterns: every exponent, every mantissa
    bits = torch.randint(-(2**31), 2**31 - 1, (count,), generator=generator, dtype=torch.int64).to(torch.int32)
    weight = bits.view(torch.float32).clone()
    delta = torch.randn(count, generator=generator) * torch.exp2(torch.randint(-30, 30, (count,), generator=generator))
    edges = torch.tensor(
        [0.0, -0.0, float("nan"), float("inf"), float("-inf"), 65504.0, 65520.0, 65519.99, 65536.0, -65520.0,
         1e-45, -1e-45, 1e-40, 5.96e-8, 2.98e-8, 2.99e-8, 6.1e-5, 6.097e-5, 3.4e38, -3.4e38, 1.0, -1.0],
    )  # fmt: skip
    # float32 values exactly halfway between two bfloat16 values (low 16 bits 0x8000) and two float16 values
    # (low 13 bits 0x1000 in float16's normal range), rounded to even or away
    halves = torch.randint(0, 1 << 15, (1024,), generator=generator, dtype=torch.int32)
    bf16_ties = ((halves << 16) | 0x8000).view(torch.float32)
    f16_exponents = torch.randint(113, 143, (1024,), generator=generator, dtype=torch.int32)
    mantissas = torch.randint(0, 1 << 10, (1024,), generator=generator, dtype=torch.int32)
    f16_ties = ((f16_exponents << 23) | (mantissas << 13) | 0x1000).view(torch.float32)
    f16_subnormal_ties = (torch.arange(1, 1025, dtype=torch.float32) + 0.5) * 2.0**-24
    specials = torch.cat([edges, bf16_ties, f16_ties, f16_subnormal_ties, -f16_ties])
    weight = torch.cat([weight, specials, torch.zeros_like(specials)])
    delta = torch.cat([delta, torch.zeros_like(specials), specials])
    return weight, delta


def _self_test(fused: FusedMerge, weight_dtype: torch.dtype, out_dtype: torch.dtype) -> bool:
    """The kernel against torch on special values, for one pair of dtypes: True if every value has torch's bits
    (NaN: any NaN, since torch's own NaN bits depend on which of its loops ran)."""
    weight, delta = special_values()
    weight = weight.to(weight_dtype)
    ok = True
    for scale in (1.0, 2.0, 0.3, 1 / 3):
        expected = torch.empty(weight.shape, dtype=out_dtype)
        reference(weight, delta, scale, expected)
        got = torch.empty_like(expected)
        count = fused.run(weight, delta, scale, got)
        ok = ok and same_bits(got, expected) and count == int((~torch.isfinite(expected)).sum())
    return ok


def same_bits(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Bit for bit, except that any NaN equals any NaN."""
    nan = torch.isnan(expected)
    if not torch.equal(torch.isnan(got), nan):
        return False
    integer = {2: torch.int16, 4: torch.int32}[expected.element_size()]
    return torch.equal(got.view(integer)[~nan], expected.view(integer)[~nan])


FUSED = FusedMerge()
