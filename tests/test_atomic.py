"""The output is all or nothing: a merge killed at any moment leaves no output or the complete one; what a killed
merge leaves beside it is hidden and cleared by the next merge; no space, a read-only place and an output holding an
input are refused before anything is written."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_checkpoints import llama_checkpoint

from qlora_merge import OutputError, merge
from qlora_merge.cli import main
from qlora_merge.outputs.staging import remove_stale

# A pid no process can have: larger than the kernel's largest.
DEAD_PID = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def leftovers(parent: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


# ------------------------------------------------------------------------------------------------------- SIGKILL


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A ~75 MB bf16 llama (two layers, two shards) and its adapter, large enough that a merge takes about a second,
    and our own complete merge of them in five shards, to compare killed runs against."""
    root = tmp_path_factory.mktemp("kill")
    base, adapter = llama_checkpoint(root, hidden=1024, intermediate=2816, layers=2, vocab=8192, rank=16, shards=2)
    reference = root / "reference"
    merge(base, adapter, reference, max_shard_size="20MB")
    assert len(list(reference.glob("*.safetensors"))) >= 4
    return base, adapter, reference


def start_merge(base: Path, adapter: Path, output: Path) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "qlora_merge", "--base", str(base), "--adapter", str(adapter)]
    command += ["--output", str(output), "--overwrite", "--max-shard-size", "20MB", "--json"]
    env = os.environ | {"OMP_NUM_THREADS": "2"}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def seen(parent: Path, event: str, shards: list[str], pid: int) -> bool:
    """Whether the merge `pid` into parent/out has reached `event`, judged from what is on disk."""
    names = os.listdir(parent)
    if event == "published":
        return "out" in names and not any(n.startswith(".out.old-") for n in names)
    if event == "retired":
        return any(n.startswith(".out.old-") for n in names)
    staging = [parent / n for n in names if n.startswith(f".out.partial-{pid}-")]  # not a killed run's
    if event == "staging":
        return bool(staging)
    try:
        inside = {n for s in staging for n in os.listdir(s)}
    except FileNotFoundError:  # renamed or removed while we looked
        return False
    wanted = {"shard-1": shards[0], "shard-3": shards[2], "config": "config.json"}
    return wanted[event] in inside


def kill_at(process: subprocess.Popen[bytes], parent: Path, event: str, delay: float, shards: list[str]) -> bool:
    """SIGKILL the merge once `event` is seen (plus `delay` seconds); False if it finished first."""
    deadline = time.monotonic() + 120
    while not seen(parent, event, shards, process.pid):
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"merge never reached {event}"
        time.sleep(0.0005)
    if delay:
        time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    return process.returncode == -signal.SIGKILL


def output_state(output: Path, reference: Path) -> str:
    """'absent', or 'complete' after checking every file, the index and every tensor against the reference; anything
    else fails the test."""
    if not output.exists():
        return "absent"
    assert sorted(p.name for p in output.iterdir()) == sorted(p.name for p in reference.iterdir())
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert index == json.loads((reference / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(output / shard))
    expected = {}
    for shard in reference.glob("*.safetensors"):
        expected.update(load_file(shard))
    assert tensors.keys() == expected.keys() == index["weight_map"].keys()
    assert all(torch.equal(tensors[name], expected[name]) for name in expected)
    assert (output / "config.json").read_text() == (reference / "config.json").read_text()
    return "complete"


# (event, seconds after it): where each run is killed. Until one run completes there is no output; after that the
# complete one stays until the next run replaces it.
KILLS = [
    ("staging", 0.0),
    ("staging", 0.15),
    ("shard-1", 0.0),
    ("shard-3", 0.0),
    ("config", 0.0),
    ("published", 0.0),
    ("shard-1", 0.0),
]


def test_sigkill_leaves_no_output_or_the_complete_one(large: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, adapter, reference = large
    output = tmp_path / "out"
    shards = sorted(p.name for p in reference.glob("*.safetensors"))
    killed = 0
    published = False
    for event, delay in KILLS:
        process = start_merge(base, adapter, output)
        if kill_at(process, tmp_path, event, delay, shards):
            killed += 1
            state = output_state(output, reference)
            # never half an output; once complete, no later killed run takes it away. A kill meant for an earlier
            # moment may land after the publish on a fast machine (the 0.15 s after "staging" can be a whole merge).
            assert state in ("absent", "complete"), (event, delay, state)
            assert state == "complete" or not (published or event == "published"), (event, delay, state)
            published |= state == "complete"
            # A killed run leaves only its own hidden staging dir: the runs before it were cleared when it started.
            stale = [n for n in leftovers(tmp_path) if n.startswith(".out.partial-")]
            assert all(n.startswith(f".out.partial-{process.pid}-") for n in stale), (event, stale)
        else:  # it finished before the event was seen (a loaded machine can be that slow to look)
            assert process.returncode == 0, process.stderr.read() if process.stderr else ""
            assert output_state(output, reference) == "complete"
            published = True
    # A fast machine may finish a run before a short window is seen (the config.json one is milliseconds).
    assert killed >= 3, "too few runs were killed to show anything"
    process = start_merge(base, adapter, output)
    assert process.wait(timeout=120) == 0
    assert output_state(output, reference) == "complete"
    assert leftovers(tmp_path) == [], "the last merge removed what the killed ones left"


# ------------------------------------------------------------------------------------------- what kills leave behind


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return llama_checkpoint(tmp_path_factory.mktemp("small"))


def test_stale_staging_dirs_of_dead_merges_are_removed_and_others_kept(tmp_path: Path) -> None:
    output = tmp_path / "out"
    dead = tmp_path / f".out.partial-{DEAD_PID}-abc123"
    (dead / "sub").mkdir(parents=True)
    (dead / "sub" / "model.safetensors").write_bytes(b"half a shard")
    kept = [
        tmp_path / f".out.partial-{os.getppid()}-live",  # a merge still running
        tmp_path / ".out.partial-x8k2j1",  # no pid: not a name we make
        tmp_path / f".other.partial-{DEAD_PID}-abc",  # another output's
        tmp_path / f".out.partial-{DEAD_PID}-file",  # a file, not our directory
    ]
    for path in kept[:3]:
        path.mkdir()
    kept[3].write_text("not ours")
    assert remove_stale(output) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in kept)


def test_an_old_output_parked_by_a_killed_merge_is_put_back(small: tuple[Path, Path], tmp_path: Path) -> None:
    """Killed between publish's two renames: the old output is only in `.out.old-PID-*`. The next merge puts it back
    first, so without --overwrite it is still refused, and with it replaced."""
    base, adapter = small
    output = tmp_path / "out"
    parked = tmp_path / f".out.old-{DEAD_PID}-zz" / "out"
    parked.mkdir(parents=True)
    (parked / "old.txt").write_text("the previous merge")
    with pytest.raises(OutputError, match="--overwrite"):
        merge(base, adapter, output)
    assert (output / "old.txt").read_text() == "the previous merge"
    assert leftovers(tmp_path) == []
    merge(base, adapter, output, overwrite=True)
    assert not (output / "old.txt").exists() and (output / "model.safetensors").is_file()


def test_staging_dir_is_hidden_and_names_its_process(
    small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qlora_merge.api

    base, adapter = small
    names: list[str] = []
    real_finish = qlora_merge.api.finish_output

    def finish(inputs: object, staging: Path, *args: object) -> object:
        names.append(staging.name)
        return real_finish(inputs, staging, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(qlora_merge.api, "finish_output", finish)
    merge(base, adapter, tmp_path / "out")
    assert len(names) == 1 and names[0].startswith(f".out.partial-{os.getpid()}-")


# ----------------------------------------------------------------------------------------- refused before writing


def run_cli(base: Path, adapter: Path, output: Path, *extra: str) -> tuple[int, str]:
    err = io.StringIO()
    argv = ["--base", str(base), "--adapter", str(adapter), "--output", str(output), *extra]
    return main(argv, out=io.StringIO(), err=err), err.getvalue()


def assert_one_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("qlora-merge: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def test_not_enough_free_space_is_refused_before_writing(
    small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, adapter = small
    asked: list[Path] = []

    def disk_usage(path: str | Path) -> shutil._ntuple_diskusage:  # type: ignore[name-defined]
        asked.append(Path(path))
        return shutil._ntuple_diskusage(10**9, 10**9 - 12345, 12345)  # type: ignore[attr-defined]

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    output = tmp_path / "new" / "dirs" / "out"
    with pytest.raises(OutputError, match=r"not enough free space.*needs .* \(\d+ bytes.*12.3 KB \(12345 bytes\)"):
        merge(base, adapter, output)
    # The lock file beside the output made its parents first (removed again below): measured there.
    assert asked[-1] == tmp_path / "new" / "dirs", "measured on the nearest existing directory"
    code, err = run_cli(base, adapter, output)
    assert_one_line(code, err, str(tmp_path), "not enough free space", "12345 bytes")
    assert list(tmp_path.iterdir()) == [], "nothing was created"


def test_enough_free_space_is_not_refused(
    small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The near miss: exactly the planned bytes plus the headroom is enough."""
    from qlora_merge.outputs.staging import SPACE_HEADROOM_BYTES

    base, adapter = small
    planned = merge(base, adapter, tmp_path / "dry", dry_run=True).bytes_written
    free = planned + SPACE_HEADROOM_BYTES  # config.json is written, not copied: the headroom covers it
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(free, 0, free))  # type: ignore[attr-defined]
    merge(base, adapter, tmp_path / "out")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(free, 1, free - 1))  # type: ignore[attr-defined]
    with pytest.raises(OutputError, match="not enough free space"):
        merge(base, adapter, tmp_path / "out2")


@pytest.mark.parametrize("error", [errno.EROFS, errno.EACCES])
def test_read_only_destination_is_a_clear_error(
    small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int
) -> None:
    """The refusals the kernel gives (EROFS, EACCES), raised where the staging dir is made: also where tests run as
    root (chmod does not stop root) without mount namespaces (test_read_only_filesystem)."""
    base, adapter = small

    def refused(*args: object, **kwargs: object) -> str:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    output = tmp_path / "made" / "out"
    where = re.escape(f"{tmp_path / 'made'}: cannot create the output there ({os.strerror(error)})")
    with pytest.raises(OutputError, match=where):
        merge(base, adapter, output)
    code, err = run_cli(base, adapter, output)
    assert_one_line(code, err, str(tmp_path / "made"), os.strerror(error))
    assert list(tmp_path.iterdir()) == [], "the parent made for the output was removed again"


def test_read_only_filesystem(small: tuple[Path, Path], tmp_path: Path) -> None:
    """A real read-only filesystem: the CLI runs in a private mount namespace (`unshare -rm`: no privileges needed,
    and nothing outside it sees the mount) where the output's parent is a read-only tmpfs."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("no unprivileged mount namespaces here")
    base, adapter = small
    locked = tmp_path / "ro"
    locked.mkdir()
    mount_then_run = 'mount -t tmpfs -o ro,size=1g tmpfs "$1" && shift && exec "$@"'
    command = [unshare, "-rm", "sh", "-c", mount_then_run, "sh", str(locked), sys.executable, "-m", "qlora_merge"]
    command += ["--base", str(base), "--adapter", str(adapter), "--output", str(locked / "out")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"qlora-merge: error: {locked}: cannot create the output there (Read-only file system)"
    ]
    assert list(locked.iterdir()) == []


def test_output_holding_an_input_is_refused_even_with_overwrite(small: tuple[Path, Path], tmp_path: Path) -> None:
    """--output models --base models/llama --overwrite would replace `models`, and with it the base being read."""
    base, adapter = small
    parent = base.parent
    before = tree(parent)
    with pytest.raises(OutputError, match="must not contain an input"):
        merge(base, adapter, parent, overwrite=True)
    code, err = run_cli(base, adapter, parent, "--overwrite")
    assert_one_line(code, err, str(parent), "must not contain an input")
    assert tree(parent) == before


# ------------------------------------------------------------------------------------ the re-read before publishing


def test_an_index_that_disagrees_with_the_shards_is_never_published(
    small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index's total_size is checked against the plan too, not only its names: loaders trust it."""
    from qlora_merge import CheckpointFormatError
    from qlora_merge.outputs import safetensors as writer_module

    base, adapter = small
    real_index_json = writer_module.index_json

    def off_by_one(shards: list) -> dict | None:
        index = real_index_json(shards)
        if index is not None:
            index["metadata"] = {"total_size": index["metadata"]["total_size"] + 1}  # type: ignore[index,operator]
        return index

    monkeypatch.setattr(writer_module, "index_json", off_by_one)
    with pytest.raises(CheckpointFormatError, match="index does not match the shards"):
        merge(base, adapter, tmp_path / "out", max_shard_size="8KB")
    assert list(tmp_path.iterdir()) == []
