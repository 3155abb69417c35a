"""push_to_hub against a fake HfApi: exactly what would be sent, refusals before any call, hub errors in one line."""

from __future__ import annotations

import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any

import httpx2
import pytest
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import (
    BadRequestError,
    GatedRepoError,
    HfHubHTTPError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import CommitInfo, ModelInfo, RepoUrl

from qlora_merge import __version__, merge
from qlora_merge.errors import MergeError
from qlora_merge.outputs.upload import UploadError, UploadResult, push_to_hub, split_repo_ref, upload_files

REPO = "me/tiny-merged"
OID = "0123456789abcdef0123456789abcdef01234567"
ENDPOINT = "https://huggingface.co"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama"


class FakeApi:
    """Records every call HfApi would make and answers as the hub does; `fail` makes one method raise."""

    def __init__(self, *, existing_private: bool | None = None, fail: dict[str, BaseException] | None = None):
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.existing_private = existing_private  # None: the repo does not exist yet
        self.fail = fail or {}
        self.created_private: bool | None = None

    def _record(self, method: str, *args: Any, **kwargs: Any) -> None:
        # The real HfApi would accept the call: same positional and keyword parameters.
        inspect.signature(getattr(HfApi, method)).bind(self, *args, **kwargs)
        if args:
            kwargs = {"repo_id": args[0], **kwargs}
        # upload_folder appends its own defaults to ignore_patterns: keep a copy of what was passed, not the list.
        self.calls.append((method, {k: list(v) if isinstance(v, list) else v for k, v in kwargs.items()}))
        if method in self.fail:
            raise self.fail[method]

    def create_repo(self, repo_id: str, **kwargs: Any) -> RepoUrl:
        self._record("create_repo", repo_id, **kwargs)
        if self.existing_private is None:
            self.created_private = bool(kwargs.get("private"))
        return RepoUrl(f"{ENDPOINT}/{repo_id}", endpoint=ENDPOINT)

    def repo_info(self, repo_id: str, **kwargs: Any) -> ModelInfo:
        self._record("repo_info", repo_id, **kwargs)
        private = self.existing_private if self.existing_private is not None else self.created_private
        return ModelInfo(id=repo_id, private=private, sha=OID)

    def create_branch(self, repo_id: str, **kwargs: Any) -> None:
        self._record("create_branch", repo_id, **kwargs)

    def upload_folder(self, **kwargs: Any) -> CommitInfo:
        self._record("upload_folder", **kwargs)
        if isinstance(kwargs.get("ignore_patterns"), list):
            kwargs["ignore_patterns"] += [".git", "*/.git"]  # as the real one does to the caller's list
        return CommitInfo(
            commit_url=f"{ENDPOINT}/{kwargs['repo_id']}/commit/{OID}",
            commit_message=kwargs.get("commit_message") or "",
            commit_description="",
            oid=OID,
        )

    def methods(self) -> list[str]:
        return [method for method, _ in self.calls]

    def call(self, method: str) -> dict[str, Any]:
        (found,) = [kwargs for name, kwargs in self.calls if name == method]
        return found


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test session runs with HF_HUB_OFFLINE set (conftest); an upload needs it unset. No token anywhere."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


def fake_merge(directory: Path, shards: int = 1) -> Path:
    """A folder laid out as a published merge: config, weights (index when sharded), card, tokenizer."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"model_type": "llama"}\n')
    (directory / "README.md").write_text("---\ntags:\n- merge\n---\n# Merged model\n")
    (directory / "tokenizer.json").write_text("{}")
    names = ["model.safetensors"] if shards == 1 else [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in (1, 2)]
    for i, name in enumerate(names):
        (directory / name).write_bytes(b"\0" * (100 + i))
    if shards > 1:
        index = {"metadata": {}, "weight_map": {f"w{i}": name for i, name in enumerate(names)}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def total_bytes(directory: Path, names: list[str]) -> int:
    return sum((directory / name).stat().st_size for name in names)


def test_new_repo_what_is_sent(tmp_path: Path, online: None) -> None:
    folder = fake_merge(tmp_path / "merged")
    api = FakeApi()
    result = push_to_hub(folder, REPO, token="hf_test", api=api)  # type: ignore[arg-type]

    assert api.methods() == ["create_repo", "repo_info", "upload_folder"]
    assert api.call("create_repo") == {
        "repo_id": REPO,
        "private": False,
        "exist_ok": True,
        "repo_type": "model",
        "token": "hf_test",
    }
    assert api.call("upload_folder") == {
        "folder_path": folder,
        "repo_id": REPO,
        "repo_type": "model",
        "revision": None,
        "commit_message": f"Upload merged model (qlora-merge {__version__})",
        "ignore_patterns": [".*", "*/.*"],
        "token": "hf_test",
    }
    files = ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    assert result == UploadResult(
        repo_id=REPO,
        url=f"{ENDPOINT}/{REPO}/commit/{OID}",
        commit=OID,
        files=len(files),
        bytes=total_bytes(folder, files),
        private=False,
        revision=None,
    )
    assert result.to_dict() == {
        "repo_id": REPO,
        "url": f"{ENDPOINT}/{REPO}/commit/{OID}",
        "commit": OID,
        "files": 4,
        "bytes": total_bytes(folder, files),
        "private": False,
        "revision": None,
    }
    json.dumps(result.to_dict())  # --json prints it


def test_private_branch_and_message(tmp_path: Path, online: None) -> None:
    folder = fake_merge(tmp_path / "merged", shards=2)
    api = FakeApi()
    result = push_to_hub(
        folder,
        REPO,
        private=True,
        token="hf_test",
        revision="f16",
        commit_message="merge of run 7",
        api=api,  # type: ignore[arg-type]
    )
    assert api.methods() == ["create_repo", "repo_info", "create_branch", "upload_folder"]
    assert api.call("create_repo")["private"] is True
    assert api.call("create_branch") == {
        "repo_id": REPO,
        "branch": "f16",
        "exist_ok": True,
        "repo_type": "model",
        "token": "hf_test",
    }
    upload = api.call("upload_folder")
    assert (upload["revision"], upload["commit_message"]) == ("f16", "merge of run 7")
    assert (result.private, result.revision, result.files) == (True, "f16", 6)


def test_the_ignore_list_is_fresh_each_call(tmp_path: Path, online: None) -> None:
    """upload_folder appends to the list it is given: a shared constant would grow with every upload."""
    folder = fake_merge(tmp_path / "merged")
    api = FakeApi()
    for _ in range(2):
        push_to_hub(folder, REPO, token="hf_test", api=api)  # type: ignore[arg-type]
    uploads = [kwargs["ignore_patterns"] for name, kwargs in api.calls if name == "upload_folder"]
    assert uploads == [[".*", "*/.*"], [".*", "*/.*"]]


def test_hidden_files_are_not_counted_or_sent(tmp_path: Path, online: None) -> None:
    folder = fake_merge(tmp_path / "merged")
    (folder / ".DS_Store").write_bytes(b"x" * 1000)
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "upload.lock").write_text("x")
    (folder / "extra").mkdir()
    (folder / "extra" / ".hidden").write_text("x")
    (folder / "extra" / "notes.txt").write_text("kept")
    (folder / "dangling.json").symlink_to(tmp_path / "nowhere.json")

    files = upload_files(folder)
    assert files == ["README.md", "config.json", "extra/notes.txt", "model.safetensors", "tokenizer.json"]
    result = push_to_hub(folder, REPO, token="hf_test", api=FakeApi())  # type: ignore[arg-type]
    assert (result.files, result.bytes) == (5, total_bytes(folder, files))


def test_the_patterns_are_the_hubs_own_filter(tmp_path: Path) -> None:
    """Our patterns, run through huggingface_hub's own filter as upload_folder runs them, drop dot paths only."""
    from huggingface_hub.utils import filter_repo_objects

    paths = ["config.json", ".gitattributes", "a/.b", "a/b/.c/d", "a/b.c", ".x/y"]
    assert list(filter_repo_objects(paths, ignore_patterns=[".*", "*/.*"])) == ["config.json", "a/b.c"]


def test_token_none_uses_huggingface_hubs_discovery(tmp_path: Path, online: None, monkeypatch) -> None:
    folder = fake_merge(tmp_path / "merged")
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    api = FakeApi()
    push_to_hub(folder, REPO, api=api)  # type: ignore[arg-type]
    # None is passed on, so HfApi finds the token itself (HF_TOKEN, then the stored login).
    assert all(kwargs["token"] is None for _, kwargs in api.calls)


def test_token_set_on_the_client_is_enough(tmp_path: Path, online: None) -> None:
    api = FakeApi()
    api.token = "hf_on_client"  # type: ignore[attr-defined]
    push_to_hub(fake_merge(tmp_path / "merged"), REPO, api=api)  # type: ignore[arg-type]
    assert api.methods()[-1] == "upload_folder"


def test_existing_public_repo_asked_private_is_refused(tmp_path: Path, online: None) -> None:
    """A model meant to be private never goes to a public repo: nothing is uploaded."""
    folder = fake_merge(tmp_path / "merged")
    api = FakeApi(existing_private=False)
    with pytest.raises(UploadError, match=r"already exists and is public.*nothing was uploaded"):
        push_to_hub(folder, REPO, private=True, token="hf_test", api=api)  # type: ignore[arg-type]
    assert "upload_folder" not in api.methods()
    api = FakeApi(fail={"repo_info": http_error(HfHubHTTPError, 500)})
    with pytest.raises(UploadError, match="visibility cannot be read"):
        push_to_hub(folder, REPO, private=True, token="hf_test", api=api)  # type: ignore[arg-type]
    assert "upload_folder" not in api.methods()


def test_existing_private_repo_stays_private(tmp_path: Path, online: None, caplog) -> None:
    api = FakeApi(existing_private=True)
    with caplog.at_level(logging.WARNING, logger="qlora_merge.outputs.upload"):
        result = push_to_hub(fake_merge(tmp_path / "merged"), REPO, token="hf_test", api=api)  # type: ignore[arg-type]
    assert result.private is True
    assert caplog.text == ""


def test_unreadable_visibility_is_only_a_warning(tmp_path: Path, online: None, caplog) -> None:
    api = FakeApi(fail={"repo_info": http_error(HfHubHTTPError, 500)})
    with caplog.at_level(logging.WARNING, logger="qlora_merge.outputs.upload"):
        result = push_to_hub(fake_merge(tmp_path / "merged"), REPO, token="hf_test", api=api)  # type: ignore[arg-type]
    assert result.private is None
    assert "could not read the repo's visibility" in caplog.text
    assert api.methods()[-1] == "upload_folder"


def test_a_real_merge_output_is_accepted(tmp_path: Path, online: None) -> None:
    output = tmp_path / "merged"
    merge(str(EXAMPLE / "base"), str(EXAMPLE / "adapter"), str(output))
    api = FakeApi()
    result = push_to_hub(output, REPO, token="hf_test", api=api)  # type: ignore[arg-type]
    published = sorted(p.name for p in output.iterdir() if p.is_file() and not p.name.startswith("."))
    assert result.files == len(published)
    assert "config.json" in published and "README.md" in published
    assert api.call("upload_folder")["folder_path"] == output


# ---- refused before any call -------------------------------------------------------------------------------------


def refused(folder: Path, repo_id: str = REPO, match: str | None = None, **kwargs: Any) -> str:
    api = FakeApi()
    with pytest.raises(UploadError, match=match) as info:
        push_to_hub(folder, repo_id, api=api, **kwargs)  # type: ignore[arg-type]
    assert api.calls == []
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, MergeError)
    return message


def test_refuses_a_missing_folder(tmp_path: Path, online: None) -> None:
    refused(tmp_path / "nope", match=f"^{tmp_path / 'nope'}: no such directory to upload$", token="t")


def test_refuses_a_file(tmp_path: Path, online: None) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    refused(tmp_path / "model.safetensors", match="not a directory", token="t")


@pytest.mark.parametrize(
    ("remove", "match"),
    [
        ("config.json", "not a finished merge: no config.json"),
        ("model.safetensors", r"not a finished merge: no \*\.safetensors weights"),
    ],
)
def test_refuses_an_unfinished_folder(tmp_path: Path, online: None, remove: str, match: str) -> None:
    folder = fake_merge(tmp_path / "merged")
    (folder / remove).unlink()
    assert refused(folder, match=match, token="t").startswith(str(folder))


def test_refuses_a_missing_shard(tmp_path: Path, online: None) -> None:
    folder = fake_merge(tmp_path / "merged", shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    refused(
        folder, match="model-00002-of-00002.safetensors, named in model.safetensors.index.json, is missing", token="t"
    )


def test_refuses_an_unreadable_index(tmp_path: Path, online: None) -> None:
    folder = fake_merge(tmp_path / "merged", shards=2)
    (folder / "model.safetensors.index.json").write_text("{not json")
    refused(folder, match="model.safetensors.index.json is unreadable", token="t")


@pytest.mark.parametrize("kind", ["partial", "old"])
def test_refuses_a_staging_directory(tmp_path: Path, online: None, kind: str) -> None:
    staging = fake_merge(tmp_path / f".merged.{kind}-{os.getpid()}-abc123")
    refused(staging, match="staging directory of an unfinished", token="t")
    if kind == "old":  # publish parks the replaced output inside it, under the output's own name
        refused(fake_merge(staging / "merged_inner"), match="staging directory", token="t")


@pytest.mark.parametrize(
    ("repo_id", "match"),
    [
        ("tiny-merged", "not a hub repo id: expected namespace/name"),
        ("me/tiny@main", "without '@revision'"),
        ("me/sub/tiny", "not a hub repo id"),
        ("./me/tiny", "not a hub repo id"),
        ("", "not a hub repo id"),
        ("me/tiny--x", "not a valid hub repo id: Cannot have -- or .."),
        ("me/tiny.git", "not a valid hub repo id"),
        ("me/" + "x" * 100, "not a valid hub repo id"),
    ],
)
def test_refuses_a_bad_repo_id(tmp_path: Path, online: None, repo_id: str, match: str) -> None:
    refused(fake_merge(tmp_path / "merged"), repo_id, match=match, token="t")


@pytest.mark.parametrize("revision", ["", "two words", "-x", "/main", "a@b"])
def test_refuses_a_bad_branch(tmp_path: Path, online: None, revision: str) -> None:
    refused(fake_merge(tmp_path / "merged"), match="is not a branch name", token="t", revision=revision)


def test_refuses_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = refused(fake_merge(tmp_path / "merged"), token="t")
    assert message == f"{REPO}: cannot push to the hub while HF_HUB_OFFLINE is set: unset it and run again"


def test_refuses_without_any_token(tmp_path: Path, online: None) -> None:
    # conftest points HF_HOME at an empty temporary directory: no stored login; `online` clears HF_TOKEN.
    message = refused(fake_merge(tmp_path / "merged"), token=None)
    assert message == f"{REPO}: not logged in to the hub: pass --hf-token or set HF_TOKEN (or run `hf auth login`)"
    refused(fake_merge(tmp_path / "other"), token="", match="not logged in")  # an empty token is none


def test_split_repo_ref() -> None:
    assert split_repo_ref("me/tiny") == ("me/tiny", None)
    assert split_repo_ref("me/tiny@f16") == ("me/tiny", "f16")
    with pytest.raises(UploadError, match="empty branch"):
        split_repo_ref("me/tiny@")
    with pytest.raises(UploadError, match="not a hub repo id"):
        split_repo_ref("tiny@main")


# ---- hub errors, one line each --------------------------------------------------------------------------------------


def http_error(kind: type[HfHubHTTPError], status: int, server_message: str | None = None) -> HfHubHTTPError:
    request = httpx2.Request("POST", f"{ENDPOINT}/api/repos/create")
    response = httpx2.Response(status, request=request)
    return kind(
        f"{status} Client Error: for url {request.url}\nRequest ID: abc",
        response=response,
        server_message=server_message,
    )


@pytest.mark.parametrize(
    ("method", "error", "match"),
    [
        (
            "create_repo",
            http_error(HfHubHTTPError, 401),
            "while creating the repo: the hub did not accept the token \\(401 unauthorized\\): pass --hf-token",
        ),
        (
            "create_repo",
            http_error(HfHubHTTPError, 403),
            "may not write to namespace 'me' \\(403 forbidden\\): use a token with write access",
        ),
        (
            "upload_folder",
            http_error(RepositoryNotFoundError, 401),
            "while uploading: the hub did not accept the token",
        ),
        ("upload_folder", http_error(GatedRepoError, 403), "403 forbidden"),
        (
            "upload_folder",
            http_error(RepositoryNotFoundError, 404),
            "while uploading: the repo was not found, or this token cannot see it.*pass --hf-token or set HF_TOKEN",
        ),
        (
            "create_branch",
            http_error(RevisionNotFoundError, 404),
            "while creating branch 'f16': the repo has no branch",
        ),
        (
            "upload_folder",
            http_error(BadRequestError, 400, "Invalid metadata in README.md"),
            "while uploading \\(HTTP 400\\): Invalid metadata in README.md$",
        ),
        ("upload_folder", http_error(HfHubHTTPError, 500), "\\(HTTP 500\\): 500 Client Error: for url"),
        ("create_repo", httpx2.ConnectError("[Errno -3] name resolution failed"), "the hub cannot be reached"),
        ("upload_folder", httpx2.ReadTimeout("timed out"), "the hub cannot be reached \\(no network\\?\\): timed out"),
        ("create_repo", ConnectionError("reset by peer"), "the hub cannot be reached"),
        ("create_repo", OfflineModeIsEnabled("offline"), "while HF_HUB_OFFLINE is set"),
        ("create_repo", LocalTokenNotFoundError("no token"), "not logged in to the hub: pass --hf-token"),
        (
            "upload_folder",
            FileNotFoundError(2, "No such file or directory", "/x/model.safetensors"),
            "while uploading: No such file or directory \\(/x/model.safetensors\\)$",
        ),
    ],
)
def test_hub_errors_are_one_line(tmp_path: Path, online: None, method: str, error: Exception, match: str) -> None:
    api = FakeApi(fail={method: error})
    revision = "f16" if method == "create_branch" else None
    with pytest.raises(UploadError, match=match) as info:
        push_to_hub(fake_merge(tmp_path / "merged"), REPO, token="t", revision=revision, api=api)  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith(f"{REPO}: ")
    assert "\n" not in message
    assert info.value.__cause__ is error
    assert api.methods()[-1] == method  # nothing after the failing call


def test_other_exceptions_are_not_disguised(tmp_path: Path, online: None) -> None:
    """A bug (or a KeyboardInterrupt) is not a hub error: it goes through as it is."""
    api = FakeApi(fail={"upload_folder": KeyError("oops")})
    with pytest.raises(KeyError):
        push_to_hub(fake_merge(tmp_path / "merged"), REPO, token="t", api=api)  # type: ignore[arg-type]
