"""Two merges, one output: at most one writes it at a time (a lock beside it, released by the kernel when its holder
dies), the second is refused at once naming the first; the final move never replaces anything without --overwrite,
whatever appeared meanwhile; an upload holds the lock shared."""

from __future__ import annotations

import fcntl
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_checkpoints import llama_checkpoint

from qlora_merge import OutputError, merge
from qlora_merge.cli import main
from qlora_merge.errors import UploadError
from qlora_merge.outputs import lock
from qlora_merge.outputs import staging as outputs
from qlora_merge.outputs.lock import lock_path, output_lock
from qlora_merge.outputs.upload import push_to_hub

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama"
ADAPTERS = ("adapter", "adapter-attention")
BUSY = re.compile(r"qlora-merge: error: .*: another merge \(pid (\d+)\) is writing there; let it finish.*")
TAKEN = re.compile(r"qlora-merge: error: .*: exists and is not empty \(pass --overwrite to replace it\)")


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def hidden(parent: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def argv(adapter: str, output: Path, *extra: str) -> list[str]:
    return ["--base", str(EXAMPLE / "base"), "--adapter", str(EXAMPLE / adapter), "--output", str(output), *extra]


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """Each adapter's merge, made by the same CLI with the same arguments: the model card names the inputs."""
    root = tmp_path_factory.mktemp("references")
    made = {}
    for adapter in ADAPTERS:
        assert main([*argv(adapter, root / adapter), "--json"], out=io.StringIO(), err=io.StringIO()) == 0
        made[adapter] = files(root / adapter)
    assert made["adapter"] != made["adapter-attention"]
    return made


def launch(adapter: str, output: Path, overwrite: bool, console: bool) -> subprocess.Popen[str]:
    """A real merge process: `python -m qlora_merge`, or the installed `qlora-merge` command."""
    script = Path(sys.executable).parent / "qlora-merge"
    command = [str(script)] if console and script.exists() else [sys.executable, "-m", "qlora_merge"]
    command += [*argv(adapter, output, "--json"), *(["--overwrite"] if overwrite else [])]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


# (start with an output already there, the runs as (adapter, --overwrite)): three merges at once per round.
ROUNDS = [
    (False, [("adapter", False), ("adapter-attention", False), ("adapter", False)]),
    (True, [("adapter-attention", True), ("adapter", True), ("adapter-attention", True)]),
    (False, [("adapter", False), ("adapter-attention", True), ("adapter-attention", False)]),
    (True, [("adapter", True), ("adapter-attention", False), ("adapter", True)]),
    (False, [("adapter-attention", False), ("adapter", False), ("adapter-attention", False)]),
    (False, [("adapter-attention", True), ("adapter", False), ("adapter", False)]),
]


def test_concurrent_merges_into_one_output(references: dict[str, dict[str, bytes]], tmp_path: Path) -> None:
    output = tmp_path / "out"
    for number, (existing, runs) in enumerate(ROUNDS):
        if existing and not output.exists():
            assert main([*argv("adapter", output), "--json"], out=io.StringIO(), err=io.StringIO()) == 0
        if not existing and output.exists():
            for path in output.iterdir():
                path.unlink()
            output.rmdir()
        processes = [launch(adapter, output, overwrite, console=i == 0) for i, (adapter, overwrite) in enumerate(runs)]
        results = [(process.wait(timeout=120), process.stderr.read()) for process in processes]  # type: ignore[union-attr]
        where = f"round {number}: {results}"
        assert all(code in (0, 2) for code, _ in results), where
        succeeded = [adapter for (adapter, _), (code, _) in zip(runs, results, strict=True) if code == 0]
        assert succeeded, where
        plain = [code for (_, overwrite), (code, _) in zip(runs, results, strict=True) if not overwrite]
        assert plain.count(0) <= 1, where
        pids = {process.pid for process in processes}
        for code, err in results:
            if code == 2:
                assert len(err.splitlines()) == 1, where
                busy = BUSY.fullmatch(err.strip())
                assert (busy and int(busy.group(1)) in pids) or TAKEN.fullmatch(err.strip()), where
        on_disk = files(output)
        assert any(on_disk == references[adapter] for adapter in succeeded), where
        assert hidden(tmp_path) == [], f"{where}: staging directories or the lock file left"


# --------------------------------------------------------------------------------------------- the lock itself


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return llama_checkpoint(tmp_path_factory.mktemp("small"))


def run_cli(base: Path, adapter: Path, output: Path, *extra: str) -> tuple[int, str]:
    err = io.StringIO()
    code = main(["--base", str(base), "--adapter", str(adapter), "--output", str(output), *extra], io.StringIO(), err)
    return code, err.getvalue()


def test_a_held_lock_refuses_a_second_merge_at_once(small: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = small
    output = tmp_path / "deep" / "out"
    with output_lock(output):
        assert lock_path(output).is_file()
        with pytest.raises(OutputError, match=rf"another merge \(pid {os.getpid()}\) is writing there"):
            merge(base, adapter, output, overwrite=True)
        code, err = run_cli(base, adapter, output, "--overwrite")
        assert code == 2 and err.splitlines() == [
            f"qlora-merge: error: {output}: another merge (pid {os.getpid()}) is writing there; let it finish, or "
            "choose another output"
        ]
        assert not output.exists()
    assert list(tmp_path.iterdir()) == [], "the lock file and the parents made for it are gone with the lock"
    merge(base, adapter, output)
    assert sorted(p.name for p in output.parent.iterdir()) == ["out"]


def test_a_lock_file_a_killed_merge_left_is_taken_over_and_removed(small: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = small
    output = tmp_path / "out"
    lock_path(output).write_text("")  # what a SIGKILL'd holder leaves: the file, never the lock
    merge(base, adapter, output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_lock_file_removed_by_its_holder_while_taken_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The classic race of a lock file that is removed on release: B opens the file, A releases and removes it,
    B locks the removed file while C creates and locks a new one: two holders. A taker must check that the file it
    locked is still the one at that path, and take the new one if not."""
    output = tmp_path / "out"
    path = lock_path(output)
    real_flock = fcntl.flock
    calls: list[int] = []

    def flock(fd: int, how: int) -> None:
        if not calls:  # the holder releases between our open and our flock
            path.unlink()
        calls.append(fd)
        real_flock(fd, how)

    monkeypatch.setattr(lock.fcntl, "flock", flock)
    with output_lock(output):
        assert len(calls) == 2, "took the file again"
        there, held = os.stat(path), os.fstat(calls[-1])
        assert (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino)
        monkeypatch.setattr(lock.fcntl, "flock", real_flock)
        with pytest.raises(OutputError, match="another merge"), output_lock(output):  # the one at the path is held
            pass
    assert not path.exists()


def test_a_merge_that_fails_to_lock_leaves_the_holders_file(small: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = small
    output = tmp_path / "out"
    with output_lock(output):
        before = os.stat(lock_path(output)).st_ino
        with pytest.raises(OutputError):
            merge(base, adapter, output)
        assert os.stat(lock_path(output)).st_ino == before


def test_the_lock_is_beside_the_real_output_whatever_path_names_it(small: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = small
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    with output_lock(tmp_path / "real" / "out"), pytest.raises(OutputError, match="another merge"):
        merge(base, adapter, tmp_path / "alias" / "out")


# ------------------------------------------------------------------------------------------ the final move


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "no-renameat2"])
@pytest.mark.parametrize("intruder", ["a file", "an empty directory"])
def test_an_output_that_appears_while_merging_is_never_replaced_without_overwrite(
    small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool, intruder: str
) -> None:
    """Another program (one that ignores the lock) creates the output during the merge. Without --overwrite the
    final move refuses it, even an empty directory; with --overwrite it is replaced."""
    import qlora_merge.api

    base, adapter = small
    output = tmp_path / "out"
    if not exchange:  # a kernel, libc or filesystem without renameat2: checked, then renamed, under the lock
        monkeypatch.setattr(outputs, "_RENAMEAT2", None)
    real_finish = qlora_merge.api.finish_output

    def finish(*args: object, **kwargs: object) -> object:
        output.mkdir()
        if intruder == "a file":
            (output / "theirs.txt").write_text("someone else's")
        return real_finish(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(qlora_merge.api, "finish_output", finish)
    with pytest.raises(OutputError, match="appeared while merging and was left alone; nothing was written"):
        merge(base, adapter, output)
    assert sorted(p.name for p in output.iterdir()) == (["theirs.txt"] if intruder == "a file" else [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    output.rename(tmp_path / "kept")
    merge(base, adapter, output, overwrite=True)
    assert (output / "model.safetensors").is_file() and not (output / "theirs.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "out"]


def test_an_empty_directory_there_at_the_start_is_taken(small: tuple[Path, Path], tmp_path: Path) -> None:
    """The README's promise: an output that exists but is empty is no reason to refuse."""
    base, adapter = small
    output = tmp_path / "out"
    output.mkdir()
    merge(base, adapter, output)
    assert (output / "model.safetensors").is_file()


def test_an_empty_directory_filled_while_merging_is_not_replaced(
    small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qlora_merge.api

    base, adapter = small
    output = tmp_path / "out"
    output.mkdir()
    real_finish = qlora_merge.api.finish_output

    def finish(*args: object, **kwargs: object) -> object:
        (output / "theirs.txt").write_text("someone else's")
        return real_finish(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(qlora_merge.api, "finish_output", finish)
    with pytest.raises(OutputError, match="appeared while merging"):
        merge(base, adapter, output)
    assert [p.name for p in output.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "no-renameat2"])
def test_overwrite_replaces_in_one_step(
    small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    base, adapter = small
    output = tmp_path / "out"
    if not exchange:
        monkeypatch.setattr(outputs, "_RENAMEAT2", None)
    output.mkdir()
    (output / "old.txt").write_text("previous")
    merge(base, adapter, output, overwrite=True)
    assert not (output / "old.txt").exists() and (output / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------------------------ uploads


def finished(directory: Path) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(b"x")
    return directory


def test_an_upload_is_refused_while_a_merge_writes_the_folder(tmp_path: Path) -> None:
    folder = finished(tmp_path / "out")
    with output_lock(folder), pytest.raises(UploadError, match=r"another merge \(pid \d+\) is writing there; upload"):
        push_to_hub(folder, "me/model", token="t", api=object())  # type: ignore[arg-type]


def test_a_merge_is_refused_while_the_output_uploads(small: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = small
    output = finished(tmp_path / "out")
    with output_lock(output, shared=True), output_lock(output, shared=True):  # two uploads may share it
        with pytest.raises(OutputError, match=r"another qlora-merge \(pid \d+\) is uploading it"):
            merge(base, adapter, output, overwrite=True)
        assert lock_path(output).exists()
    assert not lock_path(output).exists(), "the last reader out removes the lock file"
    merge(base, adapter, output, overwrite=True)


def test_an_upload_from_a_place_without_a_lock_file_still_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only place (a finished model on a read-only mount) has no lock file and cannot get one: no merge can
    be writing there either."""
    folder = finished(tmp_path / "out")

    def read_only(*args: object, **kwargs: object) -> int:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(lock.os, "open", read_only)
    with output_lock(folder, shared=True):
        pass


def test_ctrl_c_as_the_lock_is_taken_leaves_no_lock_file(
    small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    base, adapter = small
    real_flock = fcntl.flock

    def flock(fd: int, how: int) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # between creating the lock file and holding it
        real_flock(fd, how)

    monkeypatch.setattr(lock.fcntl, "flock", flock)
    with pytest.raises(KeyboardInterrupt):
        merge(base, adapter, tmp_path / "deep" / "out")
    assert list(tmp_path.iterdir()) == []
