"""What rounding the base through 4-bit costs, next to what the adapter changes: for every LoRA-updated weight,
‖W − dequant(Q(W))‖ / ‖ΔW‖ (Frobenius norms, ΔW = scaling · B·A).

A QLoRA adapter was trained against dequant(Q(W)); merging it into W instead moves each weight by the quantization
error W − dequant(Q(W)), which the adapter never saw. Where that error is small next to ΔW, the choice of base
hardly matters; where it is as large as ΔW or larger, the merge into W is a different model from the one trained,
and `--base-quant` reproduces the trained one. `qlora-merge inspect ADAPTER --base B --quant-error` reports it.

It reads each adapted weight whole (one at a time), so it costs a read of those weights and a few float32 copies of
the largest; it is a diagnostic, not part of a merge.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass

from .adapter.weights import read_tensor
from .fourbit import roundtrip
from .inputs.reader import TensorReader
from .plan.tasks import LoraUpdate
from .preparation import Inputs

# The first number in a tensor name is its layer: model.layers.12.self_attn.q_proj.weight
_LAYER = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class WeightError:
    """One adapted weight: its quantization error's norm and its delta's."""

    name: str
    error_norm: float  # ‖W − dequant(Q(W))‖
    delta_norm: float  # ‖ΔW‖

    @property
    def ratio(self) -> float:
        return self.error_norm / self.delta_norm if self.delta_norm else math.inf

    @property
    def layer(self) -> int | None:
        match = _LAYER.search(self.name)
        return int(match.group(1)) if match else None


@dataclass(frozen=True)
class QuantErrorReport:
    quant_type: str
    weights: tuple[WeightError, ...]

    def by_layer(self) -> dict[int | None, float]:
        """Per layer: the error's norm over the delta's, over all the layer's adapted weights together."""
        errors: dict[int | None, float] = defaultdict(float)
        deltas: dict[int | None, float] = defaultdict(float)
        for weight in self.weights:
            errors[weight.layer] += weight.error_norm**2
            deltas[weight.layer] += weight.delta_norm**2
        return {
            layer: math.sqrt(errors[layer]) / math.sqrt(deltas[layer]) if deltas[layer] else math.inf
            for layer in errors
        }

    @property
    def overall(self) -> float:
        error = math.sqrt(sum(w.error_norm**2 for w in self.weights))
        delta = math.sqrt(sum(w.delta_norm**2 for w in self.weights))
        return error / delta if delta else math.inf

    def to_dict(self) -> dict[str, object]:
        return {
            "quant_type": self.quant_type,
            "overall": self.overall,
            "layers": {str(layer): ratio for layer, ratio in self.by_layer().items()},
            "weights": {w.name: {"ratio": w.ratio, "error": w.error_norm, "delta": w.delta_norm} for w in self.weights},
        }


def quantization_error(inputs: Inputs, quant_type: str = "nf4") -> QuantErrorReport:
    """The ratio for every 2-D weight a plain LoRA pair updates (DoRA and MoE expert updates are left out: their
    change is not scaling · B·A alone)."""
    found = []
    with TensorReader() as reader:
        for task in inputs.plan.tasks:
            update = task.update
            if not isinstance(update, LoraUpdate) or update.dora or task.source is None:
                continue
            if len(task.source.shape) != 2 or update.pair.embedding:
                continue
            weight = inputs.source.read(task.source, reader)
            error = (weight.float() - roundtrip(weight, quant_type).float()).norm().item()
            a = read_tensor(update.pair.a, reader).float()
            b = read_tensor(update.pair.b, reader).float()
            delta = (b @ a) * update.scaling
            found.append(WeightError(task.output.name, error, delta.norm().item()))
    return QuantErrorReport(quant_type, tuple(found))
