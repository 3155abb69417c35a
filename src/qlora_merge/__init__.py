"""qlora-merge: fold LoRA adapters into their base model by streaming safetensors, exactly as PEFT merges."""

from .axolotl import AxolotlMerge, merge_from_axolotl, read_axolotl_config
from .errors import (
    AdapterFormatError,
    CheckpointFormatError,
    InputNotFound,
    KeyMatchError,
    MergeError,
    NonFiniteValues,
    OutputError,
    ShapeMismatch,
    UnsupportedAdapter,
)
from .inspection import AdapterReport, inspect_adapter
from .pipeline import MergeResult, merge, verify
from .progress import ProgressEvent
from .verify import VerifyReport

__version__ = "0.1.0"

__all__ = [
    "AdapterFormatError",
    "AdapterReport",
    "AxolotlMerge",
    "CheckpointFormatError",
    "InputNotFound",
    "KeyMatchError",
    "MergeError",
    "MergeResult",
    "NonFiniteValues",
    "OutputError",
    "ProgressEvent",
    "ShapeMismatch",
    "UnsupportedAdapter",
    "VerifyReport",
    "__version__",
    "inspect_adapter",
    "merge",
    "merge_from_axolotl",
    "read_axolotl_config",
    "verify",
]
