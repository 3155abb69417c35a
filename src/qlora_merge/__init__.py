"""qlora-merge: fold LoRA adapters into their base model by streaming safetensors, exactly as PEFT merges."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from .api import MergeResult, merge, verify
    from .axolotl import AxolotlMerge, merge_from_axolotl, read_axolotl_config
    from .inspection import AdapterReport, inspect_adapter
    from .options import MergeOptions
    from .progress import ProgressEvent
    from .publishing import NotVerified, Published, push_verified
    from .verification.tensors import VerifyReport

# The module of each public name, imported on first use (PEP 562): `import qlora_merge` stays light, so that the
# command installs its Ctrl-C and SIGTERM handlers (interrupts.run_console) before torch is imported.
_LAZY = {
    "AxolotlMerge": "axolotl",
    "merge_from_axolotl": "axolotl",
    "read_axolotl_config": "axolotl",
    "AdapterReport": "inspection",
    "inspect_adapter": "inspection",
    "MergeResult": "api",
    "MergeOptions": "options",
    "merge": "api",
    "verify": "api",
    "ProgressEvent": "progress",
    "NotVerified": "publishing",
    "Published": "publishing",
    "push_verified": "publishing",
    "VerifyReport": "verification.tensors",
}

__version__ = "0.1.0"

__all__ = [
    "AdapterFormatError",
    "AdapterReport",
    "AxolotlMerge",
    "CheckpointFormatError",
    "InputNotFound",
    "KeyMatchError",
    "MergeError",
    "MergeOptions",
    "MergeResult",
    "NonFiniteValues",
    "NotVerified",
    "OutputError",
    "ProgressEvent",
    "Published",
    "ShapeMismatch",
    "UnsupportedAdapter",
    "VerifyReport",
    "__version__",
    "inspect_adapter",
    "merge",
    "merge_from_axolotl",
    "push_verified",
    "read_axolotl_config",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # a submodule, as `qlora_merge.api`
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """Importing the submodule `verify` sets the package's attribute of that name to the module; the function
    `verify` keeps it, as when this file imported everything at once and assigned the function last."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
