"""Verify a merge, then push it to the hub: only a merge proved to be base + adapter is uploaded. The rule
`qlora-merge --verify --push-to-hub` follows, for Python callers too."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .api import AdapterRef, verify
from .errors import MergeError
from .options import MergeOptions
from .outputs.upload import UploadResult, push_to_hub
from .progress import ProgressCallback, ignore_progress
from .verification.tensors import VerifyReport


def failure_summary(report: VerifyReport) -> str:
    """One line: what differs, with the first few names and why."""
    parts = []
    for label, names in (
        ("differ", report.mismatched),
        ("missing", report.missing),
        ("unexpected", report.unexpected),
        ("LoRA keys left", report.lora_keys),
    ):
        if names:
            shown = ", ".join(f"{n} ({report.details[n]})" if n in report.details else n for n in names[:2])
            parts.append(f"{len(names)} {label}: {shown}{' …' if len(names) > 2 else ''}")
    return "; ".join(parts)


class NotVerified(MergeError):
    """The merged checkpoint is not base + adapter, so it was not pushed; `report` says what differs."""

    def __init__(self, report: VerifyReport) -> None:
        super().__init__(f"verification failed: {failure_summary(report)}")
        self.report = report


@dataclass(frozen=True)
class Published:
    """A verified merge and its upload."""

    verification: VerifyReport
    upload: UploadResult


def push_verified(
    base: str | Path | None,
    adapter: AdapterRef | Sequence[AdapterRef],
    merged: str | Path,
    repo_id: str,
    options: MergeOptions | None = None,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    on_verified: Callable[[VerifyReport], None] | None = None,
    progress: ProgressCallback = ignore_progress,
    **settings: Any,
) -> Published:
    """Prove that `merged` is `adapter` merged into `base` (`verify()`, with `options` and `settings` as for it),
    then upload it to `repo_id` (`push_to_hub`: `private`, `revision` a branch; `token` None is `options.hf_token`).

    A merge that is not base + adapter raises NotVerified (a MergeError) and nothing is uploaded; inputs that cannot
    be read raise as for verify(), a failed upload UploadError. `on_verified` is called with the passing report
    before the upload starts.
    """
    options = MergeOptions.from_settings(options, settings)
    report = verify(base, adapter, merged, options, progress=progress)
    if not report.ok:
        raise NotVerified(report)
    if on_verified is not None:
        on_verified(report)
    token = options.hf_token if token is None else token
    upload = push_to_hub(Path(merged), repo_id, private=private, token=token, revision=revision)
    return Published(report, upload)
