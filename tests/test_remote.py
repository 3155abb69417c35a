"""A hub base read from its headers only, against a local HTTP server that answers as the hub does: the index equals
open_checkpoint()'s of the same files, and not one byte of tensor data crosses the wire."""

from __future__ import annotations

import json
import re
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from factories import make_base
from huggingface_hub import constants
from huggingface_hub.utils import close_session
from tiny_checkpoints import llama_checkpoint

from qlora_merge import inspect_adapter
from qlora_merge.errors import CheckpointFormatError, InputNotFound, MergeError
from qlora_merge.inputs.index import open_checkpoint
from qlora_merge.inputs.reader import TensorReader
from qlora_merge.inputs.remote import HeadersNeedNetwork, HeadersNeedSafetensors, is_repo_ref, remote_base

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = COMMIT
    gated: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # other branches or tags -> commit


@dataclass
class Served:
    method: str
    path: str
    range: str | None
    body: int  # bytes of body sent


class FakeHub:
    """The hub's endpoints that model_info, hf_hub_download and range reads call: /api/models/{repo}[/revision/{rev}]
    and /{repo}/resolve/{rev}/{file}, which redirects weight files (LFS) to a CDN path on the same server."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.log: list[Served] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                hub.handle(self, head=False)

            def do_HEAD(self) -> None:
                hub.handle(self, head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo_id: str, directory: Path, **kwargs: object) -> Repo:
        files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
        self.repos[repo_id] = repo = Repo(files, **kwargs)  # type: ignore[arg-type]
        return repo

    def weight_bytes_served(self) -> int:
        return sum(s.body for s in self.log if s.path.endswith(".safetensors"))

    # --- the handler ----------------------------------------------------------------------------------------------

    def handle(self, request: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(request.path.split("?", 1)[0])
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
            self.api(request, match[1], match[2], path)
        elif match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            self.resolve(request, head, match[1], match[2], match[3], path)
        elif match := re.fullmatch(r"/cdn/([^/]+/[^/]+)/([0-9a-f]{40})/(.+)", path):
            repo = self.repos[match[1]]
            self.content(request, head, repo.files[match[3]], repo, path)
        else:
            self.error(request, head, 404, None, path)

    def commit_of(self, repo: Repo, revision: str | None) -> str | None:
        if revision in (None, "main", repo.commit):
            return repo.commit
        return repo.refs.get(revision, revision if revision in repo.refs.values() else None)  # type: ignore[arg-type]

    def api(self, request: BaseHTTPRequestHandler, repo_id: str, revision: str | None, path: str) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:  # the hub answers 401 for a repo that does not exist or that the caller may not see
            return self.error(request, False, 401, "RepoNotFound", path)
        commit = self.commit_of(repo, revision)
        if commit is None:
            return self.error(request, False, 404, "RevisionNotFound", path)
        siblings = [{"rfilename": name} for name in repo.files]
        body = json.dumps({"id": repo_id, "sha": commit, "gated": repo.gated, "siblings": siblings}).encode()
        self.send(request, False, 200, {"Content-Type": "application/json"}, body, path)

    def resolve(
        self, request: BaseHTTPRequestHandler, head: bool, repo_id: str, revision: str, file: str, path: str
    ) -> None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self.error(request, head, 401, "RepoNotFound", path)
        commit = self.commit_of(repo, revision)
        if commit is None:
            return self.error(request, head, 404, "RevisionNotFound", path)
        if repo.gated:
            return self.error(request, head, 401, "GatedRepo", path)
        if file not in repo.files:
            return self.error(request, head, 404, "EntryNotFound", path, {"X-Repo-Commit": commit})
        data = repo.files[file]
        etag = f'"{hash(data) & 0xFFFFFFFF:08x}"'
        if file.endswith(".safetensors"):  # LFS: a redirect carrying the file's size and etag, as the hub sends
            headers = {
                "Location": f"/cdn/{repo_id}/{commit}/{file}",
                "X-Repo-Commit": commit,
                "X-Linked-Etag": etag,
                "X-Linked-Size": str(len(data)),
                "Content-Length": "0",
            }
            return self.send(request, head, 302, headers, b"", path)
        self.content(request, head, data, repo, path, {"X-Repo-Commit": commit, "ETag": etag})

    def content(
        self,
        request: BaseHTTPRequestHandler,
        head: bool,
        data: bytes,
        repo: Repo,
        path: str,
        extra: dict[str, str] | None = None,
    ) -> None:
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", **(extra or {})}
        wanted = request.headers.get("Range")
        match = RANGE.fullmatch(wanted) if wanted else None
        if match is None:
            return self.send(request, head, 200, headers, data, path)
        start = int(match[1])
        end = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
        if start >= len(data):
            headers["Content-Range"] = f"bytes */{len(data)}"
            return self.send(request, head, 416, headers, b"", path)
        headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self.send(request, head, 206, headers, data[start : end + 1], path)

    def error(
        self,
        request: BaseHTTPRequestHandler,
        head: bool,
        status: int,
        code: str | None,
        path: str,
        extra: dict[str, str] | None = None,
    ) -> None:
        headers = {"Content-Type": "application/json", **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        body = json.dumps({"error": code or "Not Found"}).encode()
        self.send(request, head, status, headers, body, path)

    def send(
        self, request: BaseHTTPRequestHandler, head: bool, status: int, headers: dict[str, str], body: bytes, path: str
    ) -> None:
        request.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        for name, value in headers.items():
            request.send_header(name, value)
        request.end_headers()
        sent = 0 if head else len(body)
        if sent:
            request.wfile.write(body)
        with self.lock:
            self.log.append(Served(request.command, path, request.headers.get("Range"), sent))


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The fake hub as the endpoint, online; a fresh HTTP client that goes to it directly, never through a proxy."""
    server = FakeHub()
    # As HF_ENDPOINT set before the import would: the resolve URL template is built from it at import.
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    close_session()  # the shared client is made on first use, with the environment of that moment
    yield server
    close_session()
    server.close()


@pytest.fixture
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tensor data was read")

    monkeypatch.setattr(TensorReader, "read", refuse)
    monkeypatch.setattr(TensorReader, "read_bytes_into", refuse)


def header_sizes(base: Path) -> dict[str, int]:
    """Each weight file's header as it is on disk: 8 length bytes plus the JSON."""
    return {p.name: 8 + struct.unpack("<Q", p.read_bytes()[:8])[0] for p in sorted(base.glob("*.safetensors"))}


def layouts(tmp_path: Path, layout: str) -> tuple[Path, Path | None]:
    if layout == "transformers":  # a real transformers save_pretrained, sharded at 60KB
        return make_base("llama", tmp_path / "base"), None
    return llama_checkpoint(tmp_path, layers=2, shards=2 if layout == "two-shards" else 1)


@pytest.mark.parametrize("layout", ["single-file", "two-shards", "transformers"])
def test_index_from_headers_equals_the_local_one(tmp_path: Path, hub: FakeHub, layout: str) -> None:
    base, _ = layouts(tmp_path, layout)
    hub.add("org/tiny", base)
    remote = remote_base("org/tiny")
    local = open_checkpoint(base)

    assert (remote.repo_id, remote.commit, remote.revision) == ("org/tiny", COMMIT, None)
    assert remote.config == json.loads((base / "config.json").read_text())
    assert [f.path.name for f in remote.index.files] == [f.path.name for f in local.files]
    assert [f.metadata for f in remote.index.files] == [f.metadata for f in local.files]
    assert list(remote.index.tensors) == list(local.tensors)
    for name, entry in local.tensors.items():
        got = remote.index.tensors[name]
        assert (got.dtype, got.shape, got.start, got.end) == (entry.dtype, entry.shape, entry.start, entry.end)
        assert got.file == remote.index.root / entry.file.name
    assert remote.index.total_bytes == local.total_bytes
    assert remote.index.weight_file_names == local.weight_file_names
    assert str(remote.index.root) == f"org/tiny@{COMMIT}"

    # Headers only: per weight file, its 8 length bytes then its JSON header, nothing from the data after them.
    sizes = header_sizes(base)
    weight_requests = [s for s in hub.log if s.path.endswith(".safetensors") and s.method == "GET" and s.body]
    assert all(s.range is not None for s in weight_requests), "every read of a weight file is a range request"
    for s in weight_requests:
        _, end = map(int, RANGE.fullmatch(s.range).groups())  # type: ignore[union-attr]
        assert end < sizes[s.path.rsplit("/", 1)[1]], f"{s.path}: {s.range} reaches into the tensor data"
    assert hub.weight_bytes_served() == sum(sizes.values()) == remote.header_bytes
    weight_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert remote.weight_bytes == weight_bytes > 10 * remote.header_bytes
    # config.json and the index went into the hub cache at the pinned commit, as a download would put them
    assert remote.snapshot is not None and remote.snapshot.name == COMMIT
    assert (remote.snapshot / "config.json").read_bytes() == (base / "config.json").read_bytes()


def test_revision_is_pinned_to_its_commit(tmp_path: Path, hub: FakeHub) -> None:
    base, _ = llama_checkpoint(tmp_path, shards=2)
    hub.add("org/tiny", base, commit=COMMIT, refs={"v1": OLD_COMMIT})
    remote = remote_base("org/tiny@v1")
    assert (remote.revision, remote.commit) == ("v1", OLD_COMMIT)
    resolved = [s.path for s in hub.log if "/resolve/" in s.path]
    assert resolved and all(f"/resolve/{OLD_COMMIT}/" in path for path in resolved)


def test_the_planner_runs_on_the_remote_index(
    tmp_path: Path, hub: FakeHub, monkeypatch: pytest.MonkeyPatch, no_tensor_reads: None
) -> None:
    """What `inspect --base org/model` does once integrated: the planner on the header-only index, unchanged."""
    from qlora_merge import preparation as pipeline

    base, adapter = llama_checkpoint(tmp_path, layers=2, shards=2)
    hub.add("org/tiny", base)
    remote = remote_base("org/tiny")
    assert remote.snapshot is not None
    monkeypatch.setattr(pipeline, "resolve_base", lambda ref, token=None: remote.snapshot)
    monkeypatch.setattr(pipeline, "open_checkpoint", lambda root: remote.index)
    report = inspect_adapter(adapter, "org/tiny")
    assert report.base_matches is True and report.mismatches == ()
    monkeypatch.undo()
    assert inspect_adapter(adapter, base).base_matches is True


def one_line(error: pytest.ExceptionInfo[MergeError], *parts: str) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


def test_unknown_repo(hub: FakeHub) -> None:
    with pytest.raises(InputNotFound) as error:
        remote_base("org/absent")
    one_line(error, "org/absent", "no Hugging Face repo 'org/absent'", "--hf-token")
    assert hub.weight_bytes_served() == 0


def test_unknown_revision(tmp_path: Path, hub: FakeHub) -> None:
    hub.add("org/tiny", llama_checkpoint(tmp_path)[0])
    with pytest.raises(InputNotFound) as error:
        remote_base("org/tiny@v9")
    one_line(error, "org/tiny@v9", "has no revision 'v9'")


def test_gated_repo(tmp_path: Path, hub: FakeHub) -> None:
    hub.add("org/tiny", llama_checkpoint(tmp_path, shards=2)[0], gated=True)
    with pytest.raises(InputNotFound) as error:
        remote_base("org/tiny")
    one_line(error, "org/tiny", "gated", "reading model.safetensors.index.json", "--hf-token")


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (lambda raw: raw.replace(b'"shape":[32,32]', b'"shape":[32,33]', 1), "spans 2048 bytes but BF16[32, 33]"),
        (lambda raw: raw.replace(b'"dtype":"BF16"', b'"dtype":"XX16"', 1), "unknown dtype 'XX16'"),
        (lambda raw: raw[:8] + b"[" + raw[9:], "not valid JSON"),
        (lambda raw: struct.pack("<Q", 10**9) + raw[8:], "header length 1000000000 exceeds the file size"),
        (lambda raw: raw[:-10], "data offsets"),  # the data cut short: the last tensor ends past the file
    ],
    ids=["shape", "dtype", "json", "header-length", "truncated"],
)
def test_a_header_the_server_corrupts_is_refused(
    tmp_path: Path, hub: FakeHub, corrupt: Callable[[bytes], bytes], expected: str
) -> None:
    base, _ = llama_checkpoint(tmp_path, shards=2)
    repo = hub.add("org/tiny", base)
    name = "model-00001-of-00002.safetensors"
    repo.files[name] = corrupt(repo.files[name])
    with pytest.raises(CheckpointFormatError) as error:
        remote_base("org/tiny")
    one_line(error, f"org/tiny@{COMMIT}/{name}", expected)


def test_trailing_bytes_after_the_last_tensor_are_refused(tmp_path: Path, hub: FakeHub) -> None:
    repo = hub.add("org/tiny", llama_checkpoint(tmp_path)[0])
    repo.files["model.safetensors"] += b"appended"
    with pytest.raises(CheckpointFormatError) as error:
        remote_base("org/tiny")
    one_line(error, "model.safetensors", "8 bytes after the last tensor")


def test_a_shard_the_index_names_but_the_repo_lacks(tmp_path: Path, hub: FakeHub) -> None:
    repo = hub.add("org/tiny", llama_checkpoint(tmp_path, shards=2)[0])
    del repo.files["model-00002-of-00002.safetensors"]
    with pytest.raises(InputNotFound) as error:
        remote_base("org/tiny")
    one_line(error, "model-00002-of-00002.safetensors", "named by model.safetensors.index.json", "'org/tiny'")


def test_an_index_mapping_a_tensor_to_the_wrong_shard(tmp_path: Path, hub: FakeHub) -> None:
    repo = hub.add("org/tiny", llama_checkpoint(tmp_path, shards=2)[0])
    index = json.loads(repo.files["model.safetensors.index.json"])
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    repo.files["model.safetensors.index.json"] = json.dumps(index).encode()
    with pytest.raises(CheckpointFormatError) as error:
        remote_base("org/tiny")
    one_line(error, "'lm_head.weight' is mapped to model-00001-of-00002.safetensors but is not in it")


def test_pickle_only_repo_needs_safetensors(tmp_path: Path, hub: FakeHub) -> None:
    hub.repos["org/old"] = Repo({"config.json": b"{}", "pytorch_model.bin": b"\x80\x02"})
    with pytest.raises(HeadersNeedSafetensors) as error:
        remote_base("org/old")
    one_line(error, "org/old", "pytorch_model.bin", "header-only inspection needs safetensors")


def test_offline_says_headers_need_the_network(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HeadersNeedNetwork) as error:
        remote_base("org/tiny")
    one_line(error, "org/tiny", "HF_HUB_OFFLINE is set", "needs the network", "hub cache")
    assert hub.log == []


def test_unreachable_hub(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    hub.close()
    with pytest.raises(HeadersNeedNetwork) as error:
        remote_base("org/tiny")
    one_line(error, "org/tiny", "cannot be reached", "needs the network")


def test_is_repo_ref(tmp_path: Path) -> None:
    assert is_repo_ref("org/model") and is_repo_ref("org/model@v1")
    assert not is_repo_ref(str(tmp_path))
    with pytest.raises(InputNotFound, match="directory not found"):
        is_repo_ref("./missing")
