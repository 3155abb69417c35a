"""Test-wide isolation: no test may reach the hub or write outside its temporary directories."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile

# huggingface_hub reads these once, at import, and module-scoped fixtures import it (through transformers) before
# any function-scoped fixture runs: they must be set before anything imports it.
_HUB_HOME = tempfile.mkdtemp(prefix="qlora-merge-tests-hf-")
atexit.register(shutil.rmtree, _HUB_HOME, ignore_errors=True)
os.environ["HF_HOME"] = _HUB_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_HUB_HOME, "hub")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("HF_TOKEN", None)

# A shell without job control starts background commands (`make test &`) with SIGINT ignored, and Python then
# installs no KeyboardInterrupt handler, in this process or in the CLIs the tests start: the Ctrl-C tests need it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_hub(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets an empty hub cache of its own, both in the environment and in the hub's import-time constants."""
    import huggingface_hub.constants as hub_constants

    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(2)
