"""Repo ids resolved through a real huggingface_hub cache (offline), local paths used in place, errors in one line."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
import huggingface_hub
import pytest
from factories import assert_same_tensors, make_adapter, make_base, read_tensors
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import filter_repo_objects

from qlora_merge import merge
from qlora_merge.cli import main
from qlora_merge.errors import InputNotFound
from qlora_merge.inputs.resolve import resolve_adapter, resolve_base

BASE_REPO = "org/tiny-llama"
ADAPTER_REPO = "org/tiny-lora"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A sharded tiny llama and a real PEFT adapter for it, as local directories."""
    root = tmp_path_factory.mktemp("sources")
    base = make_base("llama", root / "base")
    assert len(list(base.glob("model-*.safetensors"))) > 1
    return base, make_adapter(base, root / "adapter", "llama")


@pytest.fixture
def hub_cache(isolated_hub: None, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The hub cache HF_HUB_CACHE names, offline: what a user gets with those variables set before starting.

    huggingface_hub reads its environment once, at import, which an earlier test may have done: point its constants
    at this test's variables, as a fresh process would have them.
    """
    cache = Path(os.environ["HF_HUB_CACHE"])
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def add_to_cache(cache: Path, repo_id: str, files: dict[str, Path], commit: str, ref: str, symlinks: bool) -> Path:
    """Lay `files` out as huggingface_hub does: blobs by hash, snapshots/<commit> linking to them, refs/<ref>."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        target = snapshot / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if symlinks:
            blob = repo / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, blob)
            target.symlink_to(os.path.relpath(blob, target.parent))
        else:
            shutil.copyfile(source, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def cache_repos(cache: Path, sources: tuple[Path, Path], symlinks: bool = True) -> tuple[Path, Path]:
    base, adapter = sources
    return (
        add_to_cache(cache, BASE_REPO, {p.name: p for p in base.iterdir()}, COMMIT, "main", symlinks),
        add_to_cache(cache, ADAPTER_REPO, {p.name: p for p in adapter.iterdir()}, COMMIT, "main", symlinks),
    )


@pytest.fixture
def download_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every snapshot_download call's arguments; the real function still does the work."""
    calls: list[dict[str, Any]] = []
    real: Callable[..., str] = huggingface_hub.snapshot_download

    def spy(repo_id: str, **kwargs: Any) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    return calls


@pytest.mark.parametrize("symlinks", [False, True], ids=["plain-files", "blob-symlinks"])
def test_merge_from_repo_ids_is_the_local_merge(
    sources: tuple[Path, Path], hub_cache: Path, tmp_path: Path, symlinks: bool
) -> None:
    base_snapshot, adapter_snapshot = cache_repos(hub_cache, sources, symlinks)
    from_hub = merge(BASE_REPO, ADAPTER_REPO, tmp_path / "hub")
    merge(*sources, tmp_path / "local")
    assert from_hub.base == base_snapshot and from_hub.adapter == adapter_snapshot
    assert from_hub.tensors_merged > 0
    assert_same_tensors(read_tensors(tmp_path / "hub"), read_tensors(tmp_path / "local"))


def test_cli_with_repo_ids(sources: tuple[Path, Path], hub_cache: Path, tmp_path: Path) -> None:
    cache_repos(hub_cache, sources)
    out, err = io.StringIO(), io.StringIO()
    code = main(["--base", BASE_REPO, "--adapter", ADAPTER_REPO, "--output", str(tmp_path / "out")], out=out, err=err)
    assert code == 0, err.getvalue()
    assert "Done" in out.getvalue()
    assert_same_tensors(read_tensors(tmp_path / "out"), read_tensors(merge(*sources, tmp_path / "local").output))


def test_repo_not_in_cache_exits_2_with_one_line(sources: tuple[Path, Path], hub_cache: Path, tmp_path: Path) -> None:
    cache_repos(hub_cache, sources)
    out, err = io.StringIO(), io.StringIO()
    code = main(
        ["--base", "org/absent", "--adapter", ADAPTER_REPO, "--output", str(tmp_path / "out")], out=out, err=err
    )
    assert code == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1
    assert "org/absent" in lines[0] and "not in the hub cache" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert not (tmp_path / "out").exists()


def test_missing_relative_path_that_reads_as_a_repo_id(hub_cache: Path) -> None:
    with pytest.raises(InputNotFound) as caught:
        resolve_adapter("adapters/missing")
    message = str(caught.value)
    assert "no local directory" in message and str(Path("adapters/missing").absolute()) in message
    assert "not in the hub cache" in message and "\n" not in message


@pytest.mark.parametrize("ref", ["./adapters/missing", "adapters/x/missing", "C:\\adapters\\missing", "missing"])
def test_missing_path_that_is_no_repo_id_never_reaches_the_hub(
    ref: str, hub_cache: Path, download_calls: list[dict[str, Any]]
) -> None:
    with pytest.raises(InputNotFound, match="adapter directory not found"):
        resolve_adapter(ref)
    assert download_calls == []


def test_local_directory_is_used_in_place(sources: tuple[Path, Path], download_calls: list[dict[str, Any]]) -> None:
    assert resolve_base(str(sources[0])) == sources[0]
    assert resolve_adapter(str(sources[1])) == sources[1]
    assert download_calls == []


def test_file_instead_of_directory(tmp_path: Path) -> None:
    (tmp_path / "adapter.safetensors").write_bytes(b"x")
    with pytest.raises(InputNotFound, match="must be a directory"):
        resolve_adapter(str(tmp_path / "adapter.safetensors"))
    with pytest.raises(InputNotFound, match="empty path"):
        resolve_base("")


def test_hf_token_reaches_snapshot_download(
    sources: tuple[Path, Path], hub_cache: Path, tmp_path: Path, download_calls: list[dict[str, Any]]
) -> None:
    cache_repos(hub_cache, sources)
    code = main(
        ["--base", BASE_REPO, "--adapter", ADAPTER_REPO, "--output", str(tmp_path / "out"), "--hf-token", "hf_secret"],
        out=io.StringIO(),
        err=io.StringIO(),
    )
    assert code == 0
    assert {call["repo_id"] for call in download_calls} == {BASE_REPO, ADAPTER_REPO}
    assert all(call["token"] == "hf_secret" for call in download_calls)


def test_revision_after_at_sign(sources: tuple[Path, Path], hub_cache: Path) -> None:
    cache_repos(hub_cache, sources)
    adapter = sources[1]
    tagged = add_to_cache(hub_cache, ADAPTER_REPO, {p.name: p for p in adapter.iterdir()}, OTHER_COMMIT, "v1", True)
    assert resolve_adapter(f"{ADAPTER_REPO}@v1") == tagged
    assert resolve_adapter(f"{ADAPTER_REPO}@{OTHER_COMMIT}") == tagged
    with pytest.raises(InputNotFound, match="at revision 'v2' is not in the hub cache"):
        resolve_adapter(f"{ADAPTER_REPO}@v2")


def test_base_fetches_metadata_then_only_indexed_shards(
    sources: tuple[Path, Path], hub_cache: Path, download_calls: list[dict[str, Any]]
) -> None:
    base_snapshot, _ = cache_repos(hub_cache, sources)
    assert resolve_base(BASE_REPO) == base_snapshot
    shards = sorted(p.name for p in sources[0].glob("model-*.safetensors"))
    # What a hub repo holds besides the weights we want; the hub's own filter decides what would be fetched.
    repo_files = [
        *shards,
        "model.safetensors.index.json",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "merges.txt",
        "LICENSE",
        "README.md",
        ".gitattributes",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "consolidated.safetensors",
        "model.gguf",
        "onnx/model.onnx",
        "onnx/config.json",
        "original/consolidated.00.pth",
        "original/params.json",
        "original/tokenizer.model",
    ]

    def fetched(call: dict[str, Any]) -> set[str]:
        patterns = {"allow_patterns": call["allow_patterns"], "ignore_patterns": call["ignore_patterns"]}
        return set(filter_repo_objects(repo_files, **patterns))

    metadata, weights = download_calls
    assert fetched(metadata) == {
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "merges.txt",
        "LICENSE",
    }
    assert fetched(weights) == set(shards)
    assert weights["revision"] == COMMIT  # pinned to the commit the index came from


def test_adapter_fetches_config_weights_and_tokenizer(
    sources: tuple[Path, Path], hub_cache: Path, download_calls: list[dict[str, Any]]
) -> None:
    _, adapter_snapshot = cache_repos(hub_cache, sources)
    assert resolve_adapter(ADAPTER_REPO) == adapter_snapshot
    repo_files = [
        "adapter_config.json",
        "adapter_model.safetensors",
        "adapter_model.bin",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
        "README.md",
        "training_args.bin",
        "optimizer.pt",
        "checkpoint-500/adapter_model.safetensors",
    ]
    (call,) = download_calls  # a safetensors adapter: no second call for the pickle
    assert set(filter_repo_objects(repo_files, allow_patterns=call["allow_patterns"], ignore_patterns=["*/*"])) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "chat_template.jinja",
    }


def test_pickle_adapter_is_fetched_when_there_is_no_safetensors(
    sources: tuple[Path, Path], hub_cache: Path, download_calls: list[dict[str, Any]]
) -> None:
    config = sources[1] / "adapter_config.json"
    snapshot = add_to_cache(hub_cache, ADAPTER_REPO, {config.name: config}, COMMIT, "main", True)
    assert resolve_adapter(ADAPTER_REPO) == snapshot
    assert [call["allow_patterns"] for call in download_calls][1:] == [["adapter_model.bin"]]


def test_cached_snapshot_missing_a_shard(sources: tuple[Path, Path], hub_cache: Path) -> None:
    base_snapshot, _ = cache_repos(hub_cache, sources)
    shard = sorted(base_snapshot.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(InputNotFound, match=rf"{re.escape(shard.name)} is missing from the snapshot .*HF_HUB_OFFLINE"):
        resolve_base(BASE_REPO)


def test_adapter_repo_without_adapter_config(sources: tuple[Path, Path], hub_cache: Path) -> None:
    weights = sources[1] / "adapter_model.safetensors"
    add_to_cache(hub_cache, ADAPTER_REPO, {weights.name: weights}, COMMIT, "main", True)
    with pytest.raises(InputNotFound, match=r"adapter_config\.json is missing"):
        resolve_adapter(ADAPTER_REPO)


def test_invalid_repo_id_is_one_clear_error(hub_cache: Path) -> None:
    with pytest.raises(InputNotFound, match="neither a local directory nor a valid repo id"):
        resolve_base("org/bad--name")


def hub_error(kind: type[Exception], status: int) -> Exception:
    request = httpx2.Request("GET", "https://huggingface.co/api/models/org/remote")
    return kind(f"{status} Client Error.\nmore detail", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    ("error", "offline", "expected"),
    [
        (
            hub_error(GatedRepoError, 403),
            False,
            re.escape("gated Hugging Face repo: accept its terms on the hub, then pass --hf-token or set HF_TOKEN"),
        ),
        (
            hub_error(RepositoryNotFoundError, 401),
            False,
            re.escape("no Hugging Face repo 'org/remote' (if it is private, pass --hf-token or set HF_TOKEN)"),
        ),
        (hub_error(RevisionNotFoundError, 404), False, re.escape("'org/remote' has no revision 'v9'")),
        (
            hub_error(HfHubHTTPError, 401),
            False,
            re.escape("download from the hub failed: 401 Client Error. (pass --hf-token or set HF_TOKEN)"),
        ),
        (hub_error(HfHubHTTPError, 503), False, r"download from the hub failed: 503 Client Error\.$"),
        (
            LocalEntryNotFoundError("x"),
            False,
            r"not in the hub cache .* and the hub cannot be reached \(no network\?\)",
        ),
        (LocalEntryNotFoundError("x"), True, "not in the hub cache .* and HF_HUB_OFFLINE is set"),
        (
            IncompleteSnapshotError("x", snapshot_path="/x"),
            True,
            re.escape("cached snapshot at revision 'v9' is incomplete and HF_HUB_OFFLINE is set"),
        ),
    ],
)
def test_hub_errors_become_one_line(
    error: Exception, offline: bool, expected: str, hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(repo_id: str, **kwargs: Any) -> str:
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)  # stands in for the hub: nothing is sent
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    with pytest.raises(InputNotFound, match=expected) as caught:
        resolve_base("org/remote@v9")
    assert "\n" not in str(caught.value) and str(caught.value).startswith("org/remote@v9: ")


def test_revision_flags(sources: tuple[Path, Path], hub_cache: Path, tmp_path: Path) -> None:
    """--revision pins the base and --adapter-revision the adapters, as org/name@rev does; local paths refuse it."""
    cache_repos(hub_cache, sources)
    base, adapter = sources
    add_to_cache(hub_cache, BASE_REPO, {p.name: p for p in base.iterdir()}, OTHER_COMMIT, "v1", True)
    add_to_cache(hub_cache, ADAPTER_REPO, {p.name: p for p in adapter.iterdir()}, OTHER_COMMIT, "v1", True)
    out = tmp_path / "out"
    flags = ["--base", BASE_REPO, "--adapter", ADAPTER_REPO, "--output", str(out), "--json"]
    code = main([*flags, "--revision", "v1", "--adapter-revision", "v1"], io.StringIO(), io.StringIO())
    assert code == 0
    card = (out / "README.md").read_text()
    assert f"`{BASE_REPO}@v1` (commit `{OTHER_COMMIT}`)" in card
    assert f"`{ADAPTER_REPO}@v1` (commit `{OTHER_COMMIT}`)" in card
    for extra, message in (
        (["--revision", "v2"], "at revision 'v2' is not in the hub cache"),
        (["--base", str(base), "--revision", "v1"], "applies to Hugging Face repo ids, and this is a local path"),
        (["--base", f"{BASE_REPO}@main", "--revision", "v1"], "names revision 'main' and --revision names 'v1'"),
    ):
        err = io.StringIO()
        assert main([*flags, "--overwrite", *extra], io.StringIO(), err) == 2
        assert message in err.getvalue() and len(err.getvalue().splitlines()) == 1
