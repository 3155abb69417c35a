"""A base on the Hugging Face hub read from its headers only: config.json, the shard index and each safetensors header
fetched with HTTP range requests, never a tensor's data (`inspect --base org/model`).

The CheckpointIndex built here equals the one open_checkpoint() builds from the same files on disk (names, dtypes,
shapes, absolute byte offsets), validated the same way, so the planner runs on it unchanged. Its file paths name the
repo's files under a placeholder root, `org/model@<commit>`: nothing may read tensor data from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import (
    CheckpointFormatError,
    HeadersNeedNetwork,
    HeadersNeedSafetensors,
    InputNotFound,
    MergeError,
    first_line,
)
from ..names import CONFIG_NAME, PICKLE_WEIGHTS, SHARD_PATTERN, WEIGHTS_INDEX_NAME, WEIGHTS_NAME
from .config import read_base_config
from .format import SafetensorsFile, header_length, parse_safetensors_header
from .index import CheckpointIndex, check_complete_shard_set, indexed, read_index
from .resolve import REPO_REF, hub_errors, local_dir, split_ref

if TYPE_CHECKING:
    import httpx2

T = TypeVar("T")
# Shard headers are fetched this many at a time: two small requests each, so latency, not bandwidth, is the cost.
PARALLEL_HEADERS = 8


@dataclass(frozen=True)
class RemoteBase:
    """A hub base as far as its headers tell: what the planner needs, and no tensor data."""

    repo_id: str
    revision: str | None  # as asked (after '@'), None for the default branch
    commit: str  # every file was read at this commit, so a branch moving meanwhile cannot mix two checkpoints
    config: dict[str, Any]  # config.json, checked as a local base's is; {} when the repo has none
    index: CheckpointIndex  # files under the placeholder root `repo_id@commit`, which exists nowhere
    snapshot: Path | None  # the hub-cache snapshot holding the downloaded config.json and index, if any
    header_bytes: int  # bytes read from the weight files: their headers, nothing more
    weight_bytes: int  # the weight files' total size, which was not downloaded


def is_repo_ref(ref: str) -> bool:
    """Whether `ref` names a hub repo rather than a local directory (InputNotFound when it is neither, as for a
    merge): the test that picks the headers-only path."""
    return local_dir(ref, "base model") is None


def remote_base(ref: str, token: str | None = None) -> RemoteBase:
    """`org/model[@revision]` read from the hub without downloading its weights: config.json and the shard index
    into the hub cache (small files), then the first 8 bytes and the JSON header of each safetensors file by range
    requests. Every failure is one MergeError line naming the repo and the file."""
    from huggingface_hub import constants

    if not REPO_REF.fullmatch(ref):
        raise InputNotFound(f"{ref}: not a Hugging Face repo id (org/name[@revision])")
    repo_id, revision = split_ref(ref)
    if constants.is_offline_mode():
        raise HeadersNeedNetwork(
            f"{ref}: HF_HUB_OFFLINE is set, and reading the base's safetensors headers from the hub needs the network "
            "(unset it, or give a local directory or a repo id whose snapshot is complete in the hub cache)"
        )
    commit, files = _hub_call(ref, repo_id, revision, None, lambda: _model_info(repo_id, revision, token))
    root = Path(f"{repo_id}@{commit}")
    weight_names, expected, index_file = _weight_files(ref, repo_id, commit, files, token)
    config, config_file = _config(ref, repo_id, commit, files, token)
    cached = config_file or index_file
    with ThreadPoolExecutor(max_workers=max(1, min(PARALLEL_HEADERS, len(weight_names)))) as pool:
        fetched = list(pool.map(lambda name: _remote_header(ref, repo_id, commit, root, name, token), weight_names))
    weight_files = tuple(header for header, _, _ in fetched)
    index = indexed(root, weight_files, expected, root / WEIGHTS_INDEX_NAME)
    return RemoteBase(
        repo_id=repo_id,
        revision=revision,
        commit=commit,
        config=config,
        index=index,
        snapshot=cached.parent if cached else None,
        header_bytes=sum(read for _, read, _ in fetched),
        weight_bytes=sum(size for _, _, size in fetched),
    )


def _model_info(repo_id: str, revision: str | None, token: str | None) -> tuple[str, frozenset[str]]:
    """The commit `revision` points at and the repo's file names there (one /api/models call)."""
    from huggingface_hub import HfApi, constants

    info = HfApi(endpoint=constants.ENDPOINT).model_info(repo_id, revision=revision, token=token or None)
    if not info.sha:
        raise MergeError(f"{repo_id}: the hub did not say which commit revision '{revision or 'main'}' is")
    return info.sha, frozenset(sibling.rfilename for sibling in info.siblings or ())


def _weight_files(
    ref: str, repo_id: str, commit: str, files: frozenset[str], token: str | None
) -> tuple[list[str], dict[str, str] | None, Path | None]:
    """The safetensors files to read, the index's weight_map (None without an index) and the downloaded index."""
    where = f"Hugging Face repo '{repo_id}' at {commit[:12]}"
    if WEIGHTS_INDEX_NAME in files:
        index_file = _download(ref, repo_id, commit, WEIGHTS_INDEX_NAME, token)
        names, expected = read_index(index_file)
        for name in names:
            if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
                raise CheckpointFormatError(
                    f"{ref}: {WEIGHTS_INDEX_NAME}: weight file '{name}' points outside the checkpoint directory"
                )
            if name not in files:
                raise InputNotFound(f"{ref}: {name}, named by {WEIGHTS_INDEX_NAME}, is not in {where}")
        return names, expected, index_file
    if WEIGHTS_NAME in files:
        return [WEIGHTS_NAME], None, None
    shards = sorted(name for name in files if SHARD_PATTERN.fullmatch(name))
    if shards:
        check_complete_shard_set(Path(f"{repo_id}@{commit}"), shards)
        return shards, None, None
    pickled = [name for name in PICKLE_WEIGHTS if name in files]
    if pickled:
        raise HeadersNeedSafetensors(
            f"{ref}: {pickled[0]}: {where} has only pickle weights, and header-only inspection needs safetensors "
            "(give a local directory, or merge with --dry-run, which downloads and converts them)"
        )
    raise CheckpointFormatError(f"{ref}: no model.safetensors or model-*-of-*.safetensors weights in {where}")


def _config(
    ref: str, repo_id: str, commit: str, files: frozenset[str], token: str | None
) -> tuple[dict[str, Any], Path | None]:
    """config.json, downloaded into the hub cache and checked as a merge checks a local base's."""
    if CONFIG_NAME not in files:
        return read_base_config(Path(f"{repo_id}@{commit}")), None  # warns, as for a local base without one
    path = _download(ref, repo_id, commit, CONFIG_NAME, token)
    return read_base_config(path.parent), path


def _download(ref: str, repo_id: str, commit: str, file: str, token: str | None) -> Path:
    from huggingface_hub import constants, hf_hub_download

    return Path(
        _hub_call(
            ref,
            repo_id,
            commit,
            file,
            lambda: hf_hub_download(repo_id, file, revision=commit, token=token or None, endpoint=constants.ENDPOINT),
        )
    )


def _remote_header(
    ref: str, repo_id: str, commit: str, root: Path, file: str, token: str | None
) -> tuple[SafetensorsFile, int, int]:
    """One weight file's header, validated, from two range requests (its length, then the header itself); with the
    bytes read and the file's size."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(repo_id, file, revision=commit, endpoint=constants.ENDPOINT)
    headers = build_hf_headers(token=token or None)
    path = root / file

    def fetch() -> tuple[bytes, int]:
        prefix, size = _fetch_range(url, headers, 0, 8)
        header_len = header_length(path, prefix, size)
        raw, again = _fetch_range(url, headers, 8, header_len) if header_len else (b"", size)
        if again != size or len(raw) != header_len:
            raise CheckpointFormatError(f"{path}: the file changed on the hub while its header was read")
        return raw, size

    raw, size = _hub_call(ref, repo_id, commit, file, fetch)
    return parse_safetensors_header(path, raw, size), 8 + len(raw), size


def _fetch_range(url: str, headers: dict[str, str], start: int, length: int) -> tuple[bytes, int]:
    """Bytes [start, start + length) of the file at `url` (fewer at its end) and the file's size; nothing past them
    is read, even from a server that ignores the Range header."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session, hf_raise_for_status

    wanted = {**headers, "Range": f"bytes={start}-{start + length - 1}", "Accept-Encoding": "identity"}
    session = get_session()
    with session.stream("GET", url, headers=wanted, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
        if response.status_code >= 400:
            response.read()  # the error's message is in the (small) body
        hf_raise_for_status(response)
        skip = 0 if response.status_code == 206 else start  # a 200 is the whole file: skip to `start`
        data = bytearray()
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= skip + length:
                break
        size = _file_size(response)
    if size is None:
        raise MergeError(f"{url}: the server did not say the file's size (no Content-Range or Content-Length)")
    return bytes(data[skip : skip + length]), size


def _file_size(response: httpx2.Response) -> int | None:
    content_range = response.headers.get("Content-Range", "")
    total = content_range.rpartition("/")[2]
    if response.status_code == 206:
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length", "")
    return int(length) if length.isdigit() else None


def _hub_call(ref: str, repo_id: str, revision: str | None, file: str | None, call: Callable[[], T]) -> T:
    with _hub_errors(ref, repo_id, revision, file):
        return call()


@contextmanager
def _hub_errors(ref: str, repo_id: str, revision: str | None, file: str | None) -> Iterator[None]:
    """Every hub or network error as one line naming the repo and, when there is one, the file: resolve's mapping,
    plus what only reading headers meets (a file gone since it was listed, the hub unreachable)."""
    import httpx2
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RemoteEntryNotFoundError

    reading = f" (reading {file})" if file else ""
    with hub_errors(ref, "base model", repo_id, revision, file):
        try:
            yield
        except RemoteEntryNotFoundError as exc:  # listed by the repo a moment ago, gone now
            raise InputNotFound(f"{ref}: {file} is not in Hugging Face repo '{repo_id}' at {revision}") from exc
        except (OfflineModeIsEnabled, LocalEntryNotFoundError, httpx2.TransportError) as exc:
            # hf_hub_download raises LocalEntryNotFoundError when the hub is unreachable and the file is not cached.
            raise HeadersNeedNetwork(
                f"{ref}: the hub cannot be reached{reading}, and reading the base's safetensors headers needs the "
                f"network (or give a local directory): {first_line(exc)}"
            ) from exc
