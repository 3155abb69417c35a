"""`--requantize nf4|fp4`: the merged model written as a bitsandbytes 4-bit checkpoint, as transformers saves one.

What transformers writes when it loads a 16-bit checkpoint with `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type=..., bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=<dtype>)` and saves it:

- every `nn.Linear` (and GPT-2 `Conv1D`) weight is quantized, except the modules of
  `get_keys_to_not_convert(model)` (the output embeddings, both sides of tied weights, the module of the last
  parameter) and `_keep_in_fp32_modules`; biases, norms and embeddings stay in the dtype;
- a quantized `X.weight` becomes six tensors: `X.weight` (U8 [ceil(n/2), 1], two codes a byte),
  `X.weight.absmax` (U8 [blocks of 64]: the absmax, 8-bit double-quantized), `X.weight.quant_map` (F32 [16], the
  code values), `X.weight.nested_absmax` (F32 [ceil(blocks/256)]), `X.weight.nested_quant_map` (F32 [256], the
  dynamic code) and `X.weight.quant_state.bitsandbytes__<type>` (U8: JSON with quant_type, blocksize, dtype,
  shape, nested_blocksize, nested_dtype and nested_offset, the mean of the absmax);
- config.json gains `quantization_config` (`quantization_config` below).

Which modules are Linear is a question about model classes, so it is asked of transformers itself: the model is
built on the meta device (no weights) and transformers' own rule picks the modules. The values are
qlora_merge.fourbit's, which equal bitsandbytes' quantization on CPU.

The sink streams: the packed codes of each whole block of 64 go out as the merged rows arrive (a block may span
rows, so at most one block's bytes wait between writes); the absmax vector (one float per 64 values) is kept until
the weight's end, then double-quantized and written with the rest of the weight's tensors. The quant state's JSON
holds the absmax mean, known only then, while its size goes into the safetensors header first: it is padded with
spaces to the longest any float32 mean can take (JSON readers, bitsandbytes' `unpack_tensor_to_dict` included,
skip trailing whitespace).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import fourbit
from ..dtypes import OUTPUT_DTYPES, TORCH_DTYPE_NAMES
from ..errors import CheckpointFormatError, MergeError, MissingDependency
from ..inputs.format import DTYPES
from ..plan.tasks import OutputTensor
from .companions import output_config
from .safetensors import SafetensorsSink
from .sink import Sink

if TYPE_CHECKING:
    from ..options import MergeOptions
    from ..preparation import Inputs

log = logging.getLogger(__name__)

BLOCKSIZE = fourbit.DEFAULT_BLOCKSIZE
NESTED_BLOCKSIZE = fourbit.NESTED_BLOCKSIZE
QUANTIZED_DTYPES = ("BF16", "F16", "F32")
# The longest JSON a float32 mean takes as Python writes it ("-1.1754943508222875e-38"), with a spare character.
OFFSET_WIDTH = 24
# Values quantized at a time: bounds the float32 temporaries whatever size of write() arrives.
CHUNK_ELEMENTS = 1 << 20
# Bytes read at a time from an input file by copy_from() of a quantized weight.
COPY_BYTES = 4 << 20


def quantization_config(quant_type: str, dtype_name: str) -> dict[str, Any]:
    """config.json's `quantization_config`, key for key as transformers 5 writes it for a 4-bit double-quantized
    model (BitsAndBytesConfig.to_dict()); `dtype_name` is the compute dtype (bfloat16, float16, float32)."""
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": dtype_name,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": True,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def quantized_weights(
    config: dict[str, Any], tensors: Sequence[OutputTensor], flag: str = "--requantize", missing_ok: bool = False
) -> frozenset[str]:
    """The names of the output tensors transformers quantizes when it loads this model in 4-bit: the weight of
    every module its bitsandbytes integration replaces by a Linear4bit. `config` is the output's config.json
    (after the plan's changes). Raises MergeError where the answer cannot be written as transformers would (no
    transformers, no config, a Conv1D weight stored transposed, a Linear weight stored under another name)."""
    try:
        import transformers
        from transformers.pytorch_utils import Conv1D
        from transformers.quantizers.base import HfQuantizer
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError as exc:
        raise MissingDependency(
            f"{flag} needs transformers (pip install transformers): which weights a bitsandbytes checkpoint "
            "quantizes is decided by transformers' model classes"
        ) from exc
    model = _meta_model(transformers, config, flag)
    skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    by_name = {t.name: t for t in tensors}
    chosen: set[str] = set()
    for module_name, module in model.named_modules():
        if not (type(module) is torch.nn.Linear or isinstance(module, Conv1D)):
            continue
        if not should_convert_module(module_name, skip):
            continue
        name = f"{module_name}.weight"
        if isinstance(module, Conv1D):
            # transformers quantizes the transpose of a Conv1D weight: not a stream of the rows as they come
            raise MergeError(
                f"{flag}: '{name}' is a Conv1D weight ({type(model).__name__}), which transformers quantizes "
                f"transposed; this is not supported: merge without {flag}"
            )
        tensor = by_name.get(name)
        if tensor is None and missing_ok:
            continue  # a weight the checkpoint does not hold is not one to pick
        if tensor is None:
            raise MergeError(
                f"{flag}: transformers' {type(model).__name__} quantizes '{name}', which the checkpoint stores "
                f"under another name or not at all; merge without {flag}"
            )
        if tensor.dtype not in QUANTIZED_DTYPES or len(tensor.shape) != 2 or math.prod(tensor.shape) == 0:
            raise MergeError(f"{flag}: '{name}' is {tensor.dtype}{list(tensor.shape)}, not a 2-D float weight")
        chosen.add(name)
    return frozenset(chosen)


def _meta_model(transformers: Any, config: dict[str, Any], flag: str) -> torch.nn.Module:
    """The model config.json describes, built on the meta device (no memory, no weights): the class its
    `architectures` names, as AutoModelForCausalLM picks it."""
    if not config or "model_type" not in config:
        raise MergeError(f"{flag} needs the base's config.json (with model_type) to know which weights to quantize")
    settings = {k: v for k, v in config.items() if k != "quantization_config"}
    try:
        model_config = transformers.AutoConfig.for_model(**settings)
    except (ValueError, KeyError) as exc:
        raise MergeError(f"{flag}: transformers does not know model_type {config['model_type']!r} ({exc})") from exc
    architectures = config.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures else None
    try:
        with torch.device("meta"):
            if cls is not None:
                return cls._from_config(model_config)
            return transformers.AutoModelForCausalLM.from_config(model_config)
    except (ValueError, KeyError, TypeError) as exc:
        raise MergeError(f"{flag}: transformers cannot build {architectures or config['model_type']} ({exc})") from exc


@dataclass(frozen=True)
class QuantizedLayout:
    """One quantized weight: the merge's tensor (`source`) and the six tensors that replace it in the output."""

    source: OutputTensor
    quant_type: str

    @property
    def numel(self) -> int:
        return math.prod(self.source.shape)

    @property
    def blocks(self) -> int:
        return -(-self.numel // BLOCKSIZE)

    @property
    def nested_blocks(self) -> int:
        return -(-self.blocks // NESTED_BLOCKSIZE)

    @property
    def state_name(self) -> str:
        return f"{self.source.name}.quant_state.bitsandbytes__{self.quant_type}"

    def state_json(self, offset: float) -> bytes:
        """The quant state as bitsandbytes' QuantState.as_dict(packed=True) writes it, padded to `state_width`."""
        text = json.dumps(self._state(offset)).encode()
        if len(text) > self.state_width:
            raise RuntimeError(f"quant state of '{self.source.name}' is longer than planned: {text!r}")
        return text.ljust(self.state_width, b" ")

    @property
    def state_width(self) -> int:
        """The quant state's size in bytes, fixed before its mean is known: the longest mean fits."""
        return len(json.dumps(self._state(0.0)).encode()) - len("0.0") + OFFSET_WIDTH

    def _state(self, offset: float) -> dict[str, Any]:
        # bitsandbytes' keys, in its order; the mean is `offset.item()` of a float32
        return {
            "quant_type": self.quant_type,
            "blocksize": BLOCKSIZE,
            "dtype": TORCH_DTYPE_NAMES[self.source.dtype],
            "shape": list(self.source.shape),
            "nested_blocksize": NESTED_BLOCKSIZE,
            "nested_dtype": "float32",
            "nested_offset": offset,
        }

    def tensors(self) -> list[OutputTensor]:
        """The output tensors, in the order the sink writes them: the packed codes first, so they can stream."""
        name = self.source.name
        return [
            OutputTensor(name, "U8", ((self.numel + 1) // 2, 1)),
            OutputTensor(f"{name}.absmax", "U8", (self.blocks,)),
            OutputTensor(f"{name}.quant_map", "F32", (16,)),
            OutputTensor(f"{name}.nested_absmax", "F32", (self.nested_blocks,)),
            OutputTensor(f"{name}.nested_quant_map", "F32", (256,)),
            OutputTensor(self.state_name, "U8", (self.state_width,)),
        ]


def requantized_layout(
    tensors: Iterable[OutputTensor], quantized: frozenset[str], quant_type: str
) -> list[OutputTensor]:
    """The output's tensors, in order, once every weight of `quantized` is replaced by its six 4-bit tensors."""
    out: list[OutputTensor] = []
    for tensor in tensors:
        out += QuantizedLayout(tensor, quant_type).tensors() if tensor.name in quantized else [tensor]
    return out


class _Weight:
    """The quantized weight being written: the bytes of a partial block carried between writes, and the absmax of
    each block done."""

    def __init__(self, layout: QuantizedLayout) -> None:
        self.layout = layout
        self.torch_dtype, self.itemsize = DTYPES[layout.source.dtype]
        self.absmax = torch.empty(layout.blocks, dtype=torch.float32)
        self.blocks_done = 0
        self.carry = bytearray()


class RequantizeSink:
    """A sink (outputs/sink.py) that writes the merge as a bitsandbytes 4-bit checkpoint through `inner` (the
    SafetensorsSink; for verify, the ComparingSink): each weight of `quantized` is quantized as its values arrive
    and written as its six tensors; every other tensor passes through unchanged."""

    def __init__(self, inner: Sink, quantized: frozenset[str], quant_type: str) -> None:
        if quant_type not in fourbit.QUANT_TYPES:
            raise MergeError(f"--requantize {quant_type!r}: expected one of {', '.join(fourbit.QUANT_TYPES)}")
        self._inner = inner
        self._quantized = quantized
        self._quant_type = quant_type
        self._layouts: dict[str, QuantizedLayout] = {}
        self._weight: _Weight | None = None
        self._staging = torch.empty(0, dtype=torch.uint8)  # reused: the bytes of the values being quantized
        self.bytes_written = 0

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(getattr(self._inner, "files", ()))

    def start(self, tensors: Sequence[OutputTensor]) -> None:
        missing = self._quantized - {t.name for t in tensors}
        if missing:
            raise RuntimeError(f"quantized weight '{sorted(missing)[0]}' is not in the output plan")
        self._layouts = {t.name: QuantizedLayout(t, self._quant_type) for t in tensors if t.name in self._quantized}
        self._inner.start(requantized_layout(tensors, self._quantized, self._quant_type))

    def begin(self, name: str) -> None:
        self._inner.begin(name)
        layout = self._layouts.get(name)
        self._weight = _Weight(layout) if layout is not None else None

    def write(self, data: memoryview | bytes) -> None:
        if self._weight is None:
            self._inner.write(data)
        else:
            self._take(self._weight, memoryview(data).cast("B"))
        self.bytes_written = self._inner.bytes_written

    def copy_from(self, fd: int, offset: int, count: int, source: Path) -> None:
        """A source's raw bytes: copied as they are, or for a quantized weight read a piece at a time and
        quantized as write() does."""
        weight = self._weight
        if weight is None:
            self._inner.copy_from(fd, offset, count, source)
            self.bytes_written = self._inner.bytes_written
            return
        piece = bytearray(min(count, COPY_BYTES))
        end = offset + count
        while offset < end:
            view = memoryview(piece)[: min(len(piece), end - offset)]
            try:
                n = os.preadv(fd, [view], offset)
            except OSError as exc:
                raise CheckpointFormatError(f"{source}: cannot read ({exc.strerror or exc})") from exc
            if n == 0:
                raise CheckpointFormatError(f"{source}: file ended early (truncated while reading)")
            self._take(weight, view[:n])
            offset += n
        self.bytes_written = self._inner.bytes_written

    def end(self) -> None:
        weight = self._weight
        if weight is not None:
            self._finish_weight(weight)
            self._weight = None
        else:
            self._inner.end()
        self.bytes_written = self._inner.bytes_written

    def finish(self) -> None:
        if self._weight is not None:
            raise RuntimeError(f"tensor '{self._weight.layout.source.name}' is not complete")
        self._inner.finish()
        self.bytes_written = self._inner.bytes_written

    def abort(self) -> None:
        self._inner.abort()

    def _take(self, weight: _Weight, data: memoryview) -> None:
        """More values of `weight`: whole blocks are quantized and written now, the rest carried to the next."""
        block_bytes = BLOCKSIZE * weight.itemsize
        if weight.carry:
            need = block_bytes - len(weight.carry)
            weight.carry += data[:need]
            data = data[need:]
            if len(weight.carry) < block_bytes:
                return
            self._quantize_blocks(weight, memoryview(weight.carry))
            weight.carry.clear()
        whole = len(data) // block_bytes * block_bytes
        step = CHUNK_ELEMENTS * weight.itemsize
        for start in range(0, whole, step):
            self._quantize_blocks(weight, data[start : min(start + step, whole)])
        weight.carry += data[whole:]

    def _values(self, weight: _Weight, data: memoryview) -> torch.Tensor:
        """`data` (raw bytes in the weight's dtype) as a tensor of that dtype, in the reused staging buffer."""
        if len(data) % weight.itemsize:
            raise RuntimeError(f"'{weight.layout.source.name}': a value cut between writes at the weight's end")
        if self._staging.numel() < len(data):
            self._staging = torch.empty(len(data), dtype=torch.uint8)
        raw = self._staging[: len(data)]
        raw.numpy()[:] = memoryview(data).cast("B")
        return raw.view(weight.torch_dtype)

    def _quantize_blocks(self, weight: _Weight, data: memoryview, partial_tail: bool = False) -> None:
        """Quantize and write the values in `data`: whole blocks, or with `partial_tail` the weight's last values,
        a shorter block at its end."""
        values = self._values(weight, data)
        if weight.blocks_done * BLOCKSIZE + values.numel() > weight.layout.numel:
            raise RuntimeError(f"more values written than '{weight.layout.source.name}' holds")
        absmax = fourbit.block_absmax(values, BLOCKSIZE, partial_tail)
        codes = fourbit.quantize_codes(values, absmax, BLOCKSIZE, self._quant_type, partial_tail)
        self._inner.write(memoryview(fourbit.pack(codes, self._quant_type).numpy()))
        weight.absmax[weight.blocks_done : weight.blocks_done + absmax.numel()] = absmax
        weight.blocks_done += absmax.numel()

    def _finish_weight(self, weight: _Weight) -> None:
        """The last, partial block, then the weight's other five tensors (the absmax double-quantized)."""
        layout = weight.layout
        if weight.carry:
            self._quantize_blocks(weight, memoryview(weight.carry), partial_tail=True)
            weight.carry.clear()
        if weight.blocks_done != layout.blocks:
            raise RuntimeError(f"tensor '{layout.source.name}' is missing values")
        self._inner.end()
        compressed = fourbit.compress_absmax(weight.absmax)
        name = layout.source.name
        self._put(f"{name}.absmax", compressed.codes)
        self._put(f"{name}.quant_map", fourbit.code_values(self._quant_type))
        self._put(f"{name}.nested_absmax", compressed.scales)
        self._put(f"{name}.nested_quant_map", fourbit.dynamic_code())
        state = layout.state_json(compressed.offset.item())
        self._inner.begin(layout.state_name)
        self._inner.write(state)
        self._inner.end()

    def _put(self, name: str, tensor: torch.Tensor) -> None:
        self._inner.begin(name)
        self._inner.write(memoryview(tensor.contiguous().numpy()).cast("B"))
        self._inner.end()


# -- the merge's use of it: which weights, the layout, the sink, the card's words ----------------------------------


def weights_to_quantize(inputs: Inputs, options: MergeOptions) -> frozenset[str]:
    """The output weights --requantize quantizes (those transformers would); none without it."""
    if options.requantize is None:
        return frozenset()
    dtype_name = TORCH_DTYPE_NAMES[OUTPUT_DTYPES[options.dtype]]
    config = output_config(inputs.base_config, dtype_name, inputs.plan.config_changes) if inputs.base_config else {}
    quantized = quantized_weights(config, [task.output for task in inputs.plan.tasks])
    log.info("--requantize %s: %d weights quantized", options.requantize, len(quantized))
    return quantized


def output_layout(inputs: Inputs, options: MergeOptions, quantized: frozenset[str]) -> list[OutputTensor]:
    """Every tensor the output files hold, in order: the plan's, with each quantized weight's 4-bit tensors."""
    tensors = [task.output for task in inputs.plan.tasks]
    if options.requantize is None:
        return tensors
    return requantized_layout(tensors, quantized, options.requantize)


def output_sink(staging: Path, options: MergeOptions, quantized: frozenset[str]) -> SafetensorsSink | RequantizeSink:
    """The sink the options ask for: safetensors shards, through a 4-bit quantizer with --requantize."""
    files = SafetensorsSink(staging, options.max_shard_bytes)
    if options.requantize is None:
        return files
    return RequantizeSink(files, quantized, options.requantize)


def requantized_summary(options: MergeOptions, quantized: frozenset[str]) -> str:
    """How --requantize quantizes the output, in words for the card; "" without it."""
    if options.requantize is None:
        return ""
    return f"bitsandbytes 4-bit {options.requantize}, double quantization, blocks of 64 ({len(quantized)} weights)"
