"""Test-wide isolation: no test may reach the hub or write outside its temporary directories."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def isolated_hub(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(2)
