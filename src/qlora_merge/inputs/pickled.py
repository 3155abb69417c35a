"""Read a PyTorch pickle checkpoint (pytorch_model.bin, or shards with pytorch_model.bin.index.json) safely.

Each .bin file is opened with `torch.load(weights_only=True, mmap=True)` only: PyTorch's restricted unpickler,
which builds tensors and plain containers and refuses any other global, so nothing in the file is ever run.
Anything that is not a flat mapping of names to tensors is refused. Each file is then written, one tensor at a
time, as a safetensors file of the same name in a private temporary directory, and the merge streams from those
files as from any safetensors base. Memory stays bounded by one shard's memory map (file-backed pages the kernel
can drop) plus one tensor's bytes. The copies cost disk space equal to the base, in TMPDIR; a full or unwritable
TMPDIR is one error line.

The merge reads every weight file through the descriptor its header was read from (see opened.py), never by
path, so each copy is unlinked as soon as it is opened, and the directory is removed before this module returns or
raises, whatever ends it (an error, Ctrl-C, a signal turned into an exception). The disk space comes back when the
last tensor entry that points into a copy is gone (the merge's plan), or when the process ends, however it ends:
nothing is left in TMPDIR for anyone to clean up.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointFormatError, MergeError
from ..progress import human_bytes
from .format import TORCH_TO_NAME, SafetensorsFile, encode_header, read_safetensors_header


def open_pickle_shards(paths: list[Path]) -> tuple[SafetensorsFile, ...]:
    """Each .bin file converted to a safetensors file of the same name in a new temporary directory and its header
    read (which opens it for good); the directory and the files' names are gone by the time this returns."""
    try:
        scratch = Path(tempfile.mkdtemp(prefix="qlora-merge-bin-"))
    except OSError as exc:
        raise _scratch_error(Path(tempfile.gettempdir()), paths, exc) from exc
    try:
        files = []
        for path in paths:
            target = scratch / path.name
            try:
                _convert(path, target)
            except OSError as exc:
                raise _scratch_error(scratch, paths, exc) from exc
            files.append(read_safetensors_header(target))
            target.unlink()
        return tuple(files)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _scratch_error(where: Path, paths: list[Path], exc: OSError) -> MergeError:
    """One line for a temporary directory that cannot take the converted copies: where, why, and how much room
    they need (about the .bin files' size)."""
    need = 0
    for path in paths:
        with contextlib.suppress(OSError):
            need += path.stat().st_size
    full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return MergeError(
        f"{where}: cannot write the temporary safetensors copy of the .bin base ({exc.strerror or exc}); it needs "
        f"about {human_bytes(need)} free in TMPDIR ({tempfile.gettempdir()})"
        + ("; set TMPDIR to a directory on a disk with room" if full else "; set TMPDIR to a writable directory")
    )


def load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one .bin file, memory-mapped; a file that pickles anything else is refused, never run."""
    if not zipfile.is_zipfile(path):
        raise CheckpointFormatError(
            f"{path}: a legacy (pre-1.6) torch file, which cannot be memory-mapped; re-save the base as safetensors"
        )
    loaded = load_plain_tensors(path, CheckpointFormatError, mmap=True)
    for name, tensor in loaded.items():
        if tensor.dtype not in TORCH_TO_NAME or tensor.layout is not torch.strided or tensor.is_quantized:
            raise CheckpointFormatError(f"{path}: tensor '{name}' has dtype {tensor.dtype}, not one safetensors holds")
    return dict(loaded)


def _convert(source: Path, target: Path) -> None:
    """Write `source`'s tensors to `target` as safetensors, in the file's order, one tensor at a time. A tensor
    that is the very same view of a storage as an earlier one (a tied weight pickled twice) is left out, as
    transformers leaves it out of its safetensors files. An OSError is one of writing `target`."""
    tensors = load_pickle_weights(source)
    seen: set[tuple[int, torch.dtype, tuple[int, ...], tuple[int, ...]]] = set()
    kept: list[tuple[str, torch.Tensor]] = []
    for name, tensor in tensors.items():
        view = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and view in seen:
            continue
        seen.add(view)
        kept.append((name, tensor))
    header = encode_header(
        [(name, TORCH_TO_NAME[t.dtype], tuple(int(n) for n in t.shape)) for name, t in kept], {"format": "pt"}
    )
    size = len(header) + sum(t.numel() * t.element_size() for _, t in kept)
    # Refused before writing, where the disk says so: a full disk found only at the end costs a base's worth of
    # writing first.
    if shutil.disk_usage(target.parent).free < size:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with open(target, "wb") as out:
        out.write(header)
        for _, tensor in kept:
            flat = tensor.contiguous().reshape(-1)
            if flat.numel():
                out.write(memoryview(flat.view(torch.uint8).numpy()))


def load_plain_tensors(path: Path, error: type[MergeError], mmap: bool) -> dict[str, torch.Tensor]:
    """A torch file that holds a mapping of names to tensors and nothing else, loaded with weights_only=True: an
    object that would run code when unpickled is refused (with `error`, naming the file) and never run."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():
            raise error(
                f"{path}: refused, it pickles objects other than tensors (nothing was run; re-save it as safetensors)"
            ) from exc
        raise error(f"{path}: not a readable torch file (corrupt or not a pickle)") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise error(f"{path}: not a readable torch file ({reason[:200]})") from exc
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise error(f"{path}: expected a mapping of names to tensors")
    return dict(loaded)
