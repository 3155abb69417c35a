"""Where llama.cpp's own tools come from: its converter (Python) and its quantizer (the llama_cpp bindings).

The quantizer and the runtime come with `pip install qlora-merge[gguf]`, which pins llama-cpp-python (built from its
sdist: a C++ build of a few minutes, once). That wheel does not carry llama.cpp's Python converter, but the same
sdist does, under `vendor/llama.cpp`: `convert_hf_to_gguf.py`, its `conversion/` package and the `gguf-py` of the
same commit. `setup_converter()` (the `qlora-merge setup-gguf` command) downloads that sdist with pip and unpacks
those three into a cache directory, once; `find_converter()` finds them there, or in a llama.cpp checkout named
by `--llama-cpp DIR` or the QLORA_MERGE_LLAMA_CPP variable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import MissingDependency, first_line

logger = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
PACKAGE = "llama-cpp-python"
ENV_DIR = "QLORA_MERGE_LLAMA_CPP"
CACHE_ENV = "QLORA_MERGE_CACHE"
MARKER = "qlora-merge-converter.json"
INSTALL_HINT = f'pip install "qlora-merge[gguf]" (llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION})'
SETUP_HINT = "run `qlora-merge setup-gguf` once, or pass --llama-cpp DIR (a llama.cpp checkout)"

# What the converter needs from the sdist's vendor/llama.cpp: the script, its package, gguf-py, the licence.
_WANTED_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "LICENSE")
_WANTED_DIRS = ("conversion/", "gguf-py/gguf/")


@dataclass(frozen=True)
class Converter:
    """A llama.cpp converter ready to run: `script` with `conversion/` beside it and `gguf_py` (the directory holding
    the `gguf` package of the same commit, to go first on PYTHONPATH)."""

    root: Path
    version: str | None  # the llama-cpp-python release it was unpacked from; None for a checkout

    @property
    def script(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.root / "gguf-py"


def cache_root() -> Path:
    """$QLORA_MERGE_CACHE, else $XDG_CACHE_HOME/qlora-merge, else ~/.cache/qlora-merge."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qlora-merge"


def default_converter_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return cache_root() / f"llama.cpp-{version}"


def _is_converter_dir(root: Path) -> bool:
    return (
        (root / "convert_hf_to_gguf.py").is_file()
        and (root / "conversion" / "__init__.py").is_file()
        and (root / "gguf-py" / "gguf" / "__init__.py").is_file()
    )


def find_converter(directory: str | Path | None = None) -> Converter:
    """The converter in `directory` (a llama.cpp checkout or a directory `setup_converter` made), else in
    $QLORA_MERGE_LLAMA_CPP, else in the cache `setup_converter` fills. MissingDependency, one line, if none."""
    named = directory if directory is not None else os.environ.get(ENV_DIR) or None
    if named is not None:
        root = Path(named).expanduser()
        if _is_converter_dir(root):
            return Converter(root.resolve(), _marker_version(root))
        where = "--llama-cpp" if directory is not None else ENV_DIR
        raise MissingDependency(
            f"{where} {root}: not a llama.cpp converter (it needs convert_hf_to_gguf.py, conversion/ and gguf-py/); "
            f"name a llama.cpp checkout of the same version as llama-cpp-python, or {SETUP_HINT}"
        )
    root = default_converter_dir()
    if _is_converter_dir(root):
        return Converter(root, _marker_version(root))
    raise MissingDependency(f"llama.cpp's converter (convert_hf_to_gguf.py) is not set up at {root}: {SETUP_HINT}")


def _marker_version(root: Path) -> str | None:
    try:
        return str(json.loads((root / MARKER).read_text())["llama_cpp_python"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def setup_converter(
    sdist: str | Path | None = None, destination: str | Path | None = None, *, force: bool = False
) -> Converter:
    """Unpack llama.cpp's converter from llama-cpp-python's sdist into `destination` (default: the cache) and return
    it. `sdist` is a downloaded `llama_cpp_python-<version>.tar.gz`; without it, pip downloads the pinned one (76 MB)
    into a temporary directory. Nothing is done if the destination already holds a converter (unless `force`). The
    directory appears whole or not at all (unpacked beside it, then renamed)."""
    target = Path(destination).expanduser() if destination is not None else default_converter_dir()
    if _is_converter_dir(target) and not force:
        return Converter(target.resolve(), _marker_version(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".setup-", dir=target.parent) as scratch:
        archive = Path(sdist) if sdist is not None else _download_sdist(Path(scratch))
        unpacked = Path(scratch) / "converter"
        version = _unpack(archive, unpacked)
        if sdist is None and version != LLAMA_CPP_PYTHON_VERSION:
            raise MissingDependency(f"pip downloaded {PACKAGE} {version}, not {LLAMA_CPP_PYTHON_VERSION}")
        if target.exists():
            old = Path(scratch) / "old"
            target.rename(old)
        unpacked.rename(target)
    logger.info("llama.cpp converter of %s %s unpacked into %s", PACKAGE, version, target)
    return Converter(target.resolve(), version)


def _download_sdist(directory: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(directory),
        f"{PACKAGE}=={LLAMA_CPP_PYTHON_VERSION}",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    archives = sorted(directory.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not archives:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"pip exited {done.returncode}"
        raise MissingDependency(f"could not download {PACKAGE}=={LLAMA_CPP_PYTHON_VERSION}'s source with pip: {reason}")
    return archives[0]


def _unpack(archive: Path, destination: Path) -> str:
    """Extract the converter's files of `archive` (vendor/llama.cpp/...) into `destination`; returns the version."""
    if not archive.is_file():
        raise MissingDependency(f"{archive}: no such file (a {PACKAGE} sdist, llama_cpp_python-<version>.tar.gz)")
    digest = hashlib.sha256()
    with archive.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            top = members[0].name.split("/", 1)[0] if members else ""
            prefix = f"{top}/vendor/llama.cpp/"
            chosen = []
            for member in members:
                if not member.name.startswith(prefix) or not (member.isfile() or member.isdir()):
                    continue
                relative = member.name[len(prefix) :]
                if relative in _WANTED_FILES or any(relative.startswith(d) for d in _WANTED_DIRS):
                    member.name = relative
                    chosen.append(member)
            if not any(m.name == "convert_hf_to_gguf.py" for m in chosen):
                raise MissingDependency(f"{archive}: no vendor/llama.cpp/convert_hf_to_gguf.py in it")
            destination.mkdir(parents=True)
            tar.extractall(destination, members=chosen, filter="data")
    except (tarfile.TarError, OSError, EOFError) as error:
        raise MissingDependency(f"{archive}: not a readable {PACKAGE} sdist ({first_line(error)})") from error
    version = top.rsplit("-", 1)[-1] if "-" in top else "unknown"
    marker = {"llama_cpp_python": version, "sdist": archive.name, "sdist_sha256": digest.hexdigest()}
    (destination / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    if not _is_converter_dir(destination):
        raise MissingDependency(f"{archive}: its vendor/llama.cpp lacks conversion/ or gguf-py/")
    return version


def llama_cpp_module():
    """The llama_cpp bindings (llama.cpp's runtime and quantizer), or MissingDependency naming the install."""
    try:
        import llama_cpp
    except ImportError as error:
        raise MissingDependency(
            f"GGUF quantization needs llama-cpp-python ({first_line(error)}): {INSTALL_HINT}"
        ) from error
    version = getattr(llama_cpp, "__version__", None)
    if version != LLAMA_CPP_PYTHON_VERSION:
        logger.warning(
            "llama-cpp-python %s is installed; qlora-merge is tested with %s", version, LLAMA_CPP_PYTHON_VERSION
        )
    return llama_cpp


def remove_converter(destination: str | Path | None = None) -> None:
    """Delete what setup_converter unpacked (the cache directory by default)."""
    target = Path(destination) if destination is not None else default_converter_dir()
    if (target / MARKER).is_file():
        shutil.rmtree(target)
