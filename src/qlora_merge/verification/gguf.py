"""`verify --gguf`: a GGUF file's logits from llama.cpp against transformers' on the merged model, or PEFT's on
base + unmerged adapter. Tolerances are relative to the largest |logit| of the reference and follow the file's
type: f32 1e-4, f16 1e-2, bf16 8e-2, q8_0 0.15; K-quants pass unless a logit is not finite (the difference is
reported)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MergeError

TOKENS = (1, 282, 293, 263, 319, 312, 275, 265, 305)
TOLERANCES = {"all F32": 1e-4, "F16": 1e-2, "BF16": 8e-2, "Q8_0": 0.15}


@dataclass(frozen=True)
class GgufReport:
    file_type: str
    relative_diff: float
    tolerance: float | None  # None: a K-quant, judged only on finite logits
    finite: bool

    @property
    def ok(self) -> bool:
        if not self.finite:
            return False
        return self.tolerance is None or self.relative_diff <= self.tolerance

    def line(self) -> str:
        limit = "finite logits only" if self.tolerance is None else f"tolerance {self.tolerance:g}"
        verdict = "ok" if self.ok else "FAILED"
        return (
            f"GGUF {verdict}: {self.file_type}, max logit difference {self.relative_diff:.3g} of the largest ({limit})"
        )


def _tokens(vocab_size: int) -> list[int]:
    return [t % vocab_size for t in TOKENS]


def _llama_cpp(path: Path) -> tuple[torch.Tensor, str, int]:
    """llama.cpp's logits for TOKENS (float32 KV cache), the file type's name and n_vocab."""
    import llama_cpp
    import numpy as np

    model = llama_cpp.Llama(
        model_path=str(path), logits_all=True, verbose=False, n_ctx=64, n_threads=2, seed=0,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
    )  # fmt: skip
    tokens = _tokens(model.n_vocab())
    model.eval(tokens)
    logits = torch.from_numpy(np.array(model.scores[: len(tokens)], dtype=np.float64))
    name = llama_cpp.llama_ftype_name(int(model.metadata["general.file_type"])).decode()
    return logits, name, model.n_vocab()


def _reference(merged: Path | None, base: str | None, adapter: str | None, vocab_size: int) -> torch.Tensor:
    import transformers

    if merged is not None:
        model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    else:
        if base is None or adapter is None:
            raise MergeError("verify --gguf needs --merged DIR, or --base and --adapter")
        from peft import PeftModel

        model = PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
        )
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([_tokens(vocab_size)])).logits[0].double()


def verify_gguf(
    gguf: str | Path, merged: str | Path | None = None, base: str | None = None, adapter: str | None = None
) -> GgufReport:
    """Compare a GGUF's logits with the merged model's (or base + adapter's, unmerged). Raises MergeError on
    inputs that cannot be compared (missing file, another vocabulary)."""
    path = Path(gguf)
    if not path.is_file():
        raise MergeError(f"verify --gguf: no file {path}")
    got, file_type, n_vocab = _llama_cpp(path)
    expected = _reference(Path(merged) if merged is not None else None, base, adapter, n_vocab)
    if expected.shape != got.shape:
        raise MergeError(f"verify --gguf: {path.name} has {got.shape[-1]} logits, the model {expected.shape[-1]}")
    finite = bool(torch.isfinite(got).all())
    scale = float(expected.abs().max()) or 1.0
    diff = float((got - expected).abs().max() / scale) if finite else float("inf")
    return GgufReport(file_type, diff, TOLERANCES.get(file_type), finite)
