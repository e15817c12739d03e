"""vizloc_ros.files: outputs whole or absent, temporaries of dead writers swept, live
writers refused, nothing replaced that appeared meanwhile, umask respected, children
that end with their parent."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vizloc_ros import files

fcntl = pytest.importorskip("fcntl")


def _hold_lock(partial: Path) -> int:
    fd = os.open(partial, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_a_file_is_whole_under_its_name_with_the_umask_and_no_temporary(tmp_path):
    previous = os.umask(0o022)
    try:
        files.write_text(tmp_path / "a.json", "{}\n")
    finally:
        os.umask(previous)
    assert (tmp_path / "a.json").read_text() == "{}\n"
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_an_error_inside_the_block_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with files.staged(tmp_path / "a") as partial:
            partial.write_text("half")
            raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["a"] and (tmp_path / "a").read_text() == "old"


def test_a_dead_writers_temporary_is_swept_and_a_live_one_refused(tmp_path):
    target = tmp_path / "out"
    dead = files.partial_path(target, 4_194_311)
    dead.mkdir()
    assert files.sweep_stale(target) == [dead] and not dead.exists()
    live = files.partial_path(target, 1)
    live.mkdir()
    fd = _hold_lock(live)
    try:
        with pytest.raises(files.OutputBusy, match=r"another process \(pid 1\) is writing"):
            with files.staged(target, folder=True):
                pass
        assert live.is_dir() and not target.exists()
    finally:
        os.close(fd)
    files.sweep_stale(target)  # released: now it is a dead writer's
    assert not live.exists()


def test_a_folder_that_appears_meanwhile_is_kept_and_only_an_own_output_replaced(tmp_path):
    target = tmp_path / "report"
    with pytest.raises(files.OutputError, match="appeared while this run was writing it"):
        with files.staged(target, folder=True, replaceable=None) as partial:
            (partial / "metrics.json").write_text("new")
            target.mkdir()  # another tool made it during the run
            (target / "notes.txt").write_text("keep")
    assert [p.name for p in target.iterdir()] == ["notes.txt"]

    def is_report(path):
        return (path / "metrics.json").is_file()

    with pytest.raises(files.OutputError, match="not one this command wrote"):
        with files.staged(target, folder=True, replaceable=is_report) as partial:
            (partial / "metrics.json").write_text("new")
    assert [p.name for p in target.iterdir()] == ["notes.txt"]
    (target / "notes.txt").unlink()
    (target / "metrics.json").write_text("old")
    with files.staged(target, folder=True, replaceable=is_report) as partial:
        (partial / "metrics.json").write_text("new")
    assert (target / "metrics.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_a_link_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(files.OutputError, match="symbolic link"):
        with files.staged(tmp_path / "link", folder=True):
            pytest.fail("the block must not run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_files_that_belong_together_are_all_replaced_or_none(tmp_path):
    for name in ("m.safetensors", "m.json"):
        (tmp_path / name).write_text("old")
    with pytest.raises(OSError):
        with files.staged_files([tmp_path / "m.safetensors", tmp_path / "m.json"]) as partials:
            partials[0].write_text("new")
            raise OSError(28, "No space left on device")
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"m.safetensors": "old", "m.json": "old"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_a_child_ends_with_its_parent(tmp_path):
    """A parent forks a child that sleeps forever after exit_with_parent; the parent is
    killed with -9; the child must go too (polled, with a generous limit against a hang)."""
    code = ("import os, sys, time\n"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
            "from vizloc_ros.files import exit_with_parent\n"
            "parent = os.getpid()\n"
            "child = os.fork()\n"
            "if child == 0:\n"
            "    exit_with_parent(parent)\n"
            "    time.sleep(600)\n"
            "    os._exit(0)\n"
            "print(child, flush=True)\n"
            "time.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, start_new_session=True)
    child = int(process.stdout.readline())
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stdout.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its parent")
