"""Push a finished merge to the Hugging Face hub (the only module that writes to it).

Everything that can be checked without the network is checked first (the folder is a finished merge, the repo id
is one, the hub is not switched offline, there is a token), so a bad invocation fails in a second rather than after
the repo was created. Every hub error becomes one `UploadError` line naming the repo and what to do.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointFormatError, UploadError, first_line
from ..inputs.index import read_index
from ..names import CONFIG_NAME, WEIGHTS_INDEX_NAME
from .lock import output_lock

if TYPE_CHECKING:
    from huggingface_hub import HfApi

log = logging.getLogger(__name__)

# "namespace/name", as resolve.REPO_REF reads a repo id but without its "@revision": an upload names its branch
# separately. The namespace is required: the hub would otherwise put the repo under the token's user, silently.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# A branch name as git allows it in practice: no spaces, no leading "/" or "-", no "@" (it would read as a ref).
BRANCH = re.compile(r"[\w.][\w./-]*")
# Dot files and dot directories at any depth (editor swap files, .cache, a stray .git): never part of a model.
# huggingface_hub also adds its own defaults (.git/, .cache/huggingface/) to whatever is passed.
IGNORE_PATTERNS = (".*", "*/.*")
# outputs.make_staging_dir fills ".NAME.partial-PID-XXXX" and publish parks a replaced output in ".NAME.old-PID-XXXX":
# neither is a published merge, however complete it looks.
UNPUBLISHED_DIR = re.compile(r"\..+\.(?:partial|old)-\d+-.*")
TOKEN_HINT = "pass --hf-token or set HF_TOKEN (or run `hf auth login`)"


@dataclass(frozen=True)
class UploadResult:
    """What was pushed where; `private` is the repo's visibility as the hub reported it after the upload
    (None when it could not be read), which is not always what was asked: see `push_to_hub`."""

    repo_id: str
    url: str  # the commit's URL, or the repo's when the hub returned no commit URL
    commit: str  # the commit's oid ("" when unknown)
    files: int  # files offered for upload (the hub skips those it already has unchanged)
    bytes: int  # their total size
    private: bool | None
    revision: str | None = None  # the branch pushed to; None: the repo's default branch

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def push_to_hub(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    api: HfApi | None = None,
) -> UploadResult:
    """Create `repo_id` (a model repo) if missing, then upload the finished merge in `folder` as one commit.

    `revision` is a branch, created from the default branch if missing. `token` None uses huggingface_hub's own
    discovery (HF_TOKEN, then the stored login). `private` only applies when the repo is created: the hub does not
    change an existing repo's visibility on upload, so asking for a private push to an existing public repo logs a
    warning and uploads all the same (the result's `private` says what the repo is). `api` is for tests, or a
    client with another endpoint. The output's lock is held shared meanwhile (`outputs.output_lock`): a merge
    replacing this folder is refused while it uploads, and an upload of a folder a merge is writing is refused.
    """
    folder = Path(folder)
    with output_lock(folder, shared=True, error=UploadError):
        return _push(folder, repo_id, private, token, revision, commit_message, api)


def _push(
    folder: Path,
    repo_id: str,
    private: bool,
    token: str | None,
    revision: str | None,
    commit_message: str | None,
    api: HfApi | None,
) -> UploadResult:
    files = upload_files(folder)
    check_repo_id(repo_id, revision)
    token = token or None  # "" (an empty --hf-token or HF_TOKEN) means none, as for downloads
    _check_online(repo_id)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    _check_token(repo_id, token, api)
    if commit_message is None:
        from .. import __version__

        commit_message = f"Upload merged model (qlora-merge {__version__})"
    size = sum((folder / name).stat().st_size for name in files)
    where = f"{repo_id}" + (f" (branch {revision})" if revision else "")

    step = "creating the repo"
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
        visibility = _visibility(api, repo_id, token, private)
        if revision is not None:
            step = f"creating branch '{revision}'"
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model", token=token)
        step = "uploading"
        log.info("uploading %d files (%d bytes) from %s to %s", len(files), size, folder, where)
        commit = api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=list(IGNORE_PATTERNS),  # a fresh list: upload_folder appends its defaults to it
            token=token,
        )
    except Exception as exc:
        error = _upload_error(exc, repo_id, revision, step)
        if error is None:
            raise
        raise error from exc
    url = str(getattr(commit, "commit_url", "") or repo_url or "")
    oid = str(getattr(commit, "oid", "") or "")
    log.info("pushed %s to %s: commit %s", folder, where, oid or "unknown")
    return UploadResult(repo_id, url, oid, len(files), size, visibility, revision)


def upload_files(folder: Path) -> list[str]:
    """The files of a finished merge that an upload sends (paths relative to `folder`), or UploadError.

    Refuses what is not a published merge: a staging directory, an output without config.json or weights, or one
    whose shard index names a shard that is not there (a merge interrupted while copying, or a hand-edited folder).
    """
    if not folder.exists():
        raise UploadError(f"{folder}: no such directory to upload")
    if not folder.is_dir():
        raise UploadError(f"{folder}: not a directory: upload the merge's output directory")
    resolved = folder.resolve()
    if any(UNPUBLISHED_DIR.fullmatch(part) for part in (resolved.name, resolved.parent.name)):
        raise UploadError(
            f"{folder}: the staging directory of an unfinished (or replaced) merge: upload the output directory "
            "once its merge has finished"
        )
    if not (folder / CONFIG_NAME).is_file():
        raise UploadError(f"{folder}: not a finished merge: no {CONFIG_NAME}")
    if not any(p.is_file() for p in folder.glob("*.safetensors")):
        raise UploadError(f"{folder}: not a finished merge: no *.safetensors weights")
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        missing = [name for name in _indexed_shards(index, folder) if not (folder / name).is_file()]
        if missing:
            raise UploadError(
                f"{folder}: not a finished merge: {missing[0]}, named in {WEIGHTS_INDEX_NAME}, is missing"
            )
    from huggingface_hub.utils import filter_repo_objects

    # The same walk and filter upload_folder applies, so the count and size are what is offered to the hub.
    present = sorted(p.relative_to(folder).as_posix() for p in folder.glob("**/*") if p.is_file())
    return list(filter_repo_objects(present, ignore_patterns=list(IGNORE_PATTERNS)))


def _indexed_shards(index: Path, folder: Path) -> list[str]:
    try:
        return read_index(index)[0]
    except CheckpointFormatError as exc:
        raise UploadError(f"{folder}: not a finished merge: {WEIGHTS_INDEX_NAME} is unreadable ({exc})") from exc


def check_repo_id(repo_id: str, revision: str | None = None) -> None:
    """Refuse, before any network call, a repo id the hub would refuse or misread, and a malformed branch name."""
    if "@" in repo_id:
        raise UploadError(f"{repo_id}: give the repo id as namespace/name, without '@revision' (pass the branch apart)")
    if not REPO_ID.fullmatch(repo_id):
        raise UploadError(f"{repo_id!r}: not a hub repo id: expected namespace/name (e.g. my-user/my-merged-model)")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)  # the hub's own rules: length, "--", "..", ".git"
    except HFValidationError as exc:
        raise UploadError(f"{repo_id}: not a valid hub repo id: {first_line(exc)}") from exc
    if revision is not None and not BRANCH.fullmatch(revision):
        raise UploadError(f"{repo_id}: {revision!r} is not a branch name")


def split_repo_ref(ref: str) -> tuple[str, str | None]:
    """`namespace/name[@branch]`, as --base takes a repo, -> (repo id, branch or None), checked like push_to_hub's.

    For a CLI that lets users write the branch into the repo argument, as they do for downloads.
    """
    repo_id, at, revision = ref.partition("@")
    if at and not revision:
        raise UploadError(f"{ref}: empty branch after '@'")
    check_repo_id(repo_id, revision or None)
    return repo_id, revision or None


def _offline() -> bool:
    from huggingface_hub import constants

    is_offline = getattr(constants, "is_offline_mode", None)  # newer versions; reads HF_HUB_OFFLINE when called
    return bool(is_offline() if is_offline is not None else constants.HF_HUB_OFFLINE)


def _check_online(repo_id: str) -> None:
    if _offline():
        raise UploadError(f"{repo_id}: cannot push to the hub while HF_HUB_OFFLINE is set: unset it and run again")


def _check_token(repo_id: str, token: str | None, api: HfApi) -> None:
    """An upload always needs a token: without one, say so now rather than after a 401 from the hub."""
    if token is not None or getattr(api, "token", None):
        return
    from huggingface_hub import get_token

    try:
        found = get_token()
    except Exception:  # a failing discovery (OIDC exchange): let the hub call report it
        return
    if not found:
        raise UploadError(f"{repo_id}: not logged in to the hub: {TOKEN_HINT}")


def _visibility(api: HfApi, repo_id: str, token: str | None, private: bool) -> bool | None:
    """The repo's actual visibility (one cheap GET). A private push is refused unless the repo is seen to be
    private: an existing public repo keeps its visibility, and a model meant to be private must not go public."""
    from huggingface_hub.errors import HfHubHTTPError

    try:
        actual = getattr(api.repo_info(repo_id, repo_type="model", token=token), "private", None)
    except HfHubHTTPError as exc:
        if private:
            raise UploadError(
                f"{repo_id}: --private was asked but the repo's visibility cannot be read ({first_line(exc)}); "
                "nothing was uploaded"
            ) from exc
        log.warning("%s: could not read the repo's visibility (%s)", repo_id, first_line(exc))
        return None
    if private and actual is not True:
        raise UploadError(
            f"{repo_id}: --private was asked but the repo already exists and is public (--private only applies "
            "when the repo is created); nothing was uploaded: make it private on the hub, or drop --private"
        )
    return None if actual is None else bool(actual)


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "the hub could not be reached", from whichever HTTP client huggingface_hub uses.

    requests' are OSErrors; httpx's are not. Looked up in sys.modules, never imported: a client huggingface_hub does
    not use cannot have raised.
    """
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("requests", ("ConnectionError", "Timeout")), ("httpx", ("TransportError",))):
        for name in (module, f"{module}2"):
            loaded = sys.modules.get(name)
            found += [getattr(loaded, attr) for attr in names if isinstance(getattr(loaded, attr, None), type)]
    return tuple(found)


def _upload_error(exc: Exception, repo_id: str, revision: str | None, step: str) -> UploadError | None:
    """One line for a hub error: which repo, what failed, and what to do. None: not a hub error, let it through."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalTokenNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    failed = f"{repo_id}: push to the hub failed while {step}"
    if isinstance(exc, OfflineModeIsEnabled):
        return UploadError(f"{repo_id}: cannot push to the hub while HF_HUB_OFFLINE is set: unset it and run again")
    if isinstance(exc, LocalTokenNotFoundError):
        return UploadError(f"{repo_id}: not logged in to the hub: {TOKEN_HINT}")
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            return UploadError(f"{failed}: the hub did not accept the token (401 unauthorized): {TOKEN_HINT}")
        if status == 403:
            namespace = repo_id.split("/")[0]
            return UploadError(
                f"{failed}: this token may not write to namespace '{namespace}' (403 forbidden): use a token with "
                f"write access to it ({TOKEN_HINT})"
            )
        if isinstance(exc, RevisionNotFoundError):
            return UploadError(f"{failed}: the repo has no branch '{revision}'")
        if isinstance(exc, RepositoryNotFoundError):
            return UploadError(
                f"{failed}: the repo was not found, or this token cannot see it: check the id, and that the token "
                f"has write access ({TOKEN_HINT})"
            )
        code = f" (HTTP {status})" if status else ""
        return UploadError(f"{failed}{code}: {_server_message(exc)}")
    if isinstance(exc, _network_errors()):
        return UploadError(f"{failed}: the hub cannot be reached (no network?): {first_line(exc)}; run again")
    if isinstance(exc, HFValidationError):
        return UploadError(f"{failed}: {first_line(exc)}")
    if isinstance(exc, OSError):  # a file that vanished or cannot be read while uploading
        return UploadError(
            f"{failed}: {exc.strerror or first_line(exc)}" + (f" ({exc.filename})" if exc.filename else "")
        )
    return None


def _server_message(exc: Exception) -> str:
    message = getattr(exc, "server_message", None)
    return first_line(message) if message else first_line(exc)


def check_push(ref: str, token: str | None = None) -> tuple[str, str | None]:
    """Everything about a push that can be known before a merge (repo id and branch, online, a token), so that a
    merge meant for the hub fails in a second rather than after writing the model. Returns (repo id, branch)."""
    repo_id, branch = split_repo_ref(ref)
    _check_online(repo_id)
    if not token:
        from huggingface_hub import HfApi

        _check_token(repo_id, None, HfApi())
    return repo_id, branch
