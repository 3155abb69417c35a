"""A local directory or a Hugging Face repo id -> a local directory (the only module that talks to the hub)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import CheckpointFormatError, InputNotFound, MergeError, first_line
from ..names import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_PICKLE_NAME,
    ADAPTER_WEIGHTS_NAME,
    SHARD_GLOB,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)
from ..outputs.companions import TOKENIZER_FILES
from .index import read_index, shown_name

# "org/name", optionally "@revision" (branch, tag, commit or refs/pr/N). The namespace is required: a bare "name"
# is far more likely a mistyped local directory than one of the hub's few legacy un-namespaced repos. Paths starting
# with ".", "/", "~" or a drive ("C:"), or with a backslash or a second "/", never match.
REPO_REF = re.compile(r"(?P<repo_id>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
# Everything a merged model needs besides its weights, never weights of other formats (*.bin, *.pth, onnx, gguf).
BASE_METADATA = [
    "*.json",
    "*.model",
    "*.txt",
    "*.jinja",
    "*.tiktoken",
    "*.py",
    "tokenizer*",
    "LICENSE*",
    "NOTICE*",
    "USE_POLICY*",
]
# Sub-folders hold other formats or components (original/, onnx/, gguf/...); the merge reads the top level only.
TOP_LEVEL_ONLY = ["*/*"]
# PEFT saves the adapter of this name at the top of its directory, any other in a sub-folder named after it.
DEFAULT_ADAPTER = "default"
UNINDEXED_WEIGHTS = [WEIGHTS_NAME, SHARD_GLOB]
TOKEN_HINT = "pass --hf-token or set HF_TOKEN"


def with_revision(ref: str, revision: str | None, flag: str = "--revision") -> str:
    """`ref` pinned to `revision` (`org/name@revision`): the same as writing it in the reference itself."""
    if revision is None:
        return ref
    try:
        local = Path(ref).expanduser().exists()
    except OSError:  # no usable path, so not a local one: it is judged as a repo id below
        local = False
    if local:
        raise MergeError(f"{ref}: {flag} applies to Hugging Face repo ids, and this is a local path")
    match = REPO_REF.fullmatch(ref)
    if match is None:
        raise InputNotFound(f"{ref}: not found, and not a repo id ({flag} {revision} needs one)")
    if match["revision"] is not None and match["revision"] != revision:
        raise MergeError(f"{ref}: names revision '{match['revision']}' and {flag} names '{revision}'; give one")
    if not REPO_REF.fullmatch(f"{match['repo_id']}@{revision}"):
        raise MergeError(f"{flag} {revision!r}: not a branch, tag, commit or refs/pr/N")
    return f"{match['repo_id']}@{revision}"


def resolve_base(ref: str, token: str | None = None) -> Path:
    """A local checkpoint dir as is; a repo id downloaded: metadata first, then only the shards its index names."""
    local = local_dir(ref, "base model")
    if local is not None:
        return local
    repo_id, revision = split_ref(ref)
    root = _download(ref, "base model", repo_id, revision, BASE_METADATA, token)
    index = root / WEIGHTS_INDEX_NAME
    shards = _indexed_shards(index) if index.is_file() else UNINDEXED_WEIGHTS
    if shards is None:  # An unreadable index: open_checkpoint says what is wrong with it.
        return root
    # Pinned to the commit the index came from, so a branch that moves in between cannot mix two checkpoints.
    root = _download(ref, "base model", repo_id, _commit_of(root, revision), shards, token)
    if index.is_file():
        _require(root, shards, ref)
    return root


def resolve_adapter(ref: str, token: str | None = None, name: str | None = None) -> Path:
    """A local adapter dir as is; a repo id downloaded: its config, weights and any tokenizer files saved with it.

    `name` picks one of several adapters saved together: PEFT writes the one called "default" at the top and every
    other in a sub-folder of its name. The directory of the chosen adapter is returned.
    """
    named = name is not None and name != DEFAULT_ADAPTER
    local = local_dir(ref, "adapter")
    if local is not None:
        return _chosen_adapter(local, name, ref)
    repo_id, revision = split_ref(ref)
    folder = f"{name}/" if named else ""
    wanted = [f"{folder}{ADAPTER_CONFIG_NAME}", f"{folder}{ADAPTER_WEIGHTS_NAME}", *TOKENIZER_FILES]
    # A named adapter lives in a sub-folder: the patterns name its files exactly, so nothing else comes along.
    ignore = None if named else TOP_LEVEL_ONLY
    root = _download(ref, "adapter", repo_id, revision, wanted, token, ignore)
    _require(root, [f"{folder}{ADAPTER_CONFIG_NAME}"], ref)
    if not (root / folder / ADAPTER_WEIGHTS_NAME).is_file():
        # Old PEFT saved pickles; fetched only when there is no safetensors, as a repo may hold both.
        pickle = [f"{folder}{ADAPTER_PICKLE_NAME}"]
        root = _download(ref, "adapter", repo_id, _commit_of(root, revision), pickle, token, ignore)
    return root / folder if named else root


def _chosen_adapter(directory: Path, name: str | None, ref: str) -> Path:
    """The directory of adapter `name` (None: the only or the default one) among those saved in `directory`."""
    saved = sorted(p.parent.name for p in directory.glob(f"*/{ADAPTER_CONFIG_NAME}"))
    if name is None or name == DEFAULT_ADAPTER:
        if (directory / ADAPTER_CONFIG_NAME).is_file() or not saved:
            return directory  # reading its adapter_config.json says what is wrong when there is none
        names = ", ".join(repr(n) for n in saved)
        raise InputNotFound(
            f"{ref}: holds adapters {names} in sub-folders and none at the top: pick one with --adapter-name"
        )
    if (directory / name / ADAPTER_CONFIG_NAME).is_file():
        return directory / name
    found = ", ".join(repr(n) for n in (["default"] if (directory / ADAPTER_CONFIG_NAME).is_file() else []) + saved)
    raise InputNotFound(f"{ref}: no adapter named {name!r} (found: {found or 'none'})")


def local_dir(ref: str, what: str) -> Path | None:
    """The directory `ref` names, or None when it names none and reads as a repo id; InputNotFound otherwise."""
    if not ref.strip():
        raise InputNotFound(f"{what}: empty path")
    path = Path(ref).expanduser()
    try:
        is_dir, exists = path.is_dir(), path.exists()
    except OSError as exc:  # a name longer than the filesystem allows, a path past PATH_MAX, an unreadable parent
        raise InputNotFound(f"{shown_name(ref)}: {what} directory cannot be opened ({exc.strerror or exc})") from exc
    if is_dir:
        return path
    if exists:
        raise InputNotFound(f"{ref}: {what} must be a directory, not a file")
    if not REPO_REF.fullmatch(ref):
        raise InputNotFound(f"{ref}: {what} directory not found{relative_hint(ref)}")
    return None


def relative_hint(ref: str) -> str:
    # Relative paths are read from the working directory: show which one, as that is the usual mix-up.
    return "" if Path(ref).is_absolute() else f" ({Path(ref).absolute()})"


def split_ref(ref: str) -> tuple[str, str | None]:
    """A repo id and the revision after its '@', if any."""
    match = REPO_REF.fullmatch(ref)
    assert match is not None  # local_dir returned None, so ref reads as a repo id
    return match["repo_id"], match["revision"]


def _indexed_shards(index: Path) -> list[str] | None:
    """The shard names the index maps tensors to, or None when it is malformed."""
    try:
        return sorted(read_index(index)[0])
    except CheckpointFormatError:
        return None


def _commit_of(root: Path, revision: str | None) -> str | None:
    # snapshot_download returns <cache>/models--org--name/snapshots/<commit>.
    return root.name if root.parent.name == "snapshots" else revision


def _require(root: Path, names: list[str], ref: str) -> None:
    """Offline, the hub returns a cached snapshot as is, even one lacking files: say so rather than fail later."""
    from huggingface_hub import constants

    missing = [name for name in names if not _is_file(root / name)]
    if missing:
        why = "HF_HUB_OFFLINE is set, so it was not downloaded" if constants.is_offline_mode() else "not in the repo"
        raise InputNotFound(f"{ref}: {shown_name(missing[0])} is missing from the snapshot {root} ({why})")


def _is_file(path: Path) -> bool:
    """Whether `path` is a file; False for a name no file can have (an index naming one past 255 bytes)."""
    try:
        return path.is_file()
    except OSError:
        return False


def _download(
    ref: str,
    what: str,
    repo_id: str,
    revision: str | None,
    patterns: list[str],
    token: str | None,
    ignore: list[str] | None = TOP_LEVEL_ONLY,
) -> Path:
    """snapshot_download of the files matching `patterns`, with every hub error turned into one InputNotFound line."""
    # Imported here: a purely local merge should not pay for the hub client's import.
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    at = f" at revision '{revision}'" if revision else ""
    unreachable = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the hub cannot be reached (no network?)"
    with hub_errors(ref, what, repo_id, revision):
        try:
            folder = snapshot_download(
                repo_id, revision=revision, allow_patterns=patterns, ignore_patterns=ignore, token=token or None
            )
        except IncompleteSnapshotError as exc:
            raise InputNotFound(f"{ref}: the cached snapshot{at} is incomplete and {unreachable}") from exc
        except LocalEntryNotFoundError as exc:
            raise InputNotFound(
                f"{ref}: {what} not found: no local directory{relative_hint(ref)}, and Hugging Face repo '{repo_id}'"
                f"{at} is not in the hub cache {constants.HF_HUB_CACHE} and {unreachable}"
            ) from exc
    return Path(folder)


@contextmanager
def hub_errors(ref: str, what: str, repo_id: str, revision: str | None, file: str | None = None) -> Iterator[None]:
    """The hub's errors as one line naming the reference (and `file`, when one was being read): a gated, missing or
    private repo, a missing revision, an HTTP error (with the token hint on 401/403), an invalid id, a disk error.
    Callers catch what is particular to them (offline, a cache miss) inside the block."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    reading = f" (reading {file})" if file else ""
    try:
        yield
    except GatedRepoError as exc:
        raise InputNotFound(
            f"{ref}: gated Hugging Face repo{reading}: accept its terms on the hub, then {TOKEN_HINT}"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise InputNotFound(
            f"{ref}: {what} not found: no local directory{relative_hint(ref)} and no Hugging Face repo "
            f"'{repo_id}'{reading} (if it is private, {TOKEN_HINT})"
        ) from exc
    except RevisionNotFoundError as exc:
        raise InputNotFound(f"{ref}: Hugging Face repo '{repo_id}' has no revision '{revision}'{reading}") from exc
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        hint = f" ({TOKEN_HINT})" if status in (401, 403) else ""
        raise InputNotFound(f"{ref}: download from the hub failed{reading}: {first_line(exc)}{hint}") from exc
    except HFValidationError as exc:
        raise InputNotFound(f"{ref}: {what} not found: neither a local directory nor a valid repo id") from exc
    except OSError as exc:  # Disk full, unwritable cache, a dropped connection mid-download.
        raise MergeError(f"{ref}: download failed{reading}: {exc}") from exc
