"""qlora-merge: fold LoRA adapters into their base model by streaming safetensors, exactly as PEFT merges."""

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
from .pipeline import MergeResult, merge
from .progress import ProgressEvent

__version__ = "0.1.0"

__all__ = [
    "AdapterFormatError",
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
    "__version__",
    "merge",
]
