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


class MissingDependency(MergeError):
    """An optional package a requested feature needs is not installed."""


class UploadError(MergeError):
    """A merge that cannot be pushed: not a finished output, a bad repo id, offline, or refused by the hub."""


class HeadersNeedNetwork(InputNotFound):
    """HF_HUB_OFFLINE is set or the hub cannot be reached: a repo's headers cannot be read without it."""


class HeadersNeedSafetensors(CheckpointFormatError):
    """The repo holds its weights only in a pickle format, whose tensors cannot be listed from a byte range."""


def first_line(error: object) -> str:
    """The first non-blank line of an error's message (stripped), or its type's name when it has none: what a
    one-line MergeError quotes of an exception from another library."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
