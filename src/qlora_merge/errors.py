"""Errors a user can cause: each carries one line that names the file and what is wrong."""

from __future__ import annotations


class MergeError(Exception):
    """Base of every error that bad input, not a bug, can raise. The message is one line."""


class InputNotFound(MergeError):
    """A base, adapter or file that should exist does not."""


class CheckpointFormatError(MergeError):
    """A base checkpoint (or its index, or a safetensors header) is malformed or of a layout we do not read."""


class AdapterFormatError(MergeError):
    """An adapter directory, its adapter_config.json or its weights file is malformed."""


class UnsupportedAdapter(MergeError):
    """A well-formed adapter that uses something this version does not merge."""


class KeyMatchError(MergeError):
    """An adapter module matches no tensor of the base, or more than one."""


class ShapeMismatch(MergeError):
    """Adapter and base tensors disagree in shape."""


class OutputError(MergeError):
    """The output location cannot be written as asked (exists, not writable, inside an input)."""


class NonFiniteValues(MergeError):
    """A merged or converted tensor holds NaN or infinite values, or values beyond float16's range."""
