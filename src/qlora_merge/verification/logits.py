"""The model-level half of `verify`: run the merged model and base + unmerged adapter on one short prompt and
compare their logits.

The tensor check (tensors.py) proves the merged files are what our engine derives from base and adapter, byte for
byte; it cannot catch a mistake the engine and the checker share (a wrong scaling, a transposed update). This check
asks transformers and PEFT instead: the reference is PEFT's own forward pass with the adapter applied on the fly,
so the merge is judged by the library that trained the adapter.

The price: both models are loaded whole, in float32, one after the other (the first is freed before the second
is loaded), so it needs about 4 bytes per parameter of free memory and takes a forward pass per model. That is why
it is opt-in (`verify --logits`) and why transformers and peft are an optional extra (`qlora-merge[verify]`).

Tolerance: the difference is measured relative to the scale of the logits (the largest |logit| of the reference),
since logits of real models span tens of units and of tiny random ones a fraction of one. A merged checkpoint in a
reduced-precision dtype carries each merged weight rounded to that dtype, a relative error of at most its unit
roundoff u (2^-8 for bf16, 2^-11 for f16). Rounding errors of independent weights add incoherently, so each layer's
output moves by about u relative, and through L residual layers by about u·sqrt(L/3); the largest of millions of
logits lies a few standard deviations out, but so does the largest |logit| we divide by. That predicts a maximum of
about 3u for 32 layers and 5u for 80; the tiny test models (llama, qwen2, gpt2) measure 1.4u to 2.6u in bf16 and
0.8u to 4.8u in f16. The default is 16u: a margin of about 3 over an 80-layer model, still 20 times below what an
adapter missing or swapped for another does to the logits of the test models. It is a semantic check, not a bitwise
one: a single flipped low bit passes here and is the tensor check's to find. A float32 merge differs from the
unmerged model only in summation order (x·(W + sBA) against x·W + s(x·A)·B), measured at 5e-7 to 2.3e-6
relative; its tolerance is the floor 1e-4. `adapter_effect` reports how far the adapter itself moves the logits:
when that is within the tolerance, the check cannot tell a merge from the bare base, and `reason` says so.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointFormatError, MergeError, MissingDependency
from ..inputs.index import open_merged
from ..inputs.resolve import resolve_adapter, resolve_base

log = logging.getLogger(__name__)

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog. Merging must not change the answer."
# Without a tokenizer (tiny test models), this many fixed token ids stand in for the prompt.
FALLBACK_TOKENS = 16
# Unit roundoff of each merged dtype: the largest relative error of rounding one value to it.
UNIT_ROUNDOFF = {"BF16": 2.0**-8, "F16": 2.0**-11, "F32": 2.0**-24}
ROUNDOFF_MARGIN = 16
# Below this, differences come from float32 summation order, not from the merge.
TOLERANCE_FLOOR = 1e-4
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
MISSING_DEPENDENCIES = "the logits check needs transformers and peft (pip install 'qlora-merge[verify]')"


@dataclass(frozen=True)
class LogitsReport:
    """The merged model's logits against base + unmerged adapter on one prompt, every position and vocab entry.

    Differences are absolute (in logit units); `tolerance` is relative to `scale`, the largest |logit| of the
    reference, so `ok` means max_abs_diff <= tolerance * scale.
    """

    merged: Path
    ok: bool
    max_abs_diff: float
    mean_abs_diff: float
    scale: float
    tolerance: float
    top1_agreement: float
    adapter_effect: float
    tokens: int
    dtype: str
    model_class: str
    prompt_source: str
    reason: str

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / self.scale if self.scale else float("inf")

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"merged": str(self.merged), "relative_diff": self.relative_diff}


def default_tolerance(dtype: str) -> float:
    """The relative tolerance for a merged checkpoint whose tensors are `dtype` ("BF16", "F16", "F32"); see the
    module docstring for where the numbers come from."""
    return max(ROUNDOFF_MARGIN * UNIT_ROUNDOFF.get(dtype, UNIT_ROUNDOFF["BF16"]), TOLERANCE_FLOOR)


def compare_logits(
    base: str | Path,
    adapter: str | Path,
    merged: str | Path,
    *,
    prompt: str = DEFAULT_PROMPT,
    tolerance: float | None = None,
    hf_token: str | None = None,
    adapter_name: str | None = None,
) -> LogitsReport:
    """Run `prompt` through the merged model and through base + adapter (PEFT, unmerged), both in float32 on the
    CPU, and compare the logits at every position.

    `tolerance` is relative to the largest |logit| of the reference; None picks it from the merged checkpoint's
    dtype (`default_tolerance`). A difference beyond it is reported (`ok` False), not raised; inputs that cannot be
    loaded, or a model that does not take token ids, raise MergeError. Loads each model whole: opt-in only.
    """
    transformers, peft = _import_optional()
    with _libraries_quiet(transformers):
        return _compare(transformers, peft, base, adapter, merged, prompt, tolerance, hf_token, adapter_name)


def _compare(
    transformers: Any,
    peft: Any,
    base: str | Path,
    adapter: str | Path,
    merged: str | Path,
    prompt: str,
    tolerance: float | None,
    hf_token: str | None,
    adapter_name: str | None,
) -> LogitsReport:
    merged_dir = Path(merged)
    _, dtype = open_merged(merged_dir)
    limit = default_tolerance(dtype) if tolerance is None else tolerance
    base_dir = resolve_base(str(base), hf_token)
    adapter_dir = resolve_adapter(str(adapter), hf_token, adapter_name)
    model_class = _model_class(transformers, merged_dir)
    vocab_size = _vocab_size(transformers, merged_dir)
    ids, prompt_source = _prompt_ids(transformers, merged_dir, prompt, vocab_size)

    model = _load(transformers, model_class, base_dir, merged_dir)
    embeddings = model.get_input_embeddings()
    if vocab_size is not None and embeddings is not None and embeddings.num_embeddings != vocab_size:
        # Trainers resize the embeddings after adding tokens; PEFT loads such an adapter only onto a resized base.
        model.resize_token_embeddings(vocab_size)
    try:
        model = peft.PeftModel.from_pretrained(model, str(adapter_dir))
    except Exception as error:  # PEFT raises ValueError, KeyError, RuntimeError for an adapter that does not fit
        raise MergeError(f"{adapter_dir}: PEFT cannot load this adapter onto {base_dir}: {_one_line(error)}") from error
    reference = _run(model, ids, merged_dir)
    with model.disable_adapter():
        bare = _run(model, ids, merged_dir)
    del model
    gc.collect()

    model = _load(transformers, model_class, merged_dir, merged_dir)
    found = _run(model, ids, merged_dir)
    del model
    gc.collect()
    return _report(merged_dir, reference, bare, found, limit, dtype, model_class.__name__, prompt_source)


@contextmanager
def _libraries_quiet(transformers: Any) -> Iterator[None]:
    """transformers' and the hub's progress bars, logs and warnings held back while the models load and run: what
    the check prints is ours. With debug logging on (`--debug`) they all show."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    hub_bars_were_off = are_progress_bars_disabled()
    verbosity = transformers.logging.get_verbosity()
    bars_were_on = transformers.utils.logging.is_progress_bar_enabled()
    disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars_were_on:
            transformers.utils.logging.enable_progress_bar()
        if not hub_bars_were_off:
            enable_progress_bars()


def _import_optional() -> tuple[Any, Any]:
    """transformers and peft, imported only when the check runs: they are heavy and not needed to merge."""
    try:
        import peft
        import transformers
    except ImportError as error:
        raise MissingDependency(MISSING_DEPENDENCIES) from error
    return transformers, peft


def _model_class(transformers: Any, merged_dir: Path) -> Any:
    """The class the merged config.json names (the same head for both models: a classifier stays one), else the
    causal LM class transformers maps its model type to."""
    config_path = merged_dir / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointFormatError(f"{config_path}: cannot read the model config: {_one_line(error)}") from error
    for name in config.get("architectures") or ():
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    return transformers.AutoModelForCausalLM


def _vocab_size(transformers: Any, merged_dir: Path) -> int | None:
    config = transformers.AutoConfig.from_pretrained(merged_dir)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(text_config, "vocab_size", None)
    return size if isinstance(size, int) else None


def _prompt_ids(transformers: Any, merged_dir: Path, prompt: str, vocab_size: int | None) -> tuple[list[int], str]:
    """The prompt tokenized by the merged model's tokenizer when it has one (the ids a user's text becomes), else
    fixed ids spread over the vocabulary, so that checkpoints saved without a tokenizer can be checked too."""
    if any((merged_dir / name).is_file() for name in TOKENIZER_FILES):
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(merged_dir)
            ids = [int(i) for i in tokenizer(prompt)["input_ids"]]
        except Exception as error:  # a tokenizer needing a missing package must not stop the check
            log.warning("%s: tokenizer not usable (%s); fixed token ids instead", merged_dir, _one_line(error))
        else:
            if ids and (vocab_size is None or max(ids) < vocab_size):
                return ids, "tokenizer"
            log.warning(
                "%s: the tokenizer's ids do not fit the model's vocabulary; fixed token ids instead", merged_dir
            )
    size = vocab_size or 2
    return [(1 + 37 * i) % size for i in range(FALLBACK_TOKENS)], "token ids"


def _load(transformers: Any, model_class: Any, directory: Path, merged_dir: Path) -> Any:
    dtype_key = "dtype" if _version(transformers.__version__) >= (4, 56) else "torch_dtype"
    options: dict[str, Any] = {dtype_key: torch.float32}
    if importlib.util.find_spec("accelerate") is not None:
        # Loads weights straight into place rather than into a random model first (transformers 5 always does;
        # before 5 it needs accelerate, and asking without it is an error).
        options["low_cpu_mem_usage"] = True
    try:
        # Weights a checkpoint lacks are initialised at random: the same seed for both loads keeps them equal.
        with _seeded():
            model = model_class.from_pretrained(directory, **options)
    except (ValueError, KeyError, OSError) as error:
        raise MergeError(
            f"{merged_dir}: transformers cannot load {directory} as {model_class.__name__}: {_one_line(error)}"
        ) from error
    if getattr(model, "main_input_name", "input_ids") != "input_ids":
        raise MergeError(
            f"{merged_dir}: {type(model).__name__} takes {model.main_input_name}, not token ids; "
            "the logits check runs text models only"
        )
    return model.eval()


@contextmanager
def _seeded() -> Iterator[None]:
    """A fixed seed inside, the caller's random state restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _run(model: Any, ids: list[int], merged_dir: Path) -> torch.Tensor:
    with torch.no_grad():
        output = model(input_ids=torch.tensor([ids]))
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value.detach().float()
    raise MergeError(f"{merged_dir}: {type(model).__name__} returns neither logits nor hidden states")


def _report(
    merged_dir: Path,
    reference: torch.Tensor,
    bare: torch.Tensor,
    found: torch.Tensor,
    tolerance: float,
    dtype: str,
    model_class: str,
    prompt_source: str,
) -> LogitsReport:
    tokens = reference.shape[1] if reference.dim() > 1 else 1
    scale = _finite_max(reference.abs())
    effect = _finite_max((bare - reference).abs())
    if found.shape != reference.shape:
        shapes = f"{list(found.shape)} from the merged model, {list(reference.shape)} from base + adapter"
        return LogitsReport(
            merged_dir, False, float("inf"), float("inf"), scale, tolerance, 0.0, effect, tokens, dtype, model_class,
            prompt_source, f"logits of another shape: {shapes}",
        )  # fmt: skip
    diff = (found - reference).abs()
    max_diff, mean_diff = _finite_max(diff), float(diff.mean())
    agreement = float((found.argmax(-1) == reference.argmax(-1)).float().mean())
    ok = max_diff <= tolerance * scale
    relative = max_diff / scale if scale else float("inf")
    if not ok:
        reason = f"logits differ by {relative:.3g} of their scale, more than the tolerance {tolerance:.3g}"
    elif effect <= tolerance * scale:
        reason = (
            f"within tolerance, but the adapter itself moves the logits by only {effect / scale:.3g} of their scale: "
            "this prompt cannot tell the merge from the bare base"
        )
    else:
        reason = f"logits agree within {relative:.3g} of their scale (tolerance {tolerance:.3g})"
    return LogitsReport(
        merged_dir, ok, max_diff, mean_diff, scale, tolerance, agreement, effect, tokens, dtype, model_class,
        prompt_source, reason,
    )  # fmt: skip


def _finite_max(values: torch.Tensor) -> float:
    """The largest value, infinite when any is NaN: the report then says plainly that nothing is within tolerance."""
    if values.numel() == 0:
        return 0.0
    if torch.isnan(values).any():
        return float("inf")
    return float(values.max())


def _version(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.split(".")[:2]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
