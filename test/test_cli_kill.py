"""``kill -9`` of every command line: nothing half written, nothing left behind.

Each command runs as a subprocess in a session of its own on tiny inputs and is killed
with SIGKILL at a moment chosen by phase, never by a delay (a loaded machine must not
change what is tested):

* from outside, once it has printed its first progress output (``vizloc-replay``: its
  fusion child process runs and its report folder is being built);
* from inside, at the last moment before an output takes its final name (the finished
  temporary about to be renamed: ``files.move_into_place``), or in the middle of a file
  (``files._fsync`` truncates the temporary to half and kills the process): the code
  paths are the real ones, the hook only picks the moment.

Then: no process of its process group is left (children included), the output is either
absent or complete, and the next run of the same command succeeds and removes the
temporaries of the killed one.
"""
from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vizloc_ros.files import PARTIAL_MARK
from vizloc_ros.localize.models import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX process groups")

#: a hook run in the subprocess before the command: the writer dies at that point
DIE_AT = {
    # the finished temporary is about to take its final name
    "rename": ("import vizloc_ros.files as files\n"
               "def _die(*args, **kwargs):\n"
               "    os.kill(os.getpid(), signal.SIGKILL)\n"
               "files.move_into_place = _die\n"),
    # half of a file is on disk (a kill -9 has no last words)
    "mid-file": ("import vizloc_ros.files as files\n"
                 "def _die(path):\n"
                 "    os.truncate(path, os.path.getsize(path) // 2)\n"
                 "    os.kill(os.getpid(), signal.SIGKILL)\n"
                 "files._fsync = _die\n"),
}
#: how long the process group may take to go after the kill: a limit against a hang,
#: not a measure (a child that waits forever is what fails)
GONE_WITHIN_S = 60.0


def _spawn(module: str, args: list, die_at: str | None, tmp_path: Path) -> subprocess.Popen:
    code = ("import os, signal, sys\n" + (DIE_AT[die_at] if die_at else "")
            + f"from {module} import main\nsys.exit(main({[str(a) for a in args]!r}))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    return subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


def _wait_for_output(process: subprocess.Popen, pattern: bytes) -> bool:
    """Read the process's stderr until ``pattern`` appears (True) or it ends (False)."""
    seen = b""
    fd = process.stderr.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            if process.poll() is not None:
                return False
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return False
        seen += chunk
        if pattern in seen:
            return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_and_check_group(process: subprocess.Popen) -> None:
    """SIGKILL the command (its process only: its children must end by themselves), then
    wait until no process of its group is left."""
    pgid = process.pid  # start_new_session: the command leads its own group
    with_kill = process.poll() is None
    if with_kill:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + GONE_WITHIN_S
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _group_alive(pgid)
    if left:
        os.killpg(pgid, signal.SIGKILL)  # do not leak it into the rest of the suite
    assert not left, "a process of the killed command's group outlived it"
    process.stderr.close()


def _partials(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if PARTIAL_MARK in p.name
                  or re.search(r"\.tmp", p.name))


def _killed(module, args, tmp_path, die_at=None, wait_for: bytes | None = None) -> int:
    """Run the command until its phase, kill it, check its group is gone; exit code."""
    process = _spawn(module, args, die_at, tmp_path)
    try:
        if wait_for is not None:
            _wait_for_output(process, wait_for)
        else:
            process.wait()
    finally:
        _kill_and_check_group(process)
    return process.returncode


# --------------------------------------------------------------------------- vizloc-replay

def _replay_args(bag, weights, out):
    return [bag, "--weights", weights, "--out", out, "--device", "cpu", "--batch-size", "4"]


def _report_complete_or_absent(out: Path) -> None:
    if out.exists():
        assert (out / "metrics.json").is_file() and (out / "report.md").is_file() and (out / "bag").is_dir()
        json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("phase", ["progress", "rename"])
def test_replay_killed_leaves_no_process_and_no_half_report(small_bag, tiny_weights, tmp_path, phase):
    """kill -9 of vizloc-replay: its fusion child ends with it (it held the other end of
    its pipe and waited forever), and the next run removes the killed one's folder."""
    from vizloc_ros.replay import cli as replay

    out = tmp_path / "report"
    args = _replay_args(small_bag, tiny_weights, out)
    if phase == "progress":  # the progress bar is drawn: the fusion child runs, the report is built
        code = _killed("vizloc_ros.replay.cli", args, tmp_path, wait_for=b"replay:")
    else:
        code = _killed("vizloc_ros.replay.cli", args, tmp_path, die_at="rename")
    assert code in (-signal.SIGKILL, 0)
    _report_complete_or_absent(out)
    if code == -signal.SIGKILL:
        assert not out.exists()
    assert replay.main([*map(str, args), "--no-progress", "--overwrite"]) == 0
    _report_complete_or_absent(out)
    assert out.exists() and _partials(tmp_path) == []


# --------------------------------------------------------------------------- vizloc-train

def _train_args(bag, out):
    return ["--data", bag, "--data-kind", "bag", "--model", "posenet_resnet18", "--epochs", "1",
            "--batch-size", "8", "--out", out, "--device", "cpu", "--no-progress",
            "--set", "input.resize=48", "--set", "input.crop=[48,64]", "--set", "model.args.feat_dim=32",
            "--set", "loss.relative=false", "--set", "augment.random_crop=false", "--set", "threads=1"]


def test_train_killed_mid_checkpoint_leaves_the_old_one_and_no_temporary(small_bag, tiny_weights, tmp_path):
    """kill -9 while the checkpoint is half on disk: the previous checkpoint is intact, the
    next run sweeps the killed one's temporary (134 MB on a real network) and writes."""
    from vizloc_ros.training import train

    out = tmp_path / "m"
    for suffix in (".safetensors", ".json"):  # an earlier checkpoint, replaced with --overwrite
        (tmp_path / f"m{suffix}").write_bytes(tiny_weights.with_suffix(suffix).read_bytes())
    before = (tmp_path / "m.safetensors").read_bytes()
    args = _train_args(small_bag, out)
    code = _killed("vizloc_ros.training.train", [*args, "--overwrite"], tmp_path, die_at="mid-file")
    assert code == -signal.SIGKILL
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert _partials(tmp_path), "the hook should have left the killed writer's temporary"
    assert train.main([*map(str, args), "--overwrite"]) == 0
    model, meta = load_checkpoint(out)
    assert meta["architecture"] == "posenet_resnet18" and _partials(tmp_path) == []


# --------------------------------------------------------------------------- vizloc-synth

def test_synth_killed_before_its_rename_leaves_nothing(tmp_path):
    from vizloc_ros.sim import synthetic

    out = tmp_path / "world"
    args = ["--out", out, "--split", "test", "--frames", "6", "--size", "32x24", "--format", "bag", "--quiet"]
    assert _killed("vizloc_ros.sim.synthetic", args, tmp_path, die_at="rename") == -signal.SIGKILL
    assert not out.exists() and _partials(tmp_path)
    assert synthetic.main([str(a) for a in args]) == 0
    assert (out / "scene.json").is_file() and _partials(tmp_path) == []


# --------------------------------------------------------------------------- vizloc-export, vizloc-eval

def test_export_killed_mid_onnx_leaves_no_onnx(tiny_weights, tmp_path):
    from vizloc_ros.training import export

    stem = tmp_path / "net"
    args = [tiny_weights, "--out", stem, "--tensorrt", "no"]
    assert _killed("vizloc_ros.training.export", args, tmp_path, die_at="mid-file") == -signal.SIGKILL
    assert not (tmp_path / "net.onnx").exists() and not (tmp_path / "net.json").exists()
    assert export.main([str(a) for a in args]) == 0
    assert (tmp_path / "net.onnx").is_file() and (tmp_path / "net.json").is_file() and _partials(tmp_path) == []


def test_eval_json_killed_mid_write_leaves_no_json(small_bag, tiny_weights, tmp_path):
    from vizloc_ros.training import evaluate

    target = tmp_path / "m.json"
    args = [tiny_weights, small_bag, "--kind", "bag", "--device", "cpu", "--no-progress", "--json", target]
    assert _killed("vizloc_ros.training.evaluate", args, tmp_path, die_at="mid-file") == -signal.SIGKILL
    assert not target.exists()
    assert evaluate.main([str(a) for a in args]) == 0
    json.loads(target.read_text())
    assert _partials(tmp_path) == []


# --------------------------------------------------------------------------- vizloc-map

def test_map_killed_mid_file_leaves_the_old_map_and_the_next_run_sweeps(small_bag, tmp_path):
    """kill -9 while a map file is half on disk (the scratch map or the published one): the
    previous map is intact; the next run removes the killed one's scratch folder and
    temporaries and writes."""
    import torch

    from vizloc_ros.localize.models.ace import SceneEncoder
    from vizloc_ros.mapping import cli as mapping_cli
    from vizloc_ros.mapping.pretrain import write_encoder

    torch.manual_seed(0)
    encoder = write_encoder(tmp_path / "encoder", SceneEncoder(), {"made_by": "test: random"})
    (tmp_path / "m.safetensors").write_bytes(b"an earlier map")
    args = [small_bag, "--out", tmp_path / "m.safetensors", "--encoder", encoder, "--steps", "3",
            "--threads", "1", "--quiet", "--overwrite"]
    assert _killed("vizloc_ros.mapping.cli", args, tmp_path, die_at="mid-file") == -signal.SIGKILL
    assert (tmp_path / "m.safetensors").read_bytes() == b"an earlier map"
    assert _partials(tmp_path), "the hook should have left the killed writer's temporaries"
    assert mapping_cli.main([str(a) for a in args]) == 0
    assert load_checkpoint(tmp_path / "m.safetensors")[1]["architecture"] == "ace"
    assert _partials(tmp_path) == []


# --------------------------------------------------------------------------- vizloc-bag

def test_bag_killed_before_it_takes_its_name_leaves_the_old_bag_and_the_next_run_sweeps(tmp_path):
    """kill -9 with the converted bag complete in its scratch folder, about to replace an
    earlier one (--overwrite): the earlier bag is intact; the next run removes the killed
    one's scratch folder and writes."""
    from PIL import Image

    from vizloc_ros.ros_io.bag_io import topic_message_counts
    from vizloc_ros.training import dataset_bag

    folder = tmp_path / "kitti"
    (folder / "image_0").mkdir(parents=True)
    for k in range(3):
        Image.new("L", (24, 16), 40 * k).save(folder / "image_0" / f"{k:06d}.png")
    (folder / "poses.txt").write_text("".join(f"1 0 0 {k} 0 1 0 0 0 0 1 0\n" for k in range(3)))
    (folder / "calib.txt").write_text("P0: 20 0 11.5 0 0 20 7.5 0 0 0 1 0\n")
    assert dataset_bag.main([str(folder), "--out", str(tmp_path / "bag"), "--frames", "0", "--no-progress"]) == 0
    args = [folder, "--out", tmp_path / "bag", "--overwrite", "--no-progress"]
    assert _killed("vizloc_ros.training.dataset_bag", args, tmp_path, die_at="rename") == -signal.SIGKILL
    assert topic_message_counts(tmp_path / "bag")["/camera/image_raw"] == 1
    assert _partials(tmp_path), "the hook should have left the killed writer's scratch folder"
    assert dataset_bag.main([str(a) for a in args]) == 0
    assert topic_message_counts(tmp_path / "bag")["/camera/image_raw"] == 3
    assert _partials(tmp_path) == []
