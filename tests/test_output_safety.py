"""What an output may never do: replace the directory in use (an empty --output), delete a file the merge reads
(compared by device and inode, not by path), lose the old output to a signal during the swap, copy a file that a link
in an input points to outside it, leave a staging directory or a temporary .bin conversion behind after Ctrl-C or
SIGTERM, or turn a long name, a mount point or a directory it may not remove into an internal error."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_checkpoints import llama_checkpoint

from qlora_merge import OutputError, merge
from qlora_merge.cli import main
from qlora_merge.interrupts import Interrupted
from qlora_merge.outputs import staging as outputs
from qlora_merge.outputs.staging import RENAME_EXCHANGE, remove_stale, sibling_stem

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama"
DEAD_PID = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
INTERRUPTED = "qlora-merge: interrupted; no output was written"


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def hidden(parent: Path, name: str = "out") -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{sibling_stem(name)}."))


def staging(parent: Path) -> bool:
    return any(p.name.startswith(".out.partial-") for p in parent.iterdir())


def run_cli(base: Path, adapter: Path, output: str | Path, *extra: str) -> tuple[int, str]:
    err = io.StringIO()
    code = main(["--base", str(base), "--adapter", str(adapter), "--output", str(output), *extra], io.StringIO(), err)
    return code, err.getvalue()


def assert_one_line(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("qlora-merge: error: "), err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return llama_checkpoint(tmp_path_factory.mktemp("small"))


def old_output(output: Path) -> dict[str, bytes | None]:
    output.mkdir()
    (output / "old.txt").write_text("the previous merge")
    return tree(output)


# ------------------------------------------------------------------------------------------------ empty --output


@pytest.mark.parametrize("text", ["", " ", "\t\n"])
def test_an_empty_output_is_refused(
    small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    """`--output "$OUT" --overwrite` with OUT unset would replace the current directory."""
    base, adapter = small
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "mine.txt").write_text("the user's own work")
    monkeypatch.chdir(cwd)
    with pytest.raises(OutputError, match="is empty: name the directory"):
        merge(base, adapter, text, overwrite=True)
    code, err = run_cli(base, adapter, text, "--overwrite")
    assert_one_line(code, err, "is empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd"]
    assert [p.name for p in cwd.iterdir()] == ["mine.txt"]


@pytest.mark.parametrize("text", [".", "..", "/", "sub/.."])
def test_an_output_naming_a_directory_in_use_is_refused(
    small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    base, adapter = small
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(OutputError, match="names no directory of its own"):
        merge(base, adapter, text, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["sub"]


# ------------------------------------------------------------------------------------ inputs compared by inode


def hub_cache(root: Path, source: Path) -> Path:
    """`source` laid out as huggingface_hub caches a repo: snapshots/<commit>/<file> -> ../../blobs/<sha256>."""
    repo = root / "models--org--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in sorted(source.iterdir()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, repo / "blobs" / digest)
        (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    return snapshot


def test_the_hub_caches_blobs_of_the_base_are_not_an_output(tmp_path: Path) -> None:
    """The path check sees nothing: `blobs` is neither inside nor above the snapshot directory. The files are the
    same: replacing `blobs` would delete every byte of the base."""
    snapshot = hub_cache(tmp_path / "hub", EXAMPLE / "base")
    blobs = snapshot.parent.parent / "blobs"
    before = tree(tmp_path / "hub")
    adapter = EXAMPLE / "adapter"
    with pytest.raises(OutputError, match=r"output must not contain an input \(.*snapshots/0+/.*, which is .*blobs/"):
        merge(snapshot, adapter, blobs, overwrite=True)
    code, err = run_cli(snapshot, adapter, blobs, "--overwrite")
    assert_one_line(code, err, "output must not contain an input", "replacing it would delete it")
    assert tree(tmp_path / "hub") == before


def test_a_hub_cache_base_merges_with_its_linked_companions(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    snapshot = hub_cache(tmp_path / "hub", EXAMPLE / "base")
    with caplog.at_level(logging.WARNING):
        merge(snapshot, EXAMPLE / "adapter", tmp_path / "out")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (EXAMPLE / "base" / name).read_bytes()
    assert "not copied" not in caplog.text


def test_an_output_holding_a_hard_link_of_an_input_is_refused(small: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = small
    output = tmp_path / "out"
    output.mkdir()
    os.link(base / "model.safetensors", output / "model.safetensors")
    with pytest.raises(OutputError, match="output must not contain an input"):
        merge(base, adapter, output, overwrite=True)


def unshare_available() -> str | None:
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-rm", "true"], capture_output=True).returncode != 0:
        return None
    return unshare


def in_mount_namespace(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `script` (sh, with $1...) in a private user and mount namespace: bind mounts without privileges, seen
    by nothing outside it; the CLI is `"$PY" -m qlora_merge` there."""
    unshare = unshare_available()
    if unshare is None:
        pytest.skip("no unprivileged mount namespaces here")
    env = os.environ | {"PY": sys.executable}
    command = [unshare, "-rm", "sh", "-c", script, "sh", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)


def test_a_bind_mount_of_the_bases_parent_is_not_an_output(small: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = small
    alias = tmp_path / "alias"
    alias.mkdir()
    (alias / "models").mkdir()
    before = tree(base.parent)
    script = 'mount --bind "$1" "$2" && exec "$PY" -m qlora_merge --base "$3" --adapter "$4" --output "$2" --overwrite'
    done = in_mount_namespace(script, str(base.parent), str(alias / "models"), str(base), str(adapter))
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.splitlines()) == 1 and "output must not contain an input" in done.stderr, done.stderr
    assert tree(base.parent) == before


def test_overwrite_of_a_mount_point_is_refused_and_left_as_it_was(small: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = small
    elsewhere = tmp_path / "elsewhere"
    before = old_output(elsewhere)
    (tmp_path / "out").mkdir()
    script = 'mount --bind "$1" "$2" && exec "$PY" -m qlora_merge --base "$3" --adapter "$4" --output "$2" --overwrite'
    done = in_mount_namespace(script, str(elsewhere), str(tmp_path / "out"), str(base), str(adapter))
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"qlora-merge: error: {tmp_path / 'out'}: cannot be replaced (it is a mount point); it was left as it was "
        "and nothing was written"
    ]
    assert tree(elsewhere) == before
    assert hidden(tmp_path) == []


# ----------------------------------------------------------------------------- the swap and the cleanup vs signals


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_signal_during_the_swap_waits_for_it(
    small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    """Ctrl-C arrives as the old output is moved out: the swap completes first, then the interrupt says the new
    output is complete. Before, the old output was left parked in `.out.old-*` and the new one deleted."""
    base, adapter = small
    output = tmp_path / "out"
    old_output(output)
    if exchange:
        real_rename = outputs._rename

        def rename(source: Path, target: Path, flags: int) -> None:
            if flags == RENAME_EXCHANGE:
                os.kill(os.getpid(), signal.SIGINT)
            real_rename(source, target, flags)

        monkeypatch.setattr(outputs, "_rename", rename)
    else:
        monkeypatch.setattr(outputs, "_RENAMEAT2", None)
        real_os_rename = os.rename

        def os_rename(source: str | Path, target: str | Path) -> None:
            if Path(source) == output:  # the first of the two renames: the old output moves out
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # the handler would run here, between the two renames
            real_os_rename(source, target)

        monkeypatch.setattr(os, "rename", os_rename)
    with pytest.raises(Interrupted) as raised:
        merge(base, adapter, output, overwrite=True)
    assert raised.value.output == output
    assert (output / "model.safetensors").is_file() and not (output / "old.txt").exists()
    assert hidden(tmp_path) == []


def test_a_second_ctrl_c_during_cleanup_does_not_leave_the_staging_dir(
    small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qlora_merge.api

    base, adapter = small

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    real_rmtree = shutil.rmtree

    def rmtree(path: str | Path, *args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C, as the staging dir is being removed
        time.sleep(0.01)
        real_rmtree(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(qlora_merge.api, "run_plan", interrupted)
    monkeypatch.setattr(outputs.shutil, "rmtree", rmtree)
    code, err = run_cli(base, adapter, tmp_path / "out")
    assert code == 130 and err.splitlines() == [INTERRUPTED]
    assert list(tmp_path.iterdir()) == []


def test_the_cli_says_when_the_output_was_complete_before_the_interrupt(
    small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, adapter = small
    output = tmp_path / "out"
    real_rename = outputs._rename

    def rename(source: Path, target: Path, flags: int) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        real_rename(source, target, flags)

    monkeypatch.setattr(outputs, "_rename", rename)
    code, err = run_cli(base, adapter, output)
    assert code == 130
    assert err.splitlines() == [f"qlora-merge: interrupted; the merged model was already complete at {output}"]
    assert (output / "model.safetensors").is_file() and hidden(tmp_path) == []


# ------------------------------------------------------------------------------------- links in the inputs


def test_links_out_of_an_input_are_not_copied(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(EXAMPLE / "base", base)
    shutil.copytree(EXAMPLE / "adapter", adapter)
    (base / "special_tokens_map.json").symlink_to("/proc/self/environ")
    (base / "LICENSE").symlink_to("/etc/passwd")
    (base / "notes-v1.txt").write_text("kept")
    (base / "notes.txt").symlink_to("notes-v1.txt")  # stays inside: copied
    (adapter / "tokenizer.json").symlink_to("/etc/hostname")
    with caplog.at_level(logging.WARNING):
        merge(base, adapter, tmp_path / "out")
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert not {"special_tokens_map.json", "LICENSE"} & names
    assert (tmp_path / "out" / "notes.txt").read_text() == "kept"
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (EXAMPLE / "base" / "tokenizer.json").read_bytes()
    for link in ("special_tokens_map.json", "LICENSE"):
        assert f"{base / link}: a link to" in caplog.text and "not copied" in caplog.text
    assert f"{adapter / 'tokenizer.json'}: a link to /etc/hostname" in caplog.text


# ------------------------------------------------------------------------------------ real signals, real processes


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A ~75 MB llama: a merge of it takes about a second, long enough to be signalled in the middle."""
    root = tmp_path_factory.mktemp("large")
    return llama_checkpoint(root, hidden=1024, intermediate=2816, layers=2, vocab=8192, rank=16, shards=2)


def start(base: Path, adapter: Path, output: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "qlora_merge", "--base", str(base), "--adapter", str(adapter)]
    command += ["--output", str(output), "--overwrite", "--json"]
    env = os.environ | {"OMP_NUM_THREADS": "2"} | (env or {})
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(process: subprocess.Popen[str], seen: object) -> bool:
    deadline = time.monotonic() + 120
    while not seen():  # type: ignore[operator]
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline
        time.sleep(0.0005)
    return True


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_merge_cleans_up_and_says_so(large: tuple[Path, Path], tmp_path: Path, signum: int) -> None:
    base, adapter = large
    output = tmp_path / "out"
    for _ in range(3):
        process = start(base, adapter, output)
        if wait_for(process, lambda: staging(tmp_path)):
            process.send_signal(signum)
            break
        process.wait()
        shutil.rmtree(output)
    else:
        pytest.skip("every merge finished before it could be signalled")
    assert process.wait(timeout=60) == 128 + signum
    assert process.stderr.read().splitlines() == [INTERRUPTED]  # type: ignore[union-attr]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("gap", [0.0, 0.02, 0.2])
def test_two_quick_ctrl_cs_leave_nothing(large: tuple[Path, Path], tmp_path: Path, gap: float) -> None:
    base, adapter = large
    output = tmp_path / "out"
    process = start(base, adapter, output)
    if not wait_for(process, lambda: staging(tmp_path)):
        pytest.skip("the merge finished before it could be interrupted")
    process.send_signal(signal.SIGINT)
    time.sleep(gap)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 130
    assert process.stderr.read().splitlines() == [INTERRUPTED]  # type: ignore[union-attr]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_removes_the_temporary_conversion_of_a_bin_base(
    large: tuple[Path, Path], tmp_path: Path, signum: int
) -> None:
    base, adapter = large
    bin_base = tmp_path / "bin-base"
    bin_base.mkdir()
    shutil.copy(base / "config.json", bin_base)
    tensors = {}
    for shard in sorted(base.glob("*.safetensors")):
        tensors.update(load_file(shard))
    torch.save(tensors, bin_base / "pytorch_model.bin")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    process = start(bin_base, adapter, tmp_path / "out", env={"TMPDIR": str(scratch)})
    if not wait_for(process, lambda: any(scratch.glob("qlora-merge-bin-*"))):
        pytest.skip("the merge finished before its conversion was seen")
    process.send_signal(signum)
    assert process.wait(timeout=60) == 128 + signum
    assert process.stderr.read().splitlines() == [INTERRUPTED]  # type: ignore[union-attr]
    assert list(scratch.iterdir()) == []
    assert not (tmp_path / "out").exists() and hidden(tmp_path) == []


@pytest.mark.parametrize("console", [False, True], ids=["python -m", "qlora-merge"])
def test_ctrl_c_during_start_up_is_one_line(small: tuple[Path, Path], tmp_path: Path, console: bool) -> None:
    """Signalled while torch is being imported (its library is mapped, the import is not over)."""
    base, adapter = small
    script = Path(sys.executable).parent / "qlora-merge"
    if console and not script.exists():
        pytest.skip("the qlora-merge command is not installed next to this python")
    command = [str(script)] if console else [sys.executable, "-m", "qlora_merge"]
    command += ["--base", str(base), "--adapter", str(adapter), "--output", str(tmp_path / "out")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{process.pid}/maps")

    def importing_torch() -> bool:
        try:
            return "libtorch" in maps.read_text()
        except OSError:
            return False

    if not wait_for(process, importing_torch):
        pytest.fail(f"never saw torch being imported: {process.stderr.read()}")  # type: ignore[union-attr]
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.splitlines() == [INTERRUPTED] and out == ""
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- long names and paths


def test_a_long_valid_name_merges_with_short_sibling_names(
    small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Names of 228-255 bytes are valid; `.NAME.partial-PID-XXXXXXXX` of them would not be."""
    import qlora_merge.api

    base, adapter = small
    name = "m" * 250
    seen: list[str] = []
    real_finish = qlora_merge.api.finish_output

    def finish(inputs: object, staging: Path, *args: object, **kwargs: object) -> object:
        seen.append(staging.name)
        seen.extend(p.name for p in tmp_path.iterdir() if p.name.endswith(".lock"))
        return real_finish(inputs, staging, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(qlora_merge.api, "finish_output", finish)
    merge(base, adapter, tmp_path / name)
    assert (tmp_path / name / "model.safetensors").is_file()
    assert len(seen) == 2 and all(len(n) <= 255 for n in seen), seen
    assert seen[0].startswith(f".{sibling_stem(name)}.partial-{os.getpid()}-") and "~" in seen[0]
    assert [p.name for p in tmp_path.iterdir()] == [name]
    stale = tmp_path / f".{sibling_stem(name)}.partial-{DEAD_PID}-abcdefgh"
    stale.mkdir()
    assert remove_stale(tmp_path / name) == [stale]


def test_a_name_over_255_bytes_is_refused(small: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = small
    output = tmp_path / ("n" * 256)
    with pytest.raises(OutputError, match="a name in this path has 256 bytes; a file name may have at most 255"):
        merge(base, adapter, output)
    code, err = run_cli(base, adapter, output)
    assert_one_line(code, err, "256 bytes")
    assert list(tmp_path.iterdir()) == []


def test_a_path_over_4096_bytes_is_refused(small: tuple[Path, Path], tmp_path: Path) -> None:
    base, adapter = small
    output = tmp_path.joinpath(*["d" * 200] * 21, "out")
    with pytest.raises(OutputError, match="path too long"):
        merge(base, adapter, output)
    code, err = run_cli(base, adapter, output)
    assert_one_line(code, err, "path too long")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------- an old output that will not go, or move


@pytest.mark.parametrize("error", [errno.EBUSY, errno.EACCES, errno.EPERM])
@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_an_output_that_cannot_be_moved_is_left_as_it_was(
    small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int, exchange: bool
) -> None:
    """A mount point (EBUSY), a directory whose `..` we may not rewrite (EACCES), an immutable one (EPERM): the
    refusal the kernel gives, simulated, since tests run as root."""
    base, adapter = small
    output = tmp_path / "out"
    before = old_output(output)

    def refused(*args: object, **kwargs: object) -> None:
        raise OSError(error, os.strerror(error))

    if exchange:
        real_rename = outputs._rename
        monkeypatch.setattr(
            outputs, "_rename", lambda s, t, f: refused() if f == RENAME_EXCHANGE else real_rename(s, t, f)
        )
    else:
        monkeypatch.setattr(outputs, "_RENAMEAT2", None)
        real_os_rename = os.rename
        monkeypatch.setattr(os, "rename", lambda s, t: refused() if Path(s) == output else real_os_rename(s, t))
    code, err = run_cli(base, adapter, output, "--overwrite")
    why = "it is a mount point" if error == errno.EBUSY else os.strerror(error)
    assert_one_line(code, err, f"{output}: cannot be replaced ({why}); it was left as it was")
    assert tree(output) == before
    assert hidden(tmp_path) == []


def test_an_old_output_not_fully_removed_is_named(
    small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    base, adapter = small
    output = tmp_path / "out"
    old_output(output)
    (output / "stuck").mkdir()
    (output / "stuck" / "file.bin").write_text("cannot be removed")
    real_unlink = os.unlink

    def unlink(path: str | Path, *args: object, **kwargs: object) -> None:
        if os.fsdecode(path) == "file.bin" or str(path).endswith("/file.bin"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", unlink)
    with caplog.at_level(logging.WARNING):
        merge(base, adapter, output, overwrite=True)
    assert (output / "model.safetensors").is_file()
    left = [tmp_path / n for n in hidden(tmp_path)]
    assert len(left) == 1 and (left[0] / "stuck" / "file.bin").exists()
    assert f"{left[0]} (the output replaced just now) could not be removed completely" in caplog.text
    monkeypatch.setattr(os, "unlink", real_unlink)
    shutil.rmtree(left[0])


def test_a_stale_directory_not_fully_removed_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    stale = tmp_path / f".out.old-{DEAD_PID}-abcdefgh"
    (stale / "other").mkdir(parents=True)
    (stale / "other" / "file.bin").write_text("cannot be removed")
    real_unlink = os.unlink

    def unlink(path: str | Path, *args: object, **kwargs: object) -> None:
        if os.fsdecode(path) == "file.bin":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        real_unlink(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", unlink)
    with caplog.at_level(logging.WARNING):
        remove_stale(tmp_path / "out")
    assert f"{stale} (left by a merge that was killed) could not be removed completely" in caplog.text


@pytest.mark.parametrize("step", ["--verify", "--push-to-hub"])
def test_ctrl_c_after_the_merge_says_the_output_is_complete(
    small: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """--verify and --push-to-hub run after the merge has published its output: a Ctrl-C there must not claim that
    nothing was written."""
    from qlora_merge import api
    from qlora_merge.outputs import upload

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "verify", interrupted)  # the CLI takes them from their modules when it runs
    monkeypatch.setattr(upload, "check_push", lambda repo, token: (repo, None))
    monkeypatch.setattr(upload, "push_to_hub", interrupted)
    extra = ["--verify"] if step == "--verify" else ["--push-to-hub", "someone/merged"]
    output = tmp_path / "out"
    code, err = run_cli(*small, output, *extra)
    assert code == 130
    assert (
        err.strip().splitlines()[-1] == f"qlora-merge: interrupted; the merged model was already complete at {output}"
    )
    assert (output / "model.safetensors").is_file()
