"""Only a verified merge is uploaded: `push_verified`, the rule behind `--verify --push-to-hub`, for Python callers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tiny_checkpoints import llama_checkpoint

from qlora_merge import MergeOptions, NotVerified, merge, publishing, push_verified
from qlora_merge.outputs.upload import UploadResult


@pytest.fixture
def uploads(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []

    def fake_push(folder: Path, repo_id: str, **kwargs: Any) -> UploadResult:
        calls.append({"folder": folder, "repo_id": repo_id, **kwargs})
        return UploadResult(repo_id, f"https://huggingface.co/{repo_id}", "c0ffee", 1, 1, kwargs.get("private"))

    monkeypatch.setattr(publishing, "push_to_hub", fake_push)
    return calls


def test_a_verified_merge_is_uploaded(tmp_path: Path, uploads: list[dict[str, Any]]) -> None:
    base, adapter = llama_checkpoint(tmp_path)
    merge(base, adapter, tmp_path / "out", dtype="f32")
    seen = []
    options = MergeOptions(hf_token="t0k")
    published = push_verified(
        base, adapter, tmp_path / "out", "me/merged", options, private=True, on_verified=seen.append
    )
    assert published.verification.ok and seen == [published.verification]
    assert uploads == [
        {"folder": tmp_path / "out", "repo_id": "me/merged", "private": True, "token": "t0k", "revision": None}
    ]


def test_a_merge_that_is_not_base_plus_adapter_is_not_uploaded(tmp_path: Path, uploads: list[dict[str, Any]]) -> None:
    base, adapter = llama_checkpoint(tmp_path / "one")
    _, other = llama_checkpoint(tmp_path / "two", seed=1)
    merge(base, other, tmp_path / "out")
    with pytest.raises(NotVerified, match=r"verification failed: .* differ") as raised:
        push_verified(base, adapter, tmp_path / "out", "me/merged")
    assert not raised.value.report.ok and raised.value.report.mismatched
    assert uploads == []
