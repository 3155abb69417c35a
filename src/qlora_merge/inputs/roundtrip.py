"""`--base-quant nf4|fp4`: a full-precision base read as a QLoRA model trained on it saw it, each weight
dequant(Q(W)) through bitsandbytes 4-bit, streamed with flat memory.

Which weights, and how: as `axolotl merge-lora` does for a 4-bit config (axolotl `src/axolotl/cli/merge_lora.py`
`_do_merge_lora_efficient`, and `src/axolotl/cli/utils/lora_merge.py` `_should_nf4_roundtrip` /
`_simulate_nf4_roundtrip`, checked at axolotl 067b021, July 2026):

- every base tensor of two or more dimensions is round-tripped, LoRA-targeted or not, the embeddings and an untied
  lm_head included; tensors of one dimension (norms, biases) are not. A tensor the adapter replaces
  (modules_to_save) is the adapter's, never round-tripped. Here only floating-point tensors count (an integer
  buffer has no 4-bit form);
- the tensor is flattened, taken to float32, `quantize_4bit(compress_statistics=True)` with bitsandbytes' default
  blocksize (64), `dequantize_4bit`, and the result rounded back to the tensor's own (stored) dtype; the merge
  then treats it as the base weight. axolotl always uses nf4 (its training uses `bnb_4bit_quant_type`, nf4 unless
  `bnb_config_kwargs` says otherwise); `--base-quant fp4` is offered for fp4-trained adapters.

The values equal `fourbit.roundtrip` on the whole tensor (hence bitsandbytes'), but the whole tensor is never
held: double quantization's offset is the mean of every block's absmax, so each round-tripped tensor is read twice.
Pass 1, on its first decode, reads it a chunk at a time for the absmax of every block (numel/64 floats) and
double-quantizes that vector; only its 8-bit codes are kept, for one tensor at a time. Pass 2 is the merge's own
read: each run of elements is widened to whole 4-bit blocks (blocks span row ends; the last may be partial), each
block's exact absmax is taken again from its values, its codes chosen with it and dequantized with the
double-quantized absmax, and the run cut out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..fourbit import (
    DEFAULT_BLOCKSIZE,
    NESTED_BLOCKSIZE,
    CompressedAbsmax,
    block_absmax,
    compress_absmax,
    dequantize_codes,
    dynamic_code,
    quantize_codes,
    roundtrip,
)
from .format import DTYPES, FLOAT_DTYPES, TensorEntry
from .reader import ByteRange, TensorReader
from .sources import Source

# Pass 1 reads a tensor this many elements at a time (a multiple of any blocksize that divides it): 4 MB of
# float32 at most beside the absmax it collects.
STATS_CHUNK_ELEMENTS = 1 << 20


def round_tripped(entry: TensorEntry) -> bool:
    """Whether `--base-quant` round-trips this base tensor: a floating-point tensor of two or more dimensions, as
    axolotl's `_should_nf4_roundtrip` picks them (`tensor.ndim >= 2`)."""
    return len(entry.shape) >= 2 and entry.dtype in FLOAT_DTYPES and math.prod(entry.shape) > 0


def count_round_tripped(entries: Iterable[TensorEntry], only: frozenset[str] | None = None) -> int:
    return sum(1 for entry in entries if round_tripped(entry) and (only is None or entry.name in only))


@dataclass(frozen=True)
class _Stats:
    """Pass 1's result for one tensor: its double-quantized absmax, which pass 2 dequantizes with."""

    key: tuple[str, int]  # where the tensor lives (file, offset): renamed copies of a layer share it
    absmax: CompressedAbsmax


class RoundTripSource:
    """Another source's tensors, each one `round_tripped` picks as dequant(Q(W)) in bitsandbytes 4-bit
    (`quant_type`, blocks of `blocksize`, double quantization); every other tensor as the inner source gives it."""

    def __init__(
        self,
        inner: Source,
        quant_type: str,
        blocksize: int = DEFAULT_BLOCKSIZE,
        only: frozenset[str] | None = None,
    ) -> None:
        self.inner = inner
        # the tensors QLoRA training quantized (transformers' rule); None: every one `round_tripped` picks
        self.only = only
        self.quant_type = quant_type
        self.blocksize = blocksize
        # pass 1's statistics of the tensor being read; one at a time, since the merge reads tensor by tensor
        self._stats: _Stats | None = None
        self.stats_passes = 0  # how many times pass 1 ran (tests: once per tensor)

    def picks(self, entry: TensorEntry) -> bool:
        """Whether this tensor is round-tripped."""
        return round_tripped(entry) and (self.only is None or entry.name in self.only)

    @property
    def cached_tensors(self) -> int:
        """How many tensors' statistics are held now (never more than one)."""
        return 0 if self._stats is None else 1

    def raw(self, entry: TensorEntry) -> ByteRange | None:
        return None if self.picks(entry) else self.inner.raw(entry)

    def reads(self, entry: TensorEntry, start: int, stop: int) -> Sequence[ByteRange]:
        if not self.picks(entry):
            return self.inner.reads(entry, start, stop)
        first, last = self._blocks(entry, start, stop)
        return self.inner.reads(entry, first, last)

    def decode(self, entry: TensorEntry, start: int, stop: int, data: Sequence[torch.Tensor]) -> torch.Tensor:
        if not self.picks(entry):
            return self.inner.decode(entry, start, stop, data)
        first, last = self._blocks(entry, start, stop)
        values = self.inner.decode(entry, first, last, data)
        return self._round_trip(entry, first, last, values)[start - first : stop - first]

    def read(self, entry: TensorEntry, reader: TensorReader) -> torch.Tensor:
        weight = self.inner.read(entry, reader)
        if not self.picks(entry):
            return weight
        # the whole tensor is in memory already: the round trip needs no second pass
        return roundtrip(weight, self.quant_type, self.blocksize)

    def read_elements(
        self, entry: TensorEntry, start: int, stop: int, reader: TensorReader, buffer: torch.Tensor
    ) -> torch.Tensor:
        if not self.picks(entry):
            return self.inner.read_elements(entry, start, stop, reader, buffer)
        first, last = self._blocks(entry, start, stop)
        widened = torch.empty((last - first) * DTYPES[entry.dtype][1], dtype=torch.uint8)
        values = self.inner.read_elements(entry, first, last, reader, widened)
        result = self._round_trip(entry, first, last, values)[start - first : stop - first]
        out = buffer[: result.numel() * result.element_size()].view(result.dtype)
        return out.copy_(result)

    def _blocks(self, entry: TensorEntry, start: int, stop: int) -> tuple[int, int]:
        """Elements [start, stop) widened to the 4-bit blocks that hold them: (first, last) element."""
        numel = math.prod(entry.shape)
        first = start // self.blocksize * self.blocksize
        last = min(numel, -(-stop // self.blocksize) * self.blocksize)
        return first, last

    def _round_trip(self, entry: TensorEntry, first: int, last: int, values: torch.Tensor) -> torch.Tensor:
        """dequant(Q(values)) for elements [first, last) of `entry`, which start at a block boundary and end at one
        or at the tensor's end, in the tensor's dtype: element for element what `fourbit.roundtrip` gives."""
        numel = math.prod(entry.shape)
        partial = last == numel and numel % self.blocksize != 0
        flat = values.reshape(-1)
        exact = block_absmax(flat, self.blocksize, partial)
        codes = quantize_codes(flat, exact, self.blocksize, self.quant_type, partial)
        block = first // self.blocksize
        absmax = _expand(self._statistics(entry).absmax, block, block + exact.numel())
        return dequantize_codes(codes, absmax, self.blocksize, self.quant_type).to(entry.torch_dtype)

    def _statistics(self, entry: TensorEntry) -> _Stats:
        """Pass 1 for `entry`, once: the absmax of every block, read a chunk at a time, double-quantized."""
        key = (str(entry.file), entry.start)
        if self._stats is not None and self._stats.key == key:
            return self._stats
        self._stats = None  # the last tensor's go before this one's come
        numel = math.prod(entry.shape)
        chunk = max(STATS_CHUNK_ELEMENTS // self.blocksize, 1) * self.blocksize
        size = DTYPES[entry.dtype][1]
        buffer = torch.empty(min(chunk, numel) * size, dtype=torch.uint8)
        pieces = []
        with TensorReader() as reader:
            for start in range(0, numel, chunk):
                stop = min(numel, start + chunk)
                values = self.inner.read_elements(entry, start, stop, reader, buffer[: (stop - start) * size])
                pieces.append(block_absmax(values, self.blocksize, stop == numel and numel % self.blocksize != 0))
        absmax = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        del pieces
        self._stats = _Stats(key, compress_absmax(absmax))
        self.stats_passes += 1
        return self._stats


def _expand(compressed: CompressedAbsmax, first: int, last: int) -> torch.Tensor:
    """Blocks [first, last) of `compressed.expand()`, computed for those blocks alone (the same float32 operations
    element by element: code value times its nested block's scale, plus the offset)."""
    values = dynamic_code()[compressed.codes[first:last].to(torch.int64)]
    nested = torch.arange(first, last) // NESTED_BLOCKSIZE
    return values * compressed.scales[nested] + compressed.offset
